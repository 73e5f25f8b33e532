"""EAGLE-3 features: the hidden states of three target layers at every position, fused by an EAGLE-3 drafter.

Layer-id convention (llama.cpp's, used everywhere here): layer id `l` is the INPUT of decoder layer `l`, i.e. the
residual stream after layers 0..l-1 (id 0 is the token embedding, id l >= 1 is the output of layer l-1: the
`l_out-{l-1}` tensor of llama.cpp's graph). In llama.cpp (vendor/llama.cpp of llama-cpp-python 0.3.36):
- src/models/llama.cpp sets `res->t_layer_inp[il] = inpL` at the top of layer il's loop body;
  `llama_set_embeddings_layer_inp(ctx, lid, true)` marks that tensor as an output (src/llama-graph.cpp,
  set_outputs) and `llama_get_embeddings_layer_inp(ctx, lid)` returns it (src/llama-ext.h).
- An eagle3 GGUF's `eagle3.target_layers` metadata holds these ids (src/models/eagle3.cpp reads
  LLM_KV_TARGET_LAYERS); common/speculative.cpp (common_speculative_impl_draft_eagle3) switches them on in the
  target context and concatenates them per token in metadata order: row i = [layer k0 | k1 | k2] of batch token i.
  Ids equal to n_layer go through the nextn (pre-final-norm) output instead, which the llama architecture does not
  build, so here ids must lie in 0..n_layer-1.
- conversion/llama.py (convert_hf_to_gguf) writes an HF EAGLE-3's `eagle_aux_hidden_state_layer_ids` unchanged,
  or [2, N // 2, N - 3] without them. The HF runtimes that define those ids (vLLM, SGLang: the aux state is taken
  as `hidden_states + residual` BEFORE layer idx runs) use the same input convention, so no shift. Trainers that
  count decoder-layer OUTPUTS (TensorRT-LLM, NeMo-RL: (1, N // 2 - 1, N - 4)) name the same tensors with ids one
  lower: llama.cpp id = output id + 1 (DFlash's converter, conversion/qwen.py, adds that 1).

Rows: llama.cpp copies a tapped layer's input for EVERY token of the batch, whether or not its logits were asked
for (llama_context::extract_layer_inputs, offset n_tokens_prev per ubatch, reordered back to batch order), into a
buffer of n_batch rows that the next decode overwrites. So the rows are read after each call.

Exactness: calls hold at most EXACT_BATCH tokens (backend.py), the path whose outputs equal single-token decoding,
so the features equal what a run-time drafter sees after prefill or tree decoding.

Shards follow medusa_gguf/data.py's format with `features` [N, L * n_embd] fp16 in place of `hidden`, and can resume
a run that was killed: the manifest is rewritten after every shard and marked complete at the end.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from .backend import EXACT_BATCH, TRASH_SEQ, Backend, BackendError, ContextLengthError
from .data import Manifest, cache_key, future_tokens, read_shard
from .models import file_sha256

log = logging.getLogger(__name__)

FEATURE_VERSION = 1
DEFAULT_SHARD_ROWS = 8192  # 8192 rows of 3 x 576 fp16 = 27 MiB per shard on the default model


class LayerError(ValueError):
    """Layer ids the model cannot provide; the message names the layer and the model's layer count."""


