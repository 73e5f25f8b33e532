"""EAGLE-3 drafters as llama.cpp `eagle3` GGUF files, and the drafter run in a llama.cpp context beside a Backend.

File layout (vendor/llama.cpp of llama-cpp-python 0.3.36: src/models/eagle3.cpp, src/llama-arch.cpp,
conversion/llama.py): architecture "eagle3", one block; keys eagle3.target_layers (int32 x 3),
eagle3.target_hidden_size, eagle3.norm_before_residual (false here), eagle3.norm_before_fc (the config's) plus the
usual llama hyperparameters; tensors fc.weight, enc.output_norm.weight ([3 * target width], only with norm_before_fc),
blk.0.{attn_norm, attn_norm_2, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}.weight,
output_norm.weight, output.weight over the DRAFT vocabulary and d2t (I64, absolute target ids: the converter adds
arange to HF's offsets, and ggml_set_rows scatters the draft logits to those rows). No token_embd: the decoder
reads the target's through `ctx_other`. The tokenizer is the target's, copied, because the draft logits are
scattered over the target vocabulary (-inf elsewhere).

Runtime (`LlamaEagle3`): a second llama.cpp context whose `ctx_other` is the Backend's context. As in
common/speculative.cpp, the encoder runs through `llama_process(ENCODE)` on rows of 3 * n_embd features, and the
decoder through `llama_process(DECODE)` on llama_batch_ext entries that carry a token id AND a g row each
(`llama_batch_ext_add_token` + `llama_batch_ext_set_embd_token`). Both outputs are the graph's `t_h_nextn`,
read with llama_get_embeddings_nextn: llama-ext.h declares it in C++, so libllama exports it under its
Itanium-mangled name, which is what is bound here (as medusa_gguf/features.py does for the layer-input taps).
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import llama_cpp as lc

from .backend import KV_GGML_TYPES, Backend, BackendError, ContextLengthError, _recent_llama_errors, cpp_function
from .eagle3 import Eagle3Config, Eagle3Drafter
from .features import LayerError, check_layers, default_target_layers
from .models import GGUF_MAGIC, ModelFileError, TensorInfo, embedding_matrix, output_matrix

log = logging.getLogger(__name__)

ARCH = "eagle3"
WEIGHT_TYPES = ("f32", "f16", "q8_0", "q4_0")
KEY_SHA, KEY_ACCURACY, KEY_RANKS = "medusa_gguf.base_model_sha256", "medusa_gguf.accuracy", "medusa_gguf.accuracy_ranks"


class Eagle3FileError(BackendError, ValueError):
    """An eagle3 GGUF that does not fit (wrong architecture, width, layers, vocabulary); the message says which."""


# -- GGUF metadata ------------------------------------------------------------------------------------------------

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
       10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class MetaValue:
    vtype: int  # GGUFValueType
    sub_type: int | None  # element type of an array
    value: Any  # str / number / bool, or a list (strings in arrays stay bytes, as in the file)


@dataclass(frozen=True)
class GGUFHeader:
    meta: dict[str, MetaValue]
    tensors: dict[str, TensorInfo]


def read_gguf_header(path: Path) -> GGUFHeader:
    """Every key-value pair and tensor record of a GGUF file; ModelFileError naming the problem for a missing,
    foreign or truncated file. One pass over a memory map: ~0.1 s for a 49k-token vocabulary, where
    gguf.GGUFReader takes seconds (it builds arrays per string) and models.inspect_gguf skips string by string."""
    from gguf import GGML_QUANT_SIZES

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"GGUF file not found: {path}" if not path.exists() else f"not a file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise ModelFileError(f"not a GGUF file: {path}")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            try:
                meta, tensors, end = _parse_header(mm, path)
            except struct.error:
                raise ModelFileError(f"truncated GGUF file {path}: the header ends early") from None
    alignment = meta["general.alignment"].value if "general.alignment" in meta else 32
    data_start = -(-end // alignment) * alignment
    infos = {}
    for name, shape, ggml_type, rel in tensors:
        if ggml_type not in GGML_QUANT_SIZES:
            raise ModelFileError(f"tensor {name} in {path} has unknown type {ggml_type}")
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        n_bytes = int(np.prod(shape, dtype=np.int64)) // block * type_size
        infos[name] = TensorInfo(name, shape, ggml_type, data_start + rel, n_bytes)
        if data_start + rel + n_bytes > size:
            raise ModelFileError(f"truncated GGUF file {path}: tensor {name} ends past the end of the file")
    return GGUFHeader(meta, infos)


_RawTensor = tuple[str, tuple[int, ...], int, int]  # name, shape (GGUF order), ggml type, offset in the data


def _parse_header(mm: mmap.mmap, path: Path) -> tuple[dict[str, MetaValue], list[_RawTensor], int]:
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
    if version not in (2, 3):
        raise ModelFileError(f"unsupported GGUF version {version} in {path} (supported: 2, 3)")
    off, meta = 24, {}

    def string(at: int) -> tuple[bytes, int]:
        (n,) = struct.unpack_from("<Q", mm, at)
        if at + 8 + n > len(mm):
            raise struct.error("string past the end")
        return mm[at + 8 : at + 8 + n], at + 8 + n

    for _ in range(n_kv):
        raw_key, off = string(off)
        key = raw_key.decode("utf-8", errors="replace")
        (vtype,) = struct.unpack_from("<I", mm, off)
        off += 4
        if vtype == _STRING:
            raw, off = string(off)
            meta[key] = MetaValue(vtype, None, raw.decode("utf-8", errors="replace"))
        elif vtype == _ARRAY:
            sub, count = struct.unpack_from("<IQ", mm, off)
            off += 12
            if sub == _STRING:
                items = []
                for _ in range(count):
                    raw, off = string(off)
                    items.append(raw)
            elif sub in _NP:
                n_bytes = count * np.dtype(_NP[sub]).itemsize
                items = np.frombuffer(mm[off : off + n_bytes], dtype=_NP[sub]).tolist()  # a copy: mm can close
                off += n_bytes
            else:
                raise ModelFileError(f"{path}: GGUF key {key!r} is an array of type {sub}, not supported")
            meta[key] = MetaValue(vtype, sub, items)
        elif vtype in _SCALAR:
            (val,) = struct.unpack_from(_SCALAR[vtype], mm, off)
            off += struct.calcsize(_SCALAR[vtype])
            meta[key] = MetaValue(vtype, None, val)
        else:
            raise ModelFileError(f"{path}: GGUF key {key!r} has unknown value type {vtype}")
    tensors = []
    for _ in range(n_tensors):
        raw_name, off = string(off)
        (n_dims,) = struct.unpack_from("<I", mm, off)
        shape = struct.unpack_from(f"<{n_dims}Q", mm, off + 4)
        ggml_type, rel = struct.unpack_from("<IQ", mm, off + 4 + 8 * n_dims)
        off += 4 + 8 * n_dims + 12
        tensors.append((raw_name.decode(), tuple(shape), ggml_type, rel))
    return meta, tensors, off


@dataclass(frozen=True)
class TargetShape:
    """The hyperparameters of a target GGUF an EAGLE-3 drafter depends on."""

    architecture: str
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    rope_theta: float
    rms_eps: float


def target_shape(path: Path, meta: dict[str, MetaValue] | None = None) -> TargetShape:
    meta = read_gguf_header(path).meta if meta is None else meta
    if "general.architecture" not in meta:
        raise ModelFileError(f"{path} has no general.architecture")
    arch = meta["general.architecture"].value

    def get(key: str, default: Any = None) -> Any:
        v = meta.get(f"{arch}.{key}")
        if v is None:
            if default is None:
                raise ModelFileError(f"{path} has no {arch}.{key}")
            return default
        return v.value[0] if isinstance(v.value, list) else v.value

    n_embd, n_head = get("embedding_length"), get("attention.head_count")
    n_vocab = len(meta["tokenizer.ggml.tokens"].value) if "tokenizer.ggml.tokens" in meta else get("vocab_size")
    return TargetShape(
        architecture=arch, name=meta["general.name"].value if "general.name" in meta else path.stem,
        n_layer=get("block_count"), n_embd=n_embd, n_head=n_head, n_head_kv=get("attention.head_count_kv", n_head),
        head_dim=get("attention.key_length", n_embd // n_head), n_ff=get("feed_forward_length"), n_vocab=n_vocab,
        n_ctx_train=get("context_length"), rope_theta=get("rope.freq_base", 10000.0),
        rms_eps=get("attention.layer_norm_rms_epsilon"),
    )


def eagle3_config_for(target_gguf: Path, *, target_layers: Sequence[int] | None = None, draft_vocab_size: int = 0,
                      **overrides: Any) -> Eagle3Config:
    """A drafter config shaped like the target (heads, FFN width, RoPE base, norm epsilon), EAGLE-3's default
    layers unless given. The drafter's attention shape need not match the target's; `overrides` changes it."""
    t = target_shape(Path(target_gguf))
    layers = check_layers(target_layers if target_layers is not None else default_target_layers(t.n_layer), t.n_layer)
    fields = dict(target_width=t.n_embd, n_head=t.n_head, n_head_kv=t.n_head_kv, head_dim=t.head_dim, n_ff=t.n_ff,
                  n_vocab=t.n_vocab, target_layers=layers, draft_vocab_size=draft_vocab_size,
                  rope_theta=t.rope_theta, rms_eps=t.rms_eps, n_ctx_train=t.n_ctx_train, base_model_name=t.name)
    return Eagle3Config(**{**fields, **overrides})


def drafter_for_target(target_gguf: Path, d2t: torch.Tensor | None = None, *,
                       target_layers: Sequence[int] | None = None, **overrides: Any) -> Eagle3Drafter:
    """A fresh drafter for `target_gguf`: its frozen token embeddings, and a head that starts as the target's
    lm_head on the draft vocabulary `d2t` (its output rows and final-norm weight), so an untrained drafter's
    logits are the target's logits of its own prenorm state."""
    target_gguf = Path(target_gguf)
    output = torch.from_numpy(output_matrix(target_gguf))
    embeddings = torch.from_numpy(embedding_matrix(target_gguf, output.numpy()))
    config = eagle3_config_for(target_gguf, target_layers=target_layers,
                               draft_vocab_size=0 if d2t is None else len(d2t), **overrides)
    drafter = Eagle3Drafter(config, embeddings, d2t, output)
    norm = read_gguf_header(target_gguf).tensors.get("output_norm.weight")
    if norm is not None and norm.ggml_type == 0 and norm.shape == (config.width,):  # 0: GGML_TYPE_F32
        with torch.no_grad():
            drafter.output_norm.copy_(torch.from_numpy(
                np.fromfile(target_gguf, dtype=np.float32, count=config.width, offset=norm.offset)))
    return drafter


