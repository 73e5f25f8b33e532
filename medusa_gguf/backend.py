"""The llama.cpp backend: the only module that imports `llama_cpp` (its low-level C API).

Sequence ids and the KV cache, as used here:
- A context holds `slots` texts (one for the CLI and the benchmark; N_PARALLEL for the server, batching.py). Text
  s is sequence s (a `SeqState`): positions 0..n_past-1 of seq s hold its prompt and every accepted token.
- A tree is decoded in ONE `llama_decode` call, alone or with other texts' work (`decode_batch`). Each leaf gets its
  own sequence id (slots..slots+61); each node carries the ids of all leaves below it, and the committed prefix is
  shared into every leaf sequence first. llama.cpp masks a token to the cells sharing its sequence, so a node sees
  its text's prefix and its own ancestors, nothing else. The KV cache must be unified (`kv_unified=True`) for one
  cell to belong to several sequences.
- `commit(node)` adds the text's sequence to the cells of the root-to-node path and drops the leaf sequences.

Exactness. Attention sums over the visible KV cells in cell order, and the Q8 activation quantization of a
4-bit model turns a last-bit difference into logit differences of ~0.5. So a token must see exactly the cells
plain decoding would show it, in the same order:
- Flash attention is on. On this CPU build, with it off, a token decoded alone and the same token inside a
  batch gave different logits (the matmul path depends on the batch); with it on they are bit-identical.
  A Backend built without flash attention refuses trees (`tests/test_backend.py`).
- A call with 64 or more tokens takes another attention path on this CPU build (with an f16 cache: tiles of 64
  cells, so a sum depends on where other texts' cells lie), whose results differ from single-token decoding; so
  every call that keeps cells has at most EXACT_BATCH (63) tokens: trees, batched steps and prompt chunks alike.
  A row's results then depend on nothing but its own text: not on the call's other rows, nor on other texts'
  cells interleaved in the cache (masked cells are skipped one by one). Hidden-state extraction feeds at most 63
  tokens per call too.
- A single-token call over 512 or more KV cells with an f16 or f32 cache takes ggml's split-KV path on the CPU
  (each thread sums a chunk of the cells, then the chunks are merged), while a tree's rows are summed cell by
  cell: the logits differ by up to ~1 from about 256 tokens of context on. The KV cache is therefore bf16 where
  the CPU computes attention (`resolve_kv_type`): both calls then take the same path, bit-identical at any length.
- Every text's cells stay in position order. llama.cpp puts a new token in the first free cell from its search
  head, so a hole would be reused and visited before older cells (docs/DESIGN.md's flash-attention trap). Free
  cells therefore only ever lie at the end of the cache: a discarded node or a finished text moves to the trash
  sequence, which no token attends to, except discarded nodes at the very end of the cache (the last tree of the
  last call), which are freed. When the trash fills the slack cells, `_compact` rewrites every text contiguously
  through llama.cpp's sequence state save/restore (a memory copy, no decode).

Every decode returns, per output row, the logits and the final hidden state (post final norm, the vector the
lm_head multiplies): `embeddings=True` with `pooling_type=NONE`. Prefill's calls before its last switch embeddings
off and output nothing (`prefill_spans`). With layer taps on (`tap_layers`, for an EAGLE-3 drafter) every call also
returns the tapped layers' inputs for EVERY token of the call, prefill's silent calls included (`features`).
"""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import re
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

# ggml's tiled K-quant matmul (Q4_K, Q6_K, ...) takes over from 8 rows on and sums in another order than the
# single-row kernel: a Q4_K_M model's batched calls then differ from single-token decoding (logits ~0.9 apart after
# a prompt). ggml reads the switch once per process, at the first matmul, so it is set before llama_cpp loads.
# The price, measured on Gemma 3 270M Q4_K_M: prefill 372 instead of 449 tokens/s; decoding is unchanged.
os.environ.setdefault("GGML_CPU_TILED_MM", "0")

import llama_cpp as lc  # noqa: E402  (after the switch above)

from .models import GGUFInfo, inspect_gguf, resolve_model_path
from .settings import Settings

log = logging.getLogger(__name__)

N_SEQ_MAX = 64  # one text: seq 0: committed text; 1..62: tree leaves; 63: trash
TRASH_SEQ = N_SEQ_MAX - 1
MAX_TREE_LEAVES = N_SEQ_MAX - 2  # leaves of one tree; of all pending trees with one text
LLAMA_MAX_SEQ = 256  # llama.cpp's limit on sequence ids (src/llama-cparams.h)
MAX_SLOTS = LLAMA_MAX_SEQ - MAX_TREE_LEAVES - 1
EXACT_BATCH = 63  # largest call whose outputs equal single-token decoding bit for bit (measured, see above)
DEFAULT_N_BATCH = 512
COMPACT_TRASH = 1024  # trash cells beyond which batching.Batcher compacts before a round (Backend.reserve)


class BackendError(RuntimeError):
    """llama.cpp refused an operation; the message says which and why."""


class NoChatTemplate(BackendError, ValueError):
    """A chat was asked of a model whose GGUF has no chat template."""


class ContextLengthError(BackendError, ValueError):
    """Tokens would not fit the context window; the message names both sizes."""


# llama.cpp speaks through a log callback, not return codes; keep its recent lines to explain failures.
_LLAMA_LOG: deque[str] = deque(maxlen=50)
# Open _capture_llama_log() blocks, by id of their list. The callback is process-wide: a load in another thread at
# the same time lands in both lists (the server builds its engines one after the other).
_LOG_CAPTURES: dict[int, list[str]] = {}


@lc.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    line = text.decode("utf-8", errors="replace").rstrip()
    if line:
        _LLAMA_LOG.append(line)
        for lines in _LOG_CAPTURES.values():
            lines.append(line)
        log.debug("llama.cpp: %s", line)


@contextmanager
def _capture_llama_log() -> Iterator[list[str]]:
    """Every llama.cpp log line printed inside the block; a model load prints far more than _LLAMA_LOG keeps."""
    lines: list[str] = []
    _LOG_CAPTURES[id(lines)] = lines
    try:
        yield lines
    finally:
        del _LOG_CAPTURES[id(lines)]


_BUFFER_LINE = re.compile(r"(\S+) model buffer size\s*=\s*([0-9.]+) MiB")