def default_target_layers(n_layer: int) -> tuple[int, int, int]:
    """EAGLE-3's layers in llama.cpp's input convention: (2, n_layer // 2, n_layer - 3); (2, 15, 27) for 30 layers.

    The same default as conversion/llama.py writes into an eagle3 GGUF that lacks explicit ids."""
    layers = (2, n_layer // 2, n_layer - 3)
    if not layers[0] < layers[1] < layers[2]:
        raise LayerError(f"EAGLE-3's default layers {layers} are not distinct for a model of {n_layer} layers; "
                         "pass three layer ids explicitly")
    return layers


def check_layers(layers: Sequence[int], n_layer: int) -> tuple[int, ...]:
    """Distinct ids in 0..n_layer-1. llama.cpp aborts the process on a bad id, so they are checked here first."""
    layers = tuple(int(lid) for lid in layers)
    if not layers:
        raise LayerError("no layers to extract")
    for lid in layers:
        if not 0 <= lid < n_layer:
            raise LayerError(
                f"layer {lid} does not exist: the model has {n_layer} layers, so layer inputs 0..{n_layer - 1} "
                "can be extracted (id l is the input of decoder layer l, the output of layer l-1)"
            )
    if len(set(layers)) != len(layers):
        raise LayerError(f"layer ids {layers} repeat a layer")
    return layers


# -- extraction ---------------------------------------------------------------------------------------------------


def pack_calls(lengths: Sequence[int], limit: int = EXACT_BATCH, max_streams: int = TRASH_SEQ) -> list[list[int]]:
    """Sequence indices per decode call: consecutive sequences, one stream each, at most `limit` tokens per call.

    A sequence longer than `limit` gets a group of its own, decoded in consecutive chunks. Empty ones are skipped."""
    groups: list[list[int]] = []
    group: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        if group and (used + n > limit or len(group) == max_streams):
            groups.append(group)
            group, used = [], 0
        group.append(i)
        used += n
    if group:
        groups.append(group)
    return groups


class FeatureExtractor:
    """Taps `layers` of a Backend's context while open; `extract` returns their inputs for every position.

    Use as a context manager: the taps cost an extra copy per decode, so they are switched off on exit.
    Extraction clears the KV cache (like `Backend.extract_hidden`): the committed text is lost."""

    def __init__(self, backend: Backend, layers: Sequence[int] | None = None) -> None:
        if backend.streams:
            raise BackendError("feature extraction needs a backend with a unified KV cache (streams=0)")
        if backend.n_batch < EXACT_BATCH:
            raise BackendError(f"feature extraction needs n_batch >= {EXACT_BATCH}, the backend has {backend.n_batch}")
        self.backend = backend
        self.layers = check_layers(layers if layers is not None else default_target_layers(backend.n_layer),
                                   backend.n_layer)
        self.width = len(self.layers) * backend.n_embd
        self._open = False
        self._before: tuple[int, ...] = ()

    def __enter__(self) -> "FeatureExtractor":
        self._before = self.backend.taps
        self.backend.tap_layers(self.layers)
        self._open = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._open = False
        if self.backend._ctx:
            self.backend.tap_layers(self._before)

    def _call(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[tuple[int, ...]]) -> np.ndarray:
        return self.backend.decode_taps(tokens, positions, seqs)

    def extract(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per sequence, [len(seq), L * n_embd] float32: row t holds the tapped layers' inputs at position t."""
        return [f for _, f in self.iter_extract(sequences)]

    def iter_extract(self, sequences: Sequence[Sequence[int]]) -> Iterator[tuple[int, np.ndarray]]:
        """(index, features) in sequence order, one decode group at a time (memory stays bounded)."""
        if not self._open:
            raise BackendError("FeatureExtractor.extract runs inside `with FeatureExtractor(...)`")
        for idx, seq in enumerate(sequences):
            if len(seq) > self.backend.n_ctx:
                raise ContextLengthError(f"sequence {idx} has {len(seq)} tokens, more than n_ctx={self.backend.n_ctx}")
        empty = np.zeros((0, self.width), dtype=np.float32)
        done: dict[int, np.ndarray] = {}
        nxt = 0
        try:
            for group in pack_calls([len(s) for s in sequences]):
                done.update(self._decode_group(sequences, group))
                while nxt < len(sequences) and (nxt in done or not sequences[nxt]):
                    yield nxt, done.pop(nxt, empty)
                    nxt += 1
            for idx in range(nxt, len(sequences)):  # only empty ones are left
                yield idx, empty
        finally:
            self.backend.reset()

    def _decode_group(self, sequences: Sequence[Sequence[int]], group: list[int]) -> dict[int, np.ndarray]:
        """One pack_calls group from an empty cache: several sequences side by side (stream s = seq id s) in one
        call, or one long sequence in consecutive chunks of EXACT_BATCH tokens on seq 0."""
        self.backend.reset()
        if len(group) == 1:
            seq = sequences[group[0]]
            spans = [(s, min(s + EXACT_BATCH, len(seq))) for s in range(0, len(seq), EXACT_BATCH)]
            return {group[0]: np.concatenate([self._call(seq[a:b], range(a, b), [(0,)] * (b - a)) for a, b in spans])}
        tokens = [t for i in group for t in sequences[i]]
        positions = [p for i in group for p in range(len(sequences[i]))]
        seq_ids = [(stream,) for stream, i in enumerate(group) for _ in sequences[i]]
        feats = self._call(tokens, positions, seq_ids)
        ends = np.cumsum([len(sequences[i]) for i in group])
        return {i: feats[end - len(sequences[i]) : end] for i, end in zip(group, ends)}


def extract_features(backend: Backend, tokens: Sequence[int], layers: Sequence[int] | None = None) -> np.ndarray:
    """[len(tokens), 3 * n_embd] float32 for one sequence (EAGLE-3's default layers unless given)."""
    with FeatureExtractor(backend, layers) as fx:
        return fx.extract([tokens])[0]


# -- shards -------------------------------------------------------------------------------------------------------


@dataclass
class FeatureManifest(Manifest):
    """data.Manifest plus the tapped layers; `complete` is false while a run is (or was killed) midway."""

    layers: list[int] = field(default_factory=list)
    tokens_done: int = 0
    complete: bool = False
    version: int = FEATURE_VERSION


def feature_key(model_sha256: str, seqs: Sequence[Sequence[int]], n_future: int, layers: Sequence[int],
                first_rows: Sequence[int] | None) -> str:
    """data.cache_key's inputs plus the layers and this module's format version."""
    base = cache_key(model_sha256, seqs, n_future, first_rows)
    return hashlib.sha256(f"features|{FEATURE_VERSION}|{list(layers)}|{base}".encode()).hexdigest()[:20]


def _write_manifest(folder: Path, manifest: FeatureManifest) -> None:
    tmp = folder / ".manifest.json.tmp"
    tmp.write_text(json.dumps(asdict(manifest), indent=1))
    os.replace(tmp, folder / "manifest.json")


def _resumable(folder: Path, key: str) -> FeatureManifest | None:
    path = folder / "manifest.json"
    if not path.is_file():
        return None
    try:
        old = FeatureManifest(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None
    if old.key != key or not all(p.is_file() for p in old.paths(folder)):
        return None
    return old


def extract_feature_shards(
    backend: Backend, seqs: Sequence[Sequence[int]], folder: Path, *, n_future: int,
    layers: Sequence[int] | None = None, first_rows: Sequence[int] | None = None,
    shard_rows: int = DEFAULT_SHARD_ROWS, desc: str = "EAGLE-3 features",
) -> FeatureManifest:
    """Write fp16 feature shards for every kept row of every sequence; reuse or resume them when the key matches.

    Shards: `features` [N, L * n_embd] fp16, `tokens` [N] int32, `future` [N, n_future] int32 and `offsets` [S+1]
    int64, as data.build_shards writes them. Kept rows: from the sequence's entry in `first_rows` on, and only those
    whose token t+2 exists. A killed run keeps its finished shards and continues after them."""
    from safetensors.numpy import save_file

    if first_rows is not None and len(first_rows) != len(seqs):
        raise ValueError(f"first_rows has {len(first_rows)} entries for {len(seqs)} sequences")
    if n_future < 2:
        raise ValueError(f"n_future must be at least 2 (token t+2 is the first draft target), got {n_future}")
    layers = check_layers(layers if layers is not None else default_target_layers(backend.n_layer), backend.n_layer)
    key = feature_key(file_sha256(backend.model_path), seqs, n_future, layers, first_rows)
    folder = Path(folder)
    manifest = _resumable(folder, key)
    if manifest is not None and manifest.complete:
        log.info("reusing %d cached feature rows in %s", manifest.rows, folder)
        return manifest
    if manifest is None:
        manifest = FeatureManifest(key=key, n_embd=backend.n_embd, n_future=n_future, layers=list(layers))
    else:
        log.info("resuming %s after %d of %d sequences", folder, manifest.sequences, len(seqs))
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("shard-*.safetensors"):  # another key's, or written after the last manifest update
        if stale.name not in manifest.shards:
            stale.unlink()
    firsts = list(first_rows) if first_rows is not None else [0] * len(seqs)
    todo = list(range(manifest.sequences, len(seqs)))
    buf: dict[str, list[np.ndarray]] = {"features": [], "tokens": [], "future": []}
    lengths: list[int] = []

    def flush() -> None:
        if not lengths:
            return
        name = f"shard-{len(manifest.shards):05d}.safetensors"
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tmp = folder / f".{name}.tmp"
        save_file({**{k: np.concatenate(v) for k, v in buf.items()}, "offsets": offsets}, str(tmp))
        os.replace(tmp, folder / name)
        manifest.shards.append(name)
        manifest.rows += int(offsets[-1])
        manifest.sequences += len(lengths)
        manifest.tokens_done = sum(len(seqs[i]) for i in range(manifest.sequences))
        _write_manifest(folder, manifest)
        for v in buf.values():
            v.clear()
        lengths.clear()

    bar = tqdm(total=sum(len(s) for s in seqs), initial=manifest.tokens_done, desc=desc, unit="tok",
               unit_scale=True)
    with FeatureExtractor(backend, layers) as fx:
        for j, feats in fx.iter_extract([seqs[i] for i in todo]):
            i = todo[j]
            s = seqs[i]
            fut = future_tokens(s, n_future)
            keep = (fut[:, 1] >= 0) & (np.arange(len(s)) >= firsts[i])
            buf["features"].append(feats[keep].astype(np.float16))
            buf["tokens"].append(np.asarray(s, dtype=np.int32)[keep])
            buf["future"].append(fut[keep])
            lengths.append(int(keep.sum()))
            bar.update(len(s))
            if sum(lengths) >= shard_rows:
                flush()
    flush()
    bar.close()
    manifest.complete = True
    _write_manifest(folder, manifest)
    return manifest


def iter_feature_rows(paths: Sequence[Path]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(features fp16 [n, L * n_embd], future int32 [n, F]) shard by shard."""
    for p in paths:
        shard = read_shard(p)
        yield shard["features"], shard["future"]