# -- export -------------------------------------------------------------------------------------------------------


def _check_target(config: Eagle3Config, t: TargetShape, where: str) -> None:
    if config.target_width != t.n_embd:
        raise Eagle3FileError(f"{where} reads features of a target of width {config.target_width}, but the target "
                              f"{t.name} has width {t.n_embd}")
    if config.n_vocab != t.n_vocab:
        raise Eagle3FileError(f"{where} was built for a vocabulary of {config.n_vocab} tokens, the target {t.name} "
                              f"has {t.n_vocab}")
    try:
        check_layers(config.target_layers, t.n_layer)
    except LayerError as exc:
        raise Eagle3FileError(f"{where}: target_layers {tuple(config.target_layers)} do not fit {t.name}: "
                              f"{exc}") from None


def export_eagle3_gguf(drafter: Eagle3Drafter, path: Path, *, target_gguf: Path, weight_type: str = "f16") -> None:
    """Write `drafter` as an eagle3 GGUF that llama.cpp loads beside `target_gguf` (atomic: tmp file + rename).

    Matrices are stored as `weight_type`, except fc, kept f32 (4 MB on the default model): it reads the target's
    raw residual stream, whose massive activations (up to ~25,000 on the default model) ggml would round to f16
    (inf past 65,504) or to 8-bit blocks for an f16 or q8_0 matrix; measured on real features, an f16 fc put g
    0.4 off, a q8_0 fc 20 off. Norms stay f32 and d2t I64, as the converter writes them. q4_0 halves what a draft
    call reads again (a drafter call is memory-bound like a plain step) at the price of 4-bit weights."""
    import gguf
    from gguf.quants import quantize

    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type {weight_type!r}; expected one of {WEIGHT_TYPES}")
    c, path, target_gguf = drafter.config, Path(path), Path(target_gguf)
    meta = read_gguf_header(target_gguf).meta
    t = target_shape(target_gguf, meta)
    _check_target(c, t, "the drafter")
    state = {k: v.detach().cpu() for k, v in drafter.state_dict().items()}

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    w = gguf.GGUFWriter(tmp, ARCH)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[weight_type]
    w.add_name(f"{t.name} EAGLE-3 drafter")
    w.add_file_type(int(file_type))
    w.add_context_length(c.n_ctx_train)
    w.add_embedding_length(c.width)
    w.add_block_count(1)
    w.add_feed_forward_length(c.n_ff)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_head_kv)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_eps)
    w.add_vocab_size(c.n_vocab)
    w.add_key_value(f"{ARCH}.target_layers", list(c.target_layers), gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)
    w.add_uint32(f"{ARCH}.target_hidden_size", c.target_width)
    w.add_bool(f"{ARCH}.norm_before_residual", False)
    w.add_bool(f"{ARCH}.norm_before_fc", c.norm_before_fc)
    # this project's keys (llama.cpp ignores them): the model file it was trained on, and its validation accuracies
    if c.base_model_sha256:
        w.add_string(KEY_SHA, c.base_model_sha256)
    if c.accuracy:
        w.add_uint32(KEY_RANKS, len(c.accuracy[0]))
        w.add_key_value(KEY_ACCURACY, [float(a) for row in c.accuracy for a in row], gguf.GGUFValueType.ARRAY,
                        gguf.GGUFValueType.FLOAT32)
    for key, mv in meta.items():
        if key.startswith("tokenizer."):
            w.add_key_value(key, mv.value, gguf.GGUFValueType(mv.vtype),
                            None if mv.sub_type is None else gguf.GGUFValueType(mv.sub_type))

    def matrix(name: str, x: torch.Tensor, kind: str = weight_type) -> None:  # x: [out, in], as ne = {in, out}
        a = x.float().numpy()
        if kind == "f32":
            w.add_tensor(name, a)
        elif kind == "f16" or a.shape[-1] % 32:  # q8_0 and q4_0 blocks hold 32 values of a row
            w.add_tensor(name, a.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType[kind.upper()]
            w.add_tensor(name, quantize(a, qtype), raw_dtype=qtype)

    def vector(name: str, x: torch.Tensor) -> None:
        w.add_tensor(name, x.float().numpy())

    if c.norm_before_fc:
        vector("enc.output_norm.weight", state["input_norm"])  # llama.cpp: LLM_TENSOR_ENC_OUTPUT_NORM
    matrix("fc.weight", state["fc.weight"], "f32")  # see the docstring
    vector("blk.0.attn_norm.weight", state["attn_norm"])
    vector("blk.0.attn_norm_2.weight", state["hidden_norm"])
    for ours, theirs in (("wq", "attn_q"), ("wk", "attn_k"), ("wv", "attn_v"), ("wo", "attn_output"),
                         ("ffn_gate", "ffn_gate"), ("ffn_up", "ffn_up"), ("ffn_down", "ffn_down")):
        matrix(f"blk.0.{theirs}.weight", state[f"{ours}.weight"])
    vector("blk.0.ffn_norm.weight", state["ffn_norm"])
    vector("output_norm.weight", state["output_norm"])
    matrix("output.weight", state["output.weight"])
    d2t = state["d2t"].numpy().astype(np.int64)
    if not np.array_equal(d2t, np.arange(c.n_vocab)):
        w.add_tensor("d2t", d2t, raw_dtype=gguf.GGMLQuantizationType.I64)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# -- runtime ------------------------------------------------------------------------------------------------------

_NEXTN_SET = ("llama_set_embeddings_nextn", "_Z26llama_set_embeddings_nextnP13llama_contextbb")
_NEXTN_GET = ("llama_get_embeddings_nextn", "_Z26llama_get_embeddings_nextnP13llama_context")


def _nextn_functions():
    """llama_set_embeddings_nextn / llama_get_embeddings_nextn from libllama (C or mangled C++ name)."""
    what = "return the eagle3 graph's prenorm state (t_h_nextn)"
    return (cpp_function(_NEXTN_SET, [ctypes.c_void_p, ctypes.c_bool, ctypes.c_bool], None, what),
            cpp_function(_NEXTN_GET, [ctypes.c_void_p], ctypes.POINTER(ctypes.c_float), what))


def is_eagle3_gguf(path: Path) -> bool:
    """Whether `path` is a GGUF file of the eagle3 architecture (False for any other file, readable or not)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        meta = read_gguf_header(Path(path)).meta
    except (OSError, ValueError, ModelFileError):
        return False
    return "general.architecture" in meta and meta["general.architecture"].value == ARCH


def drafter_info(meta: dict[str, MetaValue]) -> tuple[str, list[list[float]]]:
    """(SHA-256 of the model file it was trained on or "", validation accuracy[step][rank] or []) of an exported
    drafter's metadata."""
    sha = str(meta[KEY_SHA].value) if KEY_SHA in meta else ""
    if KEY_ACCURACY not in meta or KEY_RANKS not in meta:
        return sha, []
    flat, ranks = [float(a) for a in meta[KEY_ACCURACY].value], int(meta[KEY_RANKS].value)
    if ranks < 1 or len(flat) % ranks:
        raise Eagle3FileError(f"{KEY_ACCURACY} holds {len(flat)} values, not a multiple of {KEY_RANKS}={ranks}")
    return sha, [flat[i : i + ranks] for i in range(0, len(flat), ranks)]


def check_eagle3_file(path: Path, target: Backend) -> tuple[dict[str, MetaValue], np.ndarray | None]:
    """(metadata, d2t or None) of an eagle3 GGUF that fits `target`; Eagle3FileError naming the problem otherwise.
    Checked before llama.cpp sees the file: some of these mismatches abort the process inside llama.cpp."""
    path = Path(path)
    header = read_gguf_header(path)
    meta = header.meta
    arch = meta["general.architecture"].value if "general.architecture" in meta else "unknown"
    if arch != ARCH:
        raise Eagle3FileError(f"{path} is a {arch!r} model, not an EAGLE-3 drafter (general.architecture must be "
                              f"{ARCH!r}); pass a file written by export_eagle3_gguf or convert_hf_to_gguf")

    def get(key: str) -> Any:
        if f"{ARCH}.{key}" not in meta:
            raise Eagle3FileError(f"{path} has no {ARCH}.{key}")
        return meta[f"{ARCH}.{key}"].value

    layers, tgt_width, width = get("target_layers"), get("target_hidden_size"), get("embedding_length")
    if tgt_width != target.n_embd:
        raise Eagle3FileError(f"{path} fuses features of a target of width {tgt_width} "
                              f"({ARCH}.target_hidden_size), but {target.model_path.name} has width {target.n_embd}")
    if "token_embd.weight" not in header.tensors and width != target.n_embd:
        raise Eagle3FileError(f"{path} has width {width} and no token embeddings of its own, so it reads "
                              f"{target.model_path.name}'s, of width {target.n_embd}: the widths must match")
    if len(layers) != 3:
        raise Eagle3FileError(f"{path} lists {len(layers)} target layers {layers}; EAGLE-3 reads exactly 3")
    try:
        check_layers(layers, target.n_layer)
    except LayerError as exc:
        raise Eagle3FileError(f"{path}: {ARCH}.target_layers {layers} do not fit {target.model_path.name}: "
                              f"{exc}") from None
    norm = header.tensors.get("enc.output_norm.weight")
    if f"{ARCH}.norm_before_fc" in meta and meta[f"{ARCH}.norm_before_fc"].value and (
            norm is None or norm.shape != (3 * tgt_width,)):
        raise Eagle3FileError(f"{path} sets {ARCH}.norm_before_fc, so it needs enc.output_norm.weight of shape "
                              f"({3 * tgt_width},) (3 x {ARCH}.target_hidden_size); it has "
                              f"{'none' if norm is None else norm.shape}")
    n_vocab = len(meta["tokenizer.ggml.tokens"].value) if "tokenizer.ggml.tokens" in meta else 0
    if n_vocab != target.n_vocab:
        raise Eagle3FileError(f"{path} has a vocabulary of {n_vocab} tokens, {target.model_path.name} has "
                              f"{target.n_vocab}; the drafter must carry the target's tokenizer")
    d2t = None
    if "d2t" in header.tensors:
        ti = header.tensors["d2t"]
        d2t = np.fromfile(path, dtype=np.int64, count=ti.n_bytes // 8, offset=ti.offset)
        if ti.ggml_type != 27 or len(d2t) == 0 or d2t.min() < 0 or d2t.max() >= target.n_vocab:  # 27: GGML_TYPE_I64
            raise Eagle3FileError(f"{path}: d2t must be I64 target ids in 0..{target.n_vocab - 1} (ggml_set_rows "
                                  "scatters the draft logits to those rows)")
    return meta, d2t


class LlamaEagle3:
    """An eagle3 GGUF in its own llama.cpp context, linked to `target`'s context (ctx_other).

    The drafter's KV cache holds one cell per decoded (token, g) entry; sequence ids work as in the Backend
    (a cell may belong to several sequences: the cache is unified), so a caller can draft chains or trees and
    roll them back with `seq_rm`. The entries follow medusa_gguf/eagle3.py's convention, as llama-server drives
    them: after the target has read tokens up to position t, decode (x_{i+1}, encode(f_i)) at positions i <= t
    (the newest once x_{t+1} is known), then draft depth k at position t + k from the previous prenorm.
    A sequence's entries must continue its last cell (Y = X + 1), so a rejected draft is removed before the
    context grows again. Not thread-safe; close it before its target Backend."""

    def __init__(self, path: Path, target: Backend, *, n_ctx: int | None = None, n_batch: int = 512,
                 n_seq_max: int | None = None, kv_type: str = "f32", flash_attn: bool = False) -> None:
        """An f32 cache without flash attention by default: one layer's cache is small, and then the logits are
        as exact as the weights (f32 weights: logits within ~1e-5 of torch on the default model). ggml's CPU flash
        attention rounds through f16 even over an f32 cache: ~2e-3 off in the logits, ~3e-4 in the prenorm."""
        self._model = self._ctx = self._batch = None
        self.path, self.target = Path(path), target
        self.meta, d2t = check_eagle3_file(self.path, target)
        self.n_embd = int(self.meta[f"{ARCH}.embedding_length"].value)
        self.n_embd_enc = 3 * target.n_embd
        self.target_layers = tuple(int(x) for x in self.meta[f"{ARCH}.target_layers"].value)
        self.n_vocab = target.n_vocab
        self.d2t = d2t if d2t is not None else np.arange(self.n_vocab, dtype=np.int64)
        self._set_nextn, self._get_nextn = _nextn_functions()

        mparams = lc.llama_model_default_params()
        ngl = target.settings.n_gpu_layers
        mparams.n_gpu_layers = ngl if ngl >= 0 else 2**31 - 1
        self._model = lc.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model:
            raise BackendError(f"llama.cpp could not load {self.path}: {_recent_llama_errors()}")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n_ctx or target.n_ctx
        cparams.n_batch = cparams.n_ubatch = n_batch  # the encoder needs a whole call in one ubatch
        cparams.n_seq_max = n_seq_max or target.n_seq_max
        cparams.kv_unified = True
        cparams.n_threads = cparams.n_threads_batch = target.n_threads
        cparams.no_perf = True
        cparams.type_k = cparams.type_v = KV_GGML_TYPES[kv_type]
        cparams.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.ctx_other = self._target_ctx = target._ctx  # its token embeddings feed the decoder
        self._ctx = lc.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise BackendError(f"llama.cpp could not create a context for {self.path}: {_recent_llama_errors()}")
        self._set_nextn(self._ctx, True, True)  # prenorm rows for the rows that ask for outputs
        self._mem = lc.llama_get_memory(self._ctx)
        self.n_batch = n_batch
        self.n_ctx = lc.llama_n_ctx(self._ctx)
        self.n_seq_max = cparams.n_seq_max
        self._batch = lc.llama_batch_ext_init(self._ctx)
        log.info("EAGLE-3 drafter %s: width %d, target layers %s, draft vocabulary %d, n_ctx %d, KV %s",
                 self.path, self.n_embd, self.target_layers, len(self.d2t), self.n_ctx, kv_type)

    def close(self) -> None:
        if self._batch:
            lc.llama_batch_ext_free(self._batch)
            self._batch = None
        if self._ctx:
            lc.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            lc.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "LlamaEagle3":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter exit the llama_cpp module may already be torn down
            pass

    # -- passes -------------------------------------------------------------------------------------------

    def _require_open(self) -> None:
        """A freed context or target would crash inside llama.cpp; fail here instead."""
        if not self._ctx:
            raise BackendError(f"the drafter {self.path} is closed")
        if self.target._ctx != self._target_ctx:  # the graph reads the target's token embeddings
            raise BackendError(f"the target Backend of the drafter {self.path} was closed; close the drafter first")

    def _process(self, kind: int, n: int) -> None:
        rc = lc.llama_process(self._ctx, kind, self._batch)
        if rc == 1:
            raise ContextLengthError(f"no room in the drafter's KV cache (n_ctx={self.n_ctx}) for {n} more entries")
        if rc != 0:
            raise BackendError(f"llama_process ({'encode' if kind == lc.LLAMA_PROCESS_TYPE_ENCODE else 'decode'}) "
                               f"of the drafter returned {rc}: {_recent_llama_errors()}")

    def _prenorm(self, n: int) -> np.ndarray:
        ptr = self._get_nextn(self._ctx)
        if not ptr:
            raise BackendError("llama.cpp returned no prenorm state (t_h_nextn) for the drafter")
        return np.ctypeslib.as_array(ptr, shape=(n, self.n_embd)).copy()

    def encode(self, features: np.ndarray) -> np.ndarray:  # [n, 3 * n_embd_target] -> g [n, n_embd]
        """The fc pass, in chunks of n_batch rows. Touches no KV cell."""
        self._require_open()
        feats = np.ascontiguousarray(features, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[1] != self.n_embd_enc:
            raise ValueError(f"features are {feats.shape}; the drafter reads rows of 3 x {self.target.n_embd} = "
                             f"{self.n_embd_enc} (target layers {self.target_layers})")
        out = []
        # the encoder reads no positions, but the batch must continue seq 0's positions (llama_batch_allocr::init
        # checks Y = X + 1 against the KV cache): placeholders after its last one, as common/speculative.cpp does
        pos0 = self.pos_max(0) + 1
        for start in range(0, len(feats), self.n_batch):
            rows = feats[start : start + self.n_batch]
            lc.llama_batch_ext_clear(self._batch)
            for i in range(len(rows)):
                embd = lc.llama_embd(rows[i].ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, self.n_embd_enc)
                idx = lc.llama_batch_ext_add_embd(self._batch, 0, embd)  # copies the row
                if idx < 0:
                    raise BackendError(f"llama_batch_ext_add_embd failed ({idx}) at row {start + i}")
                pos = lc.llama_pos(pos0 + i)
                lc.llama_batch_ext_set_pos(self._batch, idx, ctypes.byref(pos))
                lc.llama_batch_ext_set_output_logits(self._batch, idx, True)
            self._process(lc.LLAMA_PROCESS_TYPE_ENCODE, len(rows))
            out.append(self._prenorm(len(rows)))
        return np.concatenate(out) if out else np.zeros((0, self.n_embd), dtype=np.float32)

    def decode(self, tokens: Sequence[int], g: np.ndarray, positions: Sequence[int],
               seq_ids: Sequence[int | Sequence[int]] | None = None, outputs: Sequence[bool] | None = None,
               *, full_vocab: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """One decoder call over entries (tokens[i], g[i]) at positions[i], stored in the KV cache under
        seq_ids[i] (an id or several; default 0). Returns, for the rows with outputs (default all), in order:
        (logits [n_out, draft vocab] in draft-id order, or [n_out, n_vocab] with -inf off the draft vocabulary
        when full_vocab; prenorm [n_out, n_embd], the g of the next draft step)."""
        self._require_open()
        n = len(tokens)
        g = np.ascontiguousarray(g, dtype=np.float32)
        if g.shape != (n, self.n_embd) or len(positions) != n:
            raise ValueError(f"{n} tokens need g of shape ({n}, {self.n_embd}) and {n} positions; got g {g.shape}, "
                             f"{len(positions)} positions")
        if n > self.n_batch:
            raise ValueError(f"{n} entries exceed the drafter's n_batch={self.n_batch}")
        seq_ids = [0] * n if seq_ids is None else seq_ids
        wanted = [True] * n if outputs is None else [bool(o) for o in outputs]
        # The eagle3 graph computes every row (no inp_out_ids), and llama.cpp copies out the graph's FIRST n_outputs
        # rows: so every row up to the last wanted one is an output, and the wanted ones are picked here.
        last = max((i for i in range(n) if wanted[i]), default=-1)
        outputs = [i <= last for i in range(n)]
        seq_sets = [(int(s),) if isinstance(s, (int, np.integer)) else tuple(int(x) for x in s) for s in seq_ids]
        self._check_positions(positions, seq_sets)
        lc.llama_batch_ext_clear(self._batch)
        for i in range(n):
            seqs = seq_sets[i]
            idx = lc.llama_batch_ext_add_token(self._batch, int(seqs[0]), int(tokens[i]))
            if idx < 0:
                raise BackendError(f"llama_batch_ext_add_token failed ({idx}) for token {tokens[i]} in seq {seqs[0]} "
                                   f"(vocabulary {self.n_vocab}, n_seq_max {self.n_seq_max})")
            for s in seqs[1:]:
                if not lc.llama_batch_ext_add_seq(self._batch, idx, int(s)):
                    raise BackendError(f"seq id {s} out of range (n_seq_max {self.n_seq_max})")
            pos = lc.llama_pos(int(positions[i]))
            lc.llama_batch_ext_set_pos(self._batch, idx, ctypes.byref(pos))
            embd = lc.llama_embd(g[i].ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, self.n_embd)
            if not lc.llama_batch_ext_set_embd_token(self._batch, idx, embd):
                raise BackendError(f"llama_batch_ext_set_embd_token refused row {i}: {_recent_llama_errors()}")
            if outputs[i]:
                lc.llama_batch_ext_set_output_logits(self._batch, idx, True)
        n_out = int(sum(bool(o) for o in outputs))
        self._process(lc.LLAMA_PROCESS_TYPE_DECODE, n)
        if n_out == 0:
            return np.zeros((0, len(self.d2t) if not full_vocab else self.n_vocab), np.float32), \
                np.zeros((0, self.n_embd), np.float32)
        rows = [i for i in range(n_out) if wanted[i]]
        logits = np.ctypeslib.as_array(lc.llama_get_logits(self._ctx), shape=(n_out, self.n_vocab))[rows]
        return (logits if full_vocab else logits[:, self.d2t]), self._prenorm(n_out)[rows]

    def _check_positions(self, positions: Sequence[int], seq_sets: Sequence[tuple[int, ...]]) -> None:
        """llama.cpp refuses a batch whose entries of a non-empty sequence do not start right after its last cell
        (its log then only says "failed to initialize batch"), so say which sequence and positions."""
        first: dict[int, int] = {}
        for p, seqs in zip(positions, seq_sets):
            for s in seqs:
                if not 0 <= s < self.n_seq_max:
                    raise ValueError(f"seq id {s} out of range 0..{self.n_seq_max - 1}")
                first[s] = min(first.get(s, int(p)), int(p))
        for s, p in first.items():
            if self.pos_max(s) >= 0 and p != self.pos_max(s) + 1:  # an empty sequence may start anywhere
                raise ValueError(f"seq {s} holds positions up to {self.pos_max(s)}, so its entries must start at "
                                 f"{self.pos_max(s) + 1}, not {p}; remove later cells first (seq_rm)")

    # -- KV cache -----------------------------------------------------------------------------------------

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        """Drop seq's cells at positions [p0, p1); p0 < 0 starts at 0, p1 < 0 runs to the end, so seq_rm(s) also
        drops s from a shared prefix. seq -1: every sequence."""
        self._require_open()
        if not lc.llama_memory_seq_rm(self._mem, seq, p0, p1):
            raise BackendError(f"llama.cpp refused to remove positions [{p0}, {p1}) of seq {seq} from the drafter")

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Add dst to src's cells at positions [p0, p1) (bounds as in seq_rm): dst shares them, no data is copied."""
        self._require_open()
        lc.llama_memory_seq_cp(self._mem, src, dst, p0, p1)

    def seq_keep(self, seq: int) -> None:
        self._require_open()
        lc.llama_memory_seq_keep(self._mem, seq)

    def pos_max(self, seq: int = 0) -> int:
        """Highest position held by seq, -1 when empty."""
        self._require_open()
        return lc.llama_memory_seq_pos_max(self._mem, seq)

    def clear(self) -> None:
        self._require_open()
        lc.llama_memory_clear(self._mem, True)