def weight_buffers(lines: Iterable[str]) -> dict[str, float]:
    """Buffer type -> MiB of weights, from llama.cpp's load lines such as
    "load_tensors:   CPU_REPACK model buffer size =    56.95 MiB". CPU_REPACK: weights repacked for the batched
    kernels (extra buffer types); CPU_Mapped: used in place from the mmapped file; CUDA0: on that GPU."""
    sizes: dict[str, float] = {}
    for line in lines:
        m = _BUFFER_LINE.search(line)
        if m:
            sizes[m[1]] = sizes.get(m[1], 0.0) + float(m[2])
    return sizes


lc.llama_log_set(_log_callback, ctypes.c_void_p(0))


def _recent_llama_errors() -> str:
    lines = [ln for ln in _LLAMA_LOG if "error" in ln.lower() or "failed" in ln.lower()]
    return "; ".join(lines[-3:]) or "no details in the llama.cpp log"


@dataclass(frozen=True)
class DecodeOutput:
    """Per-node results of one decode call."""

    logits: np.ndarray  # [n, n_vocab] float32
    hidden: np.ndarray  # [n, n_embd] float32, post-final-norm state the lm_head consumes
    features: np.ndarray | None = None  # [n_tokens, len(taps) * n_embd] float32 with layer taps on, else None


def cpp_function(names: Sequence[str], argtypes: list, restype, what: str):
    """A libllama function declared in a C++ header (src/llama-ext.h), so exported under its Itanium-mangled name;
    `names` lists the C name first. BackendError saying what this build cannot do (`what`) when none is there."""
    lib = lc.llama_cpp._lib
    for name in names:
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.argtypes, fn.restype = argtypes, restype
            return fn
    raise BackendError(f"{lib._name} exports none of {', '.join(names)}; this llama.cpp build cannot {what}")


def layer_input_functions():
    """(llama_set_embeddings_layer_inp, llama_get_embeddings_layer_inp): tap the input of decoder layer `l`."""
    set_fn = cpp_function(("llama_set_embeddings_layer_inp", "_Z30llama_set_embeddings_layer_inpP13llama_contextjb"),
                          [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_bool], None, "tap layer inputs")
    get_fn = cpp_function(("llama_get_embeddings_layer_inp", "_Z30llama_get_embeddings_layer_inpP13llama_contextj"),
                          [ctypes.c_void_p, ctypes.c_uint32], ctypes.POINTER(ctypes.c_float), "tap layer inputs")
    return set_fn, get_fn


@dataclass(frozen=True)
class _PendingTree:
    parents: tuple[int, ...]
    depths: tuple[int, ...]
    leaf_seq: tuple[int, ...]  # for each node, one leaf sequence whose path runs through it
    leaves: tuple[int, ...]  # the leaf sequence ids
    call: int  # the decode call that wrote its cells (Backend._calls)
    at_end: bool  # its cells were the last ones that call wrote
    tokens: tuple[int, ...] = ()


@dataclass
class SeqState:
    """One text in the KV cache: its sequence id, its tokens and the tree decoded after it last, if any."""

    seq: int
    tree: _PendingTree | None = None
    tokens: list[int] = field(default_factory=list)  # the text's committed tokens, position by position

    @property
    def n_past(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class Work:
    """One text's part of a `decode_batch` call: a chain kept in the text (`parents` None: a prompt chunk, a plain
    step) or a tree after it, to `commit` next. `outputs`: a chain's rows whose logits and hidden states come back,
    "all", "last" or "none"; a tree's rows all come back."""

    state: SeqState
    tokens: Sequence[int]
    parents: Sequence[int] | None = None
    outputs: str = "all"


def default_threads() -> int:
    """Threads when N_THREADS is unset: every CPU up to 4, half of them beyond (hyperthreads rarely help).

    llama.cpp's own default is 4 whatever the machine, which oversubscribes a 2-core box."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return n if n <= 4 else n // 2


def tree_depths(parents: Sequence[int]) -> list[int]:
    """Depth of each node (0 for a root). Parents must come before their children."""
    depths: list[int] = []
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"parent of node {i} is {p}; it must be -1 (root) or an earlier node")
        depths.append(0 if p < 0 else depths[p] + 1)
    return depths


def prefill_spans(n: int) -> list[tuple[int, int]]:
    """The calls (start, stop) that prefill a prompt of n tokens: chunks of EXACT_BATCH; only the last one returns
    outputs. Small calls keep every prompt token's cells and outputs independent of what else the cache holds, so
    a prompt served next to others gives what it gives alone (about 5% slower than chunks of 512 here)."""
    return [(start, min(start + EXACT_BATCH, n)) for start in range(0, n, EXACT_BATCH)]


def _common_prefix(a: Sequence[int], b: Sequence[int], cap: int) -> int:
    n = min(len(a), len(b), cap)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return max(n, 0)


def tree_leaves(parents: Sequence[int]) -> list[int]:
    """The nodes no other node has as parent."""
    is_leaf = [True] * len(parents)
    for p in parents:
        if p >= 0:
            is_leaf[p] = False
    return [i for i, leaf in enumerate(is_leaf) if leaf]


def tree_sequences(parents: Sequence[int], leaf_ids: Sequence[int]) -> list[list[int]]:
    """The sequence ids of each node: those of the leaves below it, leaf k (tree_leaves order) being leaf_ids[k]."""
    seq_sets: list[list[int]] = [[] for _ in parents]
    for seq, leaf in zip(leaf_ids, tree_leaves(parents)):
        for node in path_to(parents, leaf):
            seq_sets[node].append(seq)
    return seq_sets


# KV cache element types by name (ggml_type ids, ggml.h).
KV_GGML_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "bf16": 30}


def resolve_kv_type(requested: str, attention_on_cpu: bool) -> tuple[str, str]:
    """The KV cache type a context gets, and why (for the log).

    ggml's CPU flash attention has a split-KV path for a single query row over >= 512 cells, taken only with f16
    or f32 caches; rows of a tree never take it. Its sums run in another order, so from about 256 tokens of
    context a token decoded alone and the same token in a tree differ (logits by up to ~1 on the default model,
    measured), and greedy Medusa output could leave plain decoding's. A bf16 (or q8_0) cache sends both through
    the same path. bf16 costs about as much as f16 on an AVX512-BF16 CPU at short contexts and up to ~17% per
    plain step at 2048 (the split path's threads are lost); q8_0 costs more. On a GPU the CPU paths do not apply.
    """
    if requested != "auto":
        return requested, f"KV_TYPE={requested}"
    if attention_on_cpu:
        return "bf16", ("auto: attention runs on the CPU, where an f16 cache makes single-token decoding differ "
                        "from tree decoding from 512 cells on; bf16 keeps them bit-identical (KV_TYPE=f16 to override)")
    return "f16", "auto: attention runs on a GPU"


def path_to(parents: Sequence[int], node: int) -> list[int]:
    """Node indices from the root down to `node`, inclusive."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


_REPACK_INVARIANT: dict[tuple, bool] = {}  # (model path, size, gpu layers) -> repacked weights are batch-invariant


class Backend:
    """One llama.cpp model and context. Not thread-safe: one thread at a time (batching.py serves many requests
    from one Backend through one thread at a time)."""

    def __init__(
        self,
        settings: Settings,
        *,
        n_batch: int = DEFAULT_N_BATCH,
        flash_attn: bool = True,
        streams: int = 0,
        slots: int = 1,
    ) -> None:
        """`streams` > 0 builds a context for that many independent sequences (`greedy_batch`), each with its own
        n_ctx / streams cells: attention then skips the other streams' cells. Such a context cannot decode trees.
        `slots` texts of up to n_ctx tokens each share one unified cache (`states`, `decode_batch`)."""
        self._model = self._ctx = self._batch = None  # close() may run after a failed __init__
        self.settings = settings
        self.model_path: Path = resolve_model_path(settings.base_model_path)
        self.info: GGUFInfo = inspect_gguf(self.model_path)
        self.n_batch = n_batch
        self.streams = streams
        if not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"slots={slots}: a context holds 1 to {MAX_SLOTS} texts")
        self.slots = slots
        # sequence ids: the texts 0..slots-1, then the leaves of pending trees, then the trash
        self.n_seq_max = streams or min(LLAMA_MAX_SEQ, slots + max(MAX_TREE_LEAVES, 8 * slots) + 1)
        self.trash_seq = self.n_seq_max - 1
        self._free_leaves = deque(range(slots, self.trash_seq))
        if n_batch < self.n_seq_max:  # llama.cpp reserves one output per sequence and aborts the process otherwise
            raise ValueError(f"n_batch={n_batch} is below the context's {self.n_seq_max} sequences; it must be at least "
                             f"{self.n_seq_max}")
        self.flash_attn = flash_attn
        self.n_threads = settings.n_threads or default_threads()  # CPU threads of every decode
        self._load_model()
        on_cpu = settings.n_gpu_layers == 0 or not lc.llama_supports_gpu_offload()
        self.kv_type, self.kv_reason = resolve_kv_type(settings.kv_type, on_cpu)
        self._states = [SeqState(s) for s in range(slots)]
        self._main = self._states[0]
        self._new_context()
        self.taps: tuple[int, ...] = ()  # layers whose inputs every decode returns (tap_layers)
        self._taps_fn = None
        self.extra_bufts_note = self._check_repacked_weights()
        log.info(
            "loaded %s (%s, %.1f MB, vocab %d, width %d, %d layers%s) n_ctx=%d threads=%s gpu_layers=%d "
            "weight buffers: %s%s; KV cache %s (%s)",
            self.model_path, self.info.architecture, self.info.size_bytes / 1e6, self.n_vocab, self.n_embd,
            self.n_layer, f", sliding window {self.n_swa}" if self.n_swa else "", self.n_ctx, self.n_threads,
            settings.n_gpu_layers, ", ".join(f"{k} {v:.1f} MiB" for k, v in self.weight_buffers.items()) or "not reported",
            f" ({self.extra_bufts_note})" if self.extra_bufts_note else "", self.kv_type, self.kv_reason,
        )

    # -- loading ---------------------------------------------------------------------------------------------

    def _load_model(self, extra_bufts: bool | None = None) -> None:
        params = lc.llama_model_default_params()
        params.n_gpu_layers = self.settings.n_gpu_layers if self.settings.n_gpu_layers >= 0 else 2**31 - 1
        params.use_mmap = self.settings.use_mmap
        params.use_mlock = self.settings.use_mlock
        params.use_extra_bufts = self.settings.use_extra_bufts is not False if extra_bufts is None else extra_bufts
        self.extra_bufts = bool(params.use_extra_bufts)
        with _capture_llama_log() as lines:
            self._model = lc.llama_model_load_from_file(str(self.model_path).encode(), params)
        if not self._model:
            raise BackendError(f"llama.cpp could not load {self.model_path}: {_recent_llama_errors()}")
        # Buffer type -> MiB of weights, e.g. {"CPU_Mapped": 85.3, "CPU_REPACK": 57.0} for Q4_0 with extra bufts.
        self.weight_buffers: dict[str, float] = weight_buffers(lines)
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        self.n_embd = lc.llama_model_n_embd(self._model)
        self.n_layer = lc.llama_model_n_layer(self._model)
        self.n_ctx_train = lc.llama_model_n_ctx_train(self._model)
        self.n_swa = lc.llama_model_n_swa(self._model)  # sliding-window attention's window (0: none)

    def _new_context(self) -> None:
        params = lc.llama_context_default_params()
        # The user-visible window is settings.n_ctx per text; the slack cells hold trash until the next compaction.
        cells = self.settings.n_ctx * self.slots
        params.n_ctx = cells + (0 if self.streams else max(128, cells // 8))
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = self.n_seq_max
        params.kv_unified = not self.streams
        params.embeddings = True
        params.pooling_type = lc.LLAMA_POOLING_TYPE_NONE
        params.flash_attn_type = (
            lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.n_threads = params.n_threads_batch = self.n_threads
        params.no_perf = True
        params.type_k = params.type_v = KV_GGML_TYPES[self.kv_type]
        self._ctx = lc.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise BackendError(f"llama.cpp could not create a context for {self.model_path}: {_recent_llama_errors()}")
        self._mem = lc.llama_get_memory(self._ctx)
        self.n_ctx = self.settings.n_ctx
        self._n_cells = lc.llama_n_ctx(self._ctx)
        self._used = 0  # cells from the start of the cache up to the last used one (texts, trash, pending trees)
        self._calls = 0  # decode_batch calls so far
        self.compactions = 0
        self._batch = lc.llama_batch_init(self.n_batch, 0, self.n_seq_max)

    def _check_repacked_weights(self) -> str:
        """USE_EXTRA_BUFTS=auto: repacked weights must not make a batched call differ from single-token decoding.
        Q4_0's repacked kernels pass here; Q4_K's (8x8 gemm from 4 rows on, gemv below) do not, so such a model is
        loaded again without the extra buffer types. Returns what was decided, for the log; '' when nothing was."""
        if self.settings.use_extra_bufts is not None or "CPU_REPACK" not in self.weight_buffers:
            return ""
        repacked = self.weight_buffers["CPU_REPACK"]
        key = (str(self.model_path), self.info.size_bytes, self.settings.n_gpu_layers)
        if key not in _REPACK_INVARIANT:
            if self.streams:  # independent streams cannot run the probe: a context of one text can
                with Backend(dataclasses.replace(self.settings, n_ctx=256), n_batch=64) as probe:
                    _REPACK_INVARIANT[key] = probe.extra_bufts
            else:
                _REPACK_INVARIANT[key] = self.batch_invariant()
        if _REPACK_INVARIANT[key]:
            return "repacked weights checked: a batched call equals single-token decoding"
        log.info("the repacked weights (CPU_REPACK %.1f MiB) make a batched call differ from single-token decoding; "
                 "loading %s again without llama.cpp's extra buffer types (USE_EXTRA_BUFTS=true keeps them)",
                 repacked, self.model_path.name)
        self.close()
        self._load_model(extra_bufts=False)
        self._new_context()
        return f"no repacking: with CPU_REPACK {repacked:.1f} MiB a batched call differed from single-token decoding"

    def batch_invariant(self, n: int = 12) -> bool:
        """Whether the last of `n` tokens decoded in one call gets the logits it gets when every token is decoded
        alone (what trees and batched slots rely on). Leaves the cache empty."""
        tokens = self.tokenize("The river runs past the old mill, under two bridges and into the sea.")[:n]
        together = self.prefill(tokens).logits[-1]
        self.prefill(tokens[:1])
        for t in tokens[1:]:
            alone = self.append([t]).logits[-1]
        self.reset()
        return bool(np.array_equal(together, alone))

    def close(self) -> None:
        if self._batch is not None:
            lc.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            lc.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            lc.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter exit the llama_cpp module may already be torn down
            pass

    # -- text ------------------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise BackendError(f"tokenization failed for a text of {len(data)} bytes")
        return list(buf[:n])

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        """The raw bytes of one token; a multi-byte character may span several tokens."""
        buf = ctypes.create_string_buffer(64)
        n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        """End of generation: EOS, EOT and the like."""
        return bool(lc.llama_vocab_is_eog(self._vocab, token))

    @property
    def has_chat_template(self) -> bool:
        """Whether the GGUF holds a chat template: an instruction-tuned model. A base model has none and continues text."""
        return bool(lc.llama_model_chat_template(self._model, None))

    def render(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """The text the model reads for these messages, where training data and benchmark prompts are made: the chat
        template's rendering; for a base model the contents one after another, so a user turn is a prompt and an
        assistant turn its continuation. Serving stays strict (`apply_chat_template`): a chat for a base model is
        refused there, not guessed."""
        if self.has_chat_template:
            return self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return "".join(m["content"] for m in messages)

    def apply_chat_template(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Render chat messages with the template stored in the GGUF file."""
        tmpl = lc.llama_model_chat_template(self._model, None)
        if not tmpl:
            raise NoChatTemplate(f"{self.model_path.name} has no chat template (a base model: it continues text); "
                                 f"send a plain prompt instead (/v1/completions, or --raw on the command line)")
        encoded = [(m["role"].encode(), m["content"].encode()) for m in messages]
        chat = (lc.llama_chat_message * len(encoded))(*[lc.llama_chat_message(r, c) for r, c in encoded])
        cap = 2 * sum(len(r) + len(c) for r, c in encoded) + 256
        for _ in range(2):
            buf = ctypes.create_string_buffer(cap)
            n = lc.llama_chat_apply_template(tmpl, chat, len(encoded), add_generation_prompt, buf, cap)
            if n < 0:
                raise BackendError(f"llama.cpp does not support the chat template of {self.model_path}")
            if n <= cap:
                return buf.raw[:n].decode("utf-8")
            cap = n
        raise BackendError("chat template output kept growing")  # unreachable in practice

    # -- decoding --------------------------------------------------------------------------------------------

    def _fill_batch(self, tokens: Sequence[int], positions: Sequence[int], seq_sets: Sequence[Sequence[int]]) -> None:
        b = self._batch
        for i, (tok, pos, seqs) in enumerate(zip(tokens, positions, seq_sets)):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = len(seqs)
            for j, s in enumerate(seqs):
                b.seq_id[i][j] = s
            b.logits[i] = True
        b.n_tokens = len(tokens)

    def _run_batch(self, n: int) -> None:
        """llama_decode the filled batch of n tokens; its error codes become exceptions that say what happened."""
        rc = lc.llama_decode(self._ctx, self._batch)
        if rc == 1:
            raise ContextLengthError(f"no room in the KV cache (n_ctx={self.n_ctx}) for {n} more tokens")
        if rc != 0:
            raise BackendError(f"llama_decode failed with code {rc}: {_recent_llama_errors()}")

    def _decode(self, n: int, *, want_logits: bool = True) -> DecodeOutput:
        self._run_batch(n)
        logits = (
            np.ctypeslib.as_array(lc.llama_get_logits(self._ctx), shape=(n, self.n_vocab)).copy()
            if want_logits
            else np.empty((n, 0), dtype=np.float32)
        )
        hidden = np.ctypeslib.as_array(lc.llama_get_embeddings(self._ctx), shape=(n, self.n_embd)).copy()
        return DecodeOutput(logits=logits, hidden=hidden, features=self._read_taps(n))

    def tap_layers(self, layers: Sequence[int]) -> None:
        """From now on every decode also returns the inputs of these decoder layers (llama.cpp's layer-input ids,
        medusa_gguf/features.py), side by side per token in this order, as DecodeOutput.features; () stops it.
        llama.cpp aborts the process on a layer id it lacks, so ids are checked here."""
        layers = tuple(int(lid) for lid in layers)
        bad = [lid for lid in layers if not 0 <= lid < self.n_layer]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(f"layer taps {layers}: ids must be distinct and lie in 0..{self.n_layer - 1} "
                             f"(the model has {self.n_layer} layers)")
        if self._taps_fn is None:
            self._taps_fn = layer_input_functions()
        set_fn = self._taps_fn[0]
        for lid in self.taps:
            set_fn(self._ctx, lid, False)
        for lid in layers:
            set_fn(self._ctx, lid, True)
        self.taps = layers

    def _read_taps(self, n_tokens: int) -> np.ndarray | None:
        """[n_tokens, len(taps) * n_embd] of the last call: llama.cpp copies a tapped input for every token of the
        call, outputs or not, into a buffer the next call overwrites."""
        if not self.taps:
            return None
        get_fn, w = self._taps_fn[1], self.n_embd
        out = np.empty((n_tokens, len(self.taps) * w), dtype=np.float32)
        for k, lid in enumerate(self.taps):
            ptr = get_fn(self._ctx, lid)
            if not ptr:
                raise BackendError(f"llama.cpp returned no input for tapped layer {lid}")
            out[:, k * w : (k + 1) * w] = np.ctypeslib.as_array(ptr, shape=(n_tokens, w))
        return out

    # -- the texts in the cache ------------------------------------------------------------------------------

    @property
    def n_past(self) -> int:
        """Tokens of the main text (slot 0), the one the single-text methods below decode."""
        return self._main.n_past

    @property
    def states(self) -> tuple[SeqState, ...]:
        """One per slot: state s is the text of sequence s."""
        return tuple(self._states)

    def check_room(self, state: SeqState, n_new: int) -> None:
        """ContextLengthError unless `n_new` more positions fit this text's window."""
        if state.n_past + n_new > self.n_ctx:
            raise ContextLengthError(
                f"{state.n_past} tokens in context + {n_new} new = {state.n_past + n_new} exceeds n_ctx={self.n_ctx} "
                f"(raise N_CTX, up to the model's training context {self.n_ctx_train})"
            )

    def reserve(self, n_cells: int) -> int:
        """Make room for `n_cells` more cells if it takes a compaction and one is possible now (no tree waits for
        its commit); returns the cells free after the last used one. Compacts early, too, once the trash outgrows
        the texts (and COMPACT_TRASH cells): every token's attention walks the cache up to its last used cell, and
        llama.cpp builds each call's mask over that range, so a long trash costs every step of every text."""
        live = sum(st.n_past for st in self._states)
        full = self._used + n_cells > self._n_cells
        if (full or self._used - live > max(COMPACT_TRASH, live)) and not any(st.tree for st in self._states):
            self._compact()
        return self._n_cells - self._used

    def _make_room(self, n_cells: int) -> None:
        """Compact when `n_cells` more cells would not fit after the last used one."""
        if self._used + n_cells <= self._n_cells:
            return
        if any(st.tree is not None for st in self._states):
            raise BackendError("the KV cache is full and a tree is still waiting for its commit; commit first")
        self._compact()

    def _compact(self) -> None:
        """Drop the trash: save every text, clear the cache, restore them into contiguous cells (order kept)."""
        saved = []
        for st in self._states:
            if st.n_past:
                size = lc.llama_state_seq_get_size(self._ctx, st.seq)
                buf = (ctypes.c_uint8 * size)()
                saved.append((st, buf, lc.llama_state_seq_get_data(self._ctx, buf, size, st.seq)))
        trash = self._used - sum(st.n_past for st in self._states)
        lc.llama_memory_clear(self._mem, True)
        self._used = 0
        for st, buf, written in saved:
            if written == 0 or lc.llama_state_seq_set_data(self._ctx, buf, written, st.seq) == 0:
                self.reset()
                raise BackendError(f"KV compaction failed: {_recent_llama_errors()}; the context was reset")
            self._used += st.n_past
        log.debug("compacted the KV cache: %d trash cells freed, %d texts kept", trash, len(saved))
        self.compactions += 1

    def reset(self) -> None:
        """Forget everything: empty KV cache, every text empty."""
        lc.llama_memory_clear(self._mem, True)
        for st in self._states:
            st.tokens, st.tree = [], None
        self._used = 0

    def release(self, state: SeqState) -> None:
        """Empty one text. Its cells join the trash (a hole would break the others' cell order), unless no other
        text holds any: then the cache is simply cleared."""
        self._discard(state)
        if not any(st.n_past or st.tree for st in self._states if st is not state):
            self.reset()
            return
        if state.n_past:
            lc.llama_memory_seq_cp(self._mem, state.seq, self.trash_seq, -1, -1)
            lc.llama_memory_seq_rm(self._mem, state.seq, -1, -1)
        state.tokens = []

    def decode_batch(self, works: Sequence[Work]) -> list[DecodeOutput | None]:
        """One llama_decode for several texts' chains and trees (at most EXACT_BATCH tokens when cells are kept for
        later steps, so each row's results are those it gets alone); per work its outputs (None for a chain
        with outputs "none"). A call where no work wants outputs runs silently: no lm_head, embeddings off.
        With layer taps on, each output carries the features of every one of its tokens."""
        if not works:
            return []
        seen: set[int] = set()
        rows: list[tuple[int, int, Sequence[int]]] = []  # token, position, sequence ids
        trees: list[tuple[SeqState, tuple, tuple, list[int], list[int]]] = []
        taken: list[int] = []  # leaf ids of this call's trees, given back if it fails
        try:
            return self._decode_batch(works, seen, rows, trees, taken)
        except BaseException:
            self._free_leaves.extend(taken)
            for st, *_ in trees:
                st.tree = None
            raise

    @property
    def free_leaves(self) -> int:
        """Leaf sequences free for the trees of the next calls (pending trees hold theirs until their commit)."""
        return len(self._free_leaves)

    def _take_leaves(self, n: int, taken: list[int]) -> list[int]:
        if n > len(self._free_leaves):
            raise ValueError(f"a tree with {n} leaves: only {len(self._free_leaves)} leaf sequences are free "
                             f"(pending trees hold the others until their commit)")
        ids = [self._free_leaves.popleft() for _ in range(n)]
        taken.extend(ids)
        return ids

    def _decode_batch(self, works, seen, rows, trees, taken) -> list[DecodeOutput | None]:
        for w in works:
            st = w.state
            if st.seq in seen:
                raise ValueError(f"two works for text {st.seq} in one call")
            seen.add(st.seq)
            self._discard(st)
            if not w.tokens:
                raise ValueError("a work without tokens")
            if w.parents is None:
                self.check_room(st, len(w.tokens))
                rows += [(t, st.n_past + i, (st.seq,)) for i, t in enumerate(w.tokens)]
                continue
            if self.streams:
                raise BackendError("this backend was built for independent streams (greedy_batch); it cannot "
                                   "decode trees")
            if not self.flash_attn:
                raise BackendError(
                    "tree decoding needs flash attention: without it llama.cpp's CPU matmuls are not batch-invariant, "
                    "so a tree node would not reproduce plain decoding"
                )
            if len(w.tokens) != len(w.parents):
                raise ValueError(f"a tree needs as many parents as tokens (got {len(w.tokens)} and {len(w.parents)})")
            depths = tree_depths(w.parents)
            self.check_room(st, max(depths) + 1)
            n_leaves = len(tree_leaves(w.parents))
            if n_leaves > MAX_TREE_LEAVES:
                raise ValueError(f"a tree with {n_leaves} leaves exceeds the limit of {MAX_TREE_LEAVES}")
            leaves = self._take_leaves(n_leaves, taken)
            seq_sets = tree_sequences(w.parents, leaves)
            trees.append((st, tuple(w.parents), tuple(depths), [s[0] for s in seq_sets], leaves))
            rows += [(t, st.n_past + d, s) for t, d, s in zip(w.tokens, depths, seq_sets)]
        if len(rows) > min(self.n_batch, EXACT_BATCH if trees else self.n_batch):
            raise ValueError(f"{len(rows)} tokens in one call exceed the limit of "
                             f"{EXACT_BATCH if trees else self.n_batch}")
        self._make_room(len(rows))
        for st, *_, leaves in trees:
            for seq in leaves:
                lc.llama_memory_seq_cp(self._mem, st.seq, seq, -1, -1)
        silent = all(w.parents is None and w.outputs == "none" for w in works)
        if silent:
            self._run_silent([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
        else:
            self._fill_batch([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
            try:
                self._run_batch(len(rows))
            except BackendError:
                for seq in taken:
                    lc.llama_memory_seq_rm(self._mem, seq, -1, -1)
                raise
        self._used += len(rows)
        self._calls += 1
        features = self._read_taps(len(rows))
        results: list[DecodeOutput | None] = []
        row, tree_of = 0, {id(t[0]): t for t in trees}
        for k, w in enumerate(works):
            n, st = len(w.tokens), w.state
            if w.parents is not None:
                _, parents, depths, leaf_seq, leaves = tree_of[id(st)]
                st.tree = _PendingTree(parents, depths, tuple(leaf_seq), tuple(leaves), self._calls,
                                       at_end=k == len(works) - 1, tokens=tuple(w.tokens))
            else:
                st.tokens.extend(w.tokens)
            wanted = {"all": range(row, row + n), "last": range(row + n - 1, row + n)}.get(
                "all" if w.parents is not None else w.outputs)
            feats = features[row : row + n] if features is not None else None
            results.append(None if wanted is None or silent else DecodeOutput(
                logits=self._rows(lc.llama_get_logits, wanted, self.n_vocab),
                hidden=self._rows(lc.llama_get_embeddings, wanted, self.n_embd), features=feats))
            if wanted is None and feats is not None:
                results[-1] = DecodeOutput(np.empty((0, 0), np.float32), np.empty((0, 0), np.float32), feats)
            row += n
        return results

    def _rows(self, getter, rows: range, width: int) -> np.ndarray:
        """Rows of the last call's output buffer (every row is an output when embeddings are on)."""
        return np.ctypeslib.as_array(getter(self._ctx), shape=(rows.stop, width))[rows.start :].copy()

    def commit_seq(self, state: SeqState, node: int) -> int:
        """Keep the root-to-`node` path of the text's last tree and discard the rest; -1 keeps nothing.

        Returns the number of tokens committed. Discarded nodes join the trash, except those after the last kept
        one when the tree's cells are still the cache's last ones: those are freed."""
        tree = state.tree
        if tree is None:
            raise BackendError("commit() needs a decode_tree() first")
        if not -1 <= node < len(tree.parents):
            raise ValueError(f"node {node} is not in the tree of {len(tree.parents)} nodes")
        kept = path_to(tree.parents, node) if node >= 0 else []
        if kept:
            lc.llama_memory_seq_cp(self._mem, tree.leaf_seq[node], state.seq, state.n_past, state.n_past + len(kept))
        at_end = tree.at_end and tree.call == self._calls
        last_kept = kept[-1] if kept else -1
        kept_set = set(kept)
        for i in range(len(tree.parents) if not at_end else last_kept):
            if i not in kept_set:  # batch order is cell order: such a node's cell lies before a kept one
                pos = state.n_past + tree.depths[i]
                lc.llama_memory_seq_cp(self._mem, tree.leaf_seq[i], self.trash_seq, pos, pos + 1)
        if at_end:
            self._used -= len(tree.parents) - 1 - last_kept
        self._discard(state)
        state.tokens.extend(tree.tokens[i] for i in kept)
        return len(kept)

    def discard_tree(self, state: SeqState) -> None:
        """Drop the text's pending tree, if any (a generation that ended between decode_tree and commit)."""
        self._discard(state)

    def _discard(self, state: SeqState) -> None:
        """Drop the leaf sequences of the text's pending tree (cells only they hold are freed)."""
        if state.tree is not None:
            for seq in state.tree.leaves:
                lc.llama_memory_seq_rm(self._mem, seq, -1, -1)
            self._free_leaves.extend(state.tree.leaves)
            state.tree = None

    # -- one text: the main one ------------------------------------------------------------------------------

    def prefill(self, tokens: Sequence[int]) -> DecodeOutput:
        """Start a new text: clear the cache, decode `tokens` into seq 0; return the LAST token's outputs (and, with
        layer taps on, the features of EVERY token). Only the last call (prefill_spans) outputs anything."""
        if not tokens:
            raise ValueError("cannot prefill an empty prompt")
        if len(tokens) > self.n_ctx:
            raise ContextLengthError(f"prompt of {len(tokens)} tokens exceeds the context window n_ctx={self.n_ctx}")
        self.reset()
        *silent, (start, stop) = prefill_spans(len(tokens))
        features = []
        for a, b in silent:
            (out,) = self.decode_batch([Work(self._main, tokens[a:b], outputs="none")])
            features.append(out.features if out is not None else None)
        (out,) = self.decode_batch([Work(self._main, tokens[start:stop], outputs="last")])
        return DecodeOutput(logits=out.logits, hidden=out.hidden,
                            features=np.concatenate(features + [out.features]) if self.taps else None)

    def decode_taps(self, tokens: Sequence[int], positions: Sequence[int],
                    seqs: Sequence[tuple[int, ...]]) -> np.ndarray:
        """One raw call for feature extraction, its cells left for the caller to clear: the tapped layers' inputs
        [n, len(taps) * n_embd]. Taps are copied for every token, outputs or not, so no token asks for one and
        llama.cpp skips the lm_head (a quarter of the default model's work per token)."""
        if not self.taps:
            raise BackendError("decode_taps needs layer taps on (tap_layers)")
        self._run_silent(tokens, positions, seqs)
        return self._read_taps(len(tokens))

    def _run_silent(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[tuple[int, ...]]) -> None:
        """One call with no outputs: embeddings off (they force an output per token) and no token marked for
        logits, so llama.cpp skips the lm_head."""
        self._fill_batch(tokens, positions, seqs)
        for i in range(len(tokens)):
            self._batch.logits[i] = False
        lc.llama_set_embeddings(self._ctx, False)
        try:
            self._run_batch(len(tokens))
        finally:
            lc.llama_set_embeddings(self._ctx, True)

    def append(self, tokens: Sequence[int]) -> DecodeOutput:
        """Decode a chain of tokens onto seq 0 and keep it; outputs for every token."""
        if len(tokens) > self.n_batch:
            raise ValueError(f"{len(tokens)} tokens exceed the batch size {self.n_batch}; split them")
        return self.decode_batch([Work(self._main, tokens)])[0]

    def decode_tree(self, tokens: Sequence[int], parents: Sequence[int]) -> DecodeOutput:
        """Decode a token tree after the committed prefix, in one llama_decode call.

        tokens[i] sits at position n_past + depth(i); parents[i] is -1 for a root or an earlier node index.
        Each node attends to the committed prefix and its own ancestors only. Follow with `commit`.
        """
        if len(tokens) != len(parents) or not tokens:
            raise ValueError(f"a tree needs as many parents as tokens (got {len(tokens)} and {len(parents)})")
        if len(tokens) > EXACT_BATCH:
            raise ValueError(f"a tree of {len(tokens)} nodes exceeds the limit of {EXACT_BATCH}")
        return self.decode_batch([Work(self._main, tokens, parents)])[0]

    def commit(self, node: int) -> int:
        """Keep the root-to-`node` path of the last tree in seq 0 and discard the rest; -1 keeps nothing.

        Returns the number of tokens committed.
        """
        return self.commit_seq(self._main, node)

    def rollback(self, n_past: int) -> None:
        """Forget committed tokens at positions >= n_past (their cells join the trash)."""
        self.trim(self._main, n_past)

    def trim(self, state: SeqState, n_past: int) -> None:
        """Forget a text's tokens at positions >= n_past (their cells join the trash)."""
        if not 0 <= n_past <= state.n_past:
            raise ValueError(f"cannot roll back to {n_past}: the context holds {state.n_past} tokens")
        self._discard(state)
        if n_past < state.n_past:
            lc.llama_memory_seq_cp(self._mem, state.seq, self.trash_seq, n_past, -1)
        if not lc.llama_memory_seq_rm(self._mem, state.seq, n_past, -1):
            raise BackendError(f"llama.cpp refused to remove positions >= {n_past}")
        del state.tokens[n_past:]

    def reuse_prefix(self, state: SeqState, tokens: Sequence[int]) -> int:
        """Start `state`'s new text `tokens` from the longest prefix of them that some text in the cache (its own
        old one included) already holds, short of the last token (whose outputs the caller needs): those cells
        are shared, not decoded again. Returns the tokens reused. A cell's contents depend only on the tokens up
        to it (every call is at most EXACT_BATCH tokens), so the result is bit-identical to decoding them."""
        cap = len(tokens) - 1
        best, k = state, _common_prefix(state.tokens, tokens, cap)
        for other in self._states:
            if other is not state and (n := _common_prefix(other.tokens, tokens, cap)) > k:
                best, k = other, n
        if best is state:
            self.trim(state, k) if k else self.release(state)
            return k
        self.release(state)
        lc.llama_memory_seq_cp(self._mem, best.seq, state.seq, 0, k)
        state.tokens = list(tokens[:k])
        return k

    def extract_hidden(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Final hidden states [len(seq), n_embd] for every token of every sequence, many sequences per call.

        Uses the leaf sequences as independent streams and clears the cache between batches, so it
        destroys the committed text. Sequences longer than the batch are decoded in consecutive chunks.
        """
        self.reset()
        results: list[np.ndarray | None] = [None] * len(sequences)
        group: list[int] = []
        used = 0
        for idx, seq in enumerate(sequences):
            if not seq:
                results[idx] = np.zeros((0, self.n_embd), dtype=np.float32)
                continue
            if len(seq) > self.n_ctx:
                raise ContextLengthError(f"sequence {idx} has {len(seq)} tokens, more than n_ctx={self.n_ctx}")
            if group and (used + len(seq) > EXACT_BATCH or len(group) == TRASH_SEQ):
                self._extract_group(sequences, group, results)
                group, used = [], 0
            group.append(idx)
            used += len(seq)
        if group:
            self._extract_group(sequences, group, results)
        return results  # type: ignore[return-value]

    def raw_prefill_tokens_per_s(self, tokens: Sequence[int], chunk: int = 512) -> float:
        """llama.cpp's plain batched prefill speed on this model, for comparison with `extract_hidden`: a fresh
        context with default settings (no embeddings, logits of the last token only), chunks of `chunk`."""
        params = lc.llama_context_default_params()
        params.n_ctx = len(tokens) + chunk
        params.n_batch = params.n_ubatch = chunk
        params.n_threads = params.n_threads_batch = self.n_threads
        ctx = lc.llama_init_from_model(self._model, params)
        if not ctx:
            raise BackendError(f"could not create a context: {_recent_llama_errors()}")
        batch = lc.llama_batch_init(chunk, 0, 1)
        try:
            t0 = time.perf_counter()
            for start in range(0, len(tokens), chunk):
                part = tokens[start : start + chunk]
                for i, tok in enumerate(part):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, start + i, 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = i == len(part) - 1
                batch.n_tokens = len(part)
                if lc.llama_decode(ctx, batch) != 0:
                    raise BackendError(f"raw prefill failed: {_recent_llama_errors()}")
            return len(tokens) / (time.perf_counter() - t0)
        finally:
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)

    def greedy_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations of many prompts at once, one stream per prompt (self-distillation).

        Each call decodes one token for every unfinished stream. Stops a stream at end-of-generation (not
        included) or after `max_new_tokens`. Destroys the committed text.
        """
        limit = self.streams or TRASH_SEQ
        if len(prompts) > limit:
            raise ValueError(f"at most {limit} prompts per call, got {len(prompts)}")
        per_stream = self._n_cells // self.streams if self.streams else self._n_cells // max(1, len(prompts))
        longest = max((len(p) for p in prompts), default=0) + max_new_tokens
        if longest > per_stream:
            raise ContextLengthError(f"a prompt needs {longest} KV cells with its answer; each stream has {per_stream}")
        self.reset()
        last: dict[int, np.ndarray] = {}  # stream -> logits of its last token
        rows = [(s, pos, tok) for s, p in enumerate(prompts) for pos, tok in enumerate(p)]
        for start in range(0, len(rows), self.n_batch):
            chunk = rows[start : start + self.n_batch]
            self._fill_batch([t for _, _, t in chunk], [p for _, p, _ in chunk], [(s,) for s, _, _ in chunk])
            ends = [i for i in range(len(chunk)) if i + 1 == len(chunk) or chunk[i + 1][0] != chunk[i][0]]
            last.update(zip((chunk[i][0] for i in ends), self._decode_rows(ends)))
        outputs: list[list[int]] = [[] for _ in prompts]
        active = [s for s, p in enumerate(prompts) if p]
        while active:
            nxt = {s: int(np.argmax(last[s])) for s in active}
            active = [s for s in active if not self.is_eog(nxt[s])]
            for s in active:
                outputs[s].append(nxt[s])
            active = [s for s in active if len(outputs[s]) < max_new_tokens]
            if not active:
                break
            self._fill_batch([nxt[s] for s in active], [len(prompts[s]) + len(outputs[s]) - 1 for s in active],
                             [(s,) for s in active])
            last.update(zip(active, self._decode_rows(range(len(active)))))
        lc.llama_memory_clear(self._mem, True)
        return outputs

    def _decode_rows(self, rows: Sequence[int]) -> np.ndarray:
        """llama_decode the filled batch; logits [len(rows), n_vocab] of the given batch rows.

        With embeddings on, llama.cpp outputs every row anyway; only the asked-for rows are copied.
        """
        self._run_batch(self._batch.n_tokens)
        return np.stack([
            np.ctypeslib.as_array(lc.llama_get_logits_ith(self._ctx, i), shape=(self.n_vocab,)).copy() for i in rows
        ])

    def _extract_group(self, sequences: Sequence[Sequence[int]], group: list[int], results: list) -> None:
        if len(group) == 1 and len(sequences[group[0]]) > EXACT_BATCH:
            seq = sequences[group[0]]
            chunks = [self.append(seq[s : s + EXACT_BATCH]).hidden for s in range(0, len(seq), EXACT_BATCH)]
            results[group[0]] = np.concatenate(chunks)
            self.reset()
            return
        tokens, positions, seqs, spans = [], [], [], []
        for stream, idx in enumerate(group):
            seq = sequences[idx]
            spans.append((idx, len(tokens), len(tokens) + len(seq)))
            tokens.extend(seq)
            positions.extend(range(len(seq)))
            seqs.extend([(stream,)] * len(seq))
        self._fill_batch(tokens, positions, seqs)
        out = self._decode(len(tokens), want_logits=False)
        for idx, a, b in spans:
            results[idx] = out.hidden[a:b]
        lc.llama_memory_clear(self._mem, True)


class PromptLookup:
    """llama-cpp-python's own n-gram drafter (`LlamaPromptLookupDecoding`), the nearest peer, for the benchmark.

    It runs on llama-cpp-python's high-level `Llama` with its own context; greedy only.
    """

    def __init__(self, settings: Settings, *, num_pred_tokens: int = 10, extra_bufts: bool | None = None) -> None:
        """`extra_bufts`: what a Backend of this model decided (Backend.extra_bufts), so that the peer runs the
        same kernels; None: the setting (auto counts as on)."""
        from llama_cpp import llama_cpp as low
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        path = resolve_model_path(settings.base_model_path)
        threads = settings.n_threads or default_threads()
        default_params = low.llama_model_default_params

        def patched():  # the high-level class has no switch for the extra buffer types (AMX, see Settings)
            params = default_params()
            params.use_extra_bufts = settings.use_extra_bufts is not False if extra_bufts is None else extra_bufts
            return params

        low.llama_model_default_params = patched
        try:
            self.llm = lc.Llama(
                str(path), n_ctx=settings.n_ctx, n_threads=threads, n_threads_batch=threads,
                n_gpu_layers=settings.n_gpu_layers, use_mmap=settings.use_mmap, use_mlock=settings.use_mlock,
                draft_model=LlamaPromptLookupDecoding(num_pred_tokens=num_pred_tokens), verbose=False,
            )
        finally:
            low.llama_model_default_params = default_params

    def generate(self, prompt_tokens: Sequence[int], max_tokens: int) -> list[int]:
        out: list[int] = []
        for token in self.llm.generate(list(prompt_tokens), temp=0.0, top_k=1, reset=True):
            if lc.llama_vocab_is_eog(self.llm._model.vocab, token):
                break
            out.append(int(token))
            if len(out) >= max_tokens:
                break
        return out

    def close(self) -> None:
        self.llm.close()


QUANT_TYPES = {"f16": lc.LLAMA_FTYPE_MOSTLY_F16, "q8_0": lc.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": lc.LLAMA_FTYPE_MOSTLY_Q4_0,
               "q4_k": lc.LLAMA_FTYPE_MOSTLY_Q4_K_M}


def quantize(src: Path, dst: Path, kind: str, n_threads: int = 0) -> None:
    """Write a copy of `src` with another weight type (llama_model_quantize; requantizing is allowed, so a copy
    of a 4-bit model keeps its 4-bit quality). For benchmarks on flatter cost curves."""
    if kind not in QUANT_TYPES:
        raise ValueError(f"unknown weight type {kind!r}; choose one of {', '.join(QUANT_TYPES)}")
    inspect_gguf(src)
    params = lc.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[kind]
    params.allow_requantize = True
    params.nthread = n_threads or default_threads()
    dst.parent.mkdir(parents=True, exist_ok=True)
    if lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise BackendError(f"quantizing {src} to {kind} failed: {_recent_llama_errors()}")
