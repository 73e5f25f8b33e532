"""Medusa heads: small residual blocks on the base model's final hidden state, scored by a (shared) projection.

Index convention: h_t is the final hidden state at position t; the base lm_head maps h_t to token t+1; Medusa
head k (k = 1..K, stored at index k-1) maps h_t to token t+1+k.

Two head types share everything but their input:
- "medusa": head k reads h_t alone, so one call scores every head and the tree is filled from each head's top-k.
- "dependent" (Hydra-style, like EAGLE's shifted tokens): head k reads h_t + M_k [e(t+1); ...; e(t+k)], the
  input embeddings of the tokens already fixed on its tree path (the root t+1, then the drafted ones), taken
  from the GGUF's token-embedding table and frozen. M_k starts at zero, so an untrained dependent head is
  exactly a Medusa head. The tree is drafted level by level: every node at depth d-1 is scored in one call.

A head is `num_layers` bottleneck residual blocks, x + W_up SiLU(W_down x) with W_down [hidden_dim, n_embd] and
W_up zero-initialised, so an untrained head is exactly the base lm_head. The projection is the base model's own
output matrix, read from the GGUF and frozen (not stored in the weights file), optionally restricted to a draft
vocabulary: the most frequent training targets, mapped back to full ids. `own_lm_head` trains one projection
per head instead (initialised from the base matrix, stored in the file).

Drafting (`draft`) runs on int8 copies of the weights by default (see _Int8Linear); training and `forward` stay
in fp32, and `draft_int8=False` drafts with the exact fp32 weights.

A weights file is `torch.save({"format": ..., "config": {...}, "state_dict": {...}})`, loaded with
`torch.load(weights_only=True)`: data, never code. `.safetensors` export/import carries the config as JSON.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .tree import Tree, node_tokens

log = logging.getLogger(__name__)

FORMAT = "medusa-gguf-heads/1"
_HAS_INT8_MM = hasattr(torch.ops.aten, "_weight_int8pack_mm")  # torch's int8-weight matmul; else drafts run in fp32


class HeadsError(ValueError):
    """A weights file that cannot be used; the message names the file and both sides of any mismatch."""


@dataclass(frozen=True)
class HeadsConfig:
    k_heads: int
    n_embd: int  # base model width
    n_vocab: int  # base model vocabulary
    hidden_dim: int  # bottleneck width of each residual block
    num_layers: int = 1
    head_type: str = "medusa"  # "medusa" (reads h_t) or "dependent" (also reads drafted tokens' embeddings)
    own_lm_head: bool = False
    draft_vocab_size: int = 0  # 0: full vocabulary
    mix_rank: int = 0  # dependent heads: 0 = full-rank M_k; r = M_k = B_k A_k with rank r (fewer bytes per draft)
    # "bottleneck": x + W_up SiLU(W_down x) (hidden_dim wide); "paper": x + SiLU(W x + b), W square, the Medusa
    # paper's block and the one vLLM and SGLang load (export_vllm)
    block: str = "bottleneck"
    base_model_name: str = ""
    base_model_sha256: str = ""
    # accuracy[k][r]: share of held-out positions where head k+1's rank-r candidate was the right token.
    accuracy: list[list[float]] = field(default_factory=list)
    training_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.k_heads < 1 or self.num_layers < 0 or self.hidden_dim < 1 or self.mix_rank < 0:
            raise HeadsError(f"invalid heads config: k_heads={self.k_heads} num_layers={self.num_layers} "
                             f"hidden_dim={self.hidden_dim} mix_rank={self.mix_rank}")
        if self.head_type not in ("medusa", "dependent"):
            raise HeadsError(f"unknown head_type {self.head_type!r}; expected 'medusa' or 'dependent'")
        if self.block not in BLOCKS:
            raise HeadsError(f"unknown block {self.block!r}; expected one of {', '.join(BLOCKS)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeadsConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


class ResBlock(nn.Module):
    """x + W_up SiLU(W_down x); W_up starts at zero, so the block starts as the identity."""

    def __init__(self, n_embd: int, hidden_dim: int) -> None:
        super().__init__()
        self.down = nn.Linear(n_embd, hidden_dim)
        self.up = nn.Linear(hidden_dim, n_embd)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., n_embd]
        return x + self.up(nn.functional.silu(self.down(x)))


class PaperBlock(nn.Module):
    """x + SiLU(W x + b), W square and zero at the start (the identity): the Medusa paper's residual block."""

    def __init__(self, n_embd: int, hidden_dim: int = 0) -> None:
        super().__init__()
        self.linear = nn.Linear(n_embd, n_embd)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


BLOCKS = {"bottleneck": ResBlock, "paper": PaperBlock}


class MedusaHeads(nn.Module):
    """K heads over a frozen projection. forward(h) -> logits [..., K, V_draft]."""

    def __init__(self, config: HeadsConfig, projection: torch.Tensor, draft_ids: torch.Tensor | None = None,
                 *, draft_int8: bool = True) -> None:
        super().__init__()
        self.config = config
        self.draft_int8 = draft_int8  # drafts with int8 weights (see _Int8Linear); False: exact fp32
        self._fast: _InferenceWeights | None = None  # built on the first draft
        c = config
        # A fresh module per head and per layer: `[block] * k` would repeat one module and share its weights.
        self.blocks = nn.ModuleList(
            nn.Sequential(*[BLOCKS[c.block](c.n_embd, c.hidden_dim) for _ in range(c.num_layers)])
            for _ in range(c.k_heads)
        )
        if draft_ids is None and c.draft_vocab_size:
            raise HeadsError("draft_vocab_size is set but no draft ids were given")
        ids = draft_ids if draft_ids is not None else torch.arange(c.n_vocab)
        self.register_buffer("draft_ids", ids.to(torch.long), persistent=True)  # [V_draft] -> full ids
        proj = projection[self.draft_ids].float()  # [V_draft, n_embd]
        if c.own_lm_head:
            self.lm_heads = nn.Parameter(proj.unsqueeze(0).repeat(c.k_heads, 1, 1))  # [K, V_draft, n_embd]
        else:
            self.register_buffer("projection", proj, persistent=False)  # frozen, rebuilt from the GGUF

    def features(self, hidden: torch.Tensor, future: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [..., n_embd] -> [..., K, n_embd]. Medusa heads ignore `future` (teacher tokens)."""
        return torch.stack([blocks(hidden) for blocks in self.blocks], dim=-2)

    def forward(self, hidden: torch.Tensor, future: torch.Tensor | None = None) -> torch.Tensor:  # -> [..., K, V_draft]
        """Logits of every head. `future` [..., >= K] holds tokens t+1..t+K (teacher forcing; dependent heads)."""
        return self._project(self.features(hidden, future))

    def _project(self, x: torch.Tensor, head: int | None = None) -> torch.Tensor:
        """x [..., K, n_embd] (or [..., n_embd] for one `head`) -> logits over the draft vocabulary."""
        if not self.config.own_lm_head:
            return x @ self.projection.T
        if head is not None:
            return x @ self.lm_heads[head].T
        return torch.einsum("...kd,kvd->...kv", x, self.lm_heads)  # lm_heads: [K, V_draft, n_embd]

    @torch.inference_mode()
    def draft(self, hidden: np.ndarray, root: int, tree: Tree) -> list[int]:
        """The token of every node of `tree`, root first: node (.., r) at depth d is head d's rank-r candidate."""
        if tree.depth == 0:
            return [int(root)]
        return node_tokens(tree, root, self.topk(hidden, max(tree.max_rank_per_depth), n_heads=tree.depth))

    @torch.inference_mode()
    def topk(self, hidden: np.ndarray, k: int, n_heads: int | None = None) -> np.ndarray:
        """Full-vocabulary ids of each head's k best candidates for one hidden state [n_embd] -> [K, k]."""
        fast = self._inference_weights()
        h = torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32)).unsqueeze(0)  # [1, n_embd]
        x = torch.cat([fast.block(i, h) for i in range(n_heads or self.config.k_heads)])  # [n, n_embd]
        idx = torch.topk(fast.logits(x), k, dim=-1).indices  # [n, k] in draft space
        return self.draft_ids[idx].numpy()

    def _inference_weights(self) -> "_InferenceWeights":
        """The weights laid out for drafting (int8 unless `draft_int8` is off), rebuilt whenever a parameter
        changed in place (training, load_state_dict) since the last call."""
        cached = self._fast
        if cached is not None and cached.int8 == self.draft_int8 and cached.versions == _versions(cached.params):
            return cached
        if self.draft_int8 and not _HAS_INT8_MM:
            log.warning("torch %s has no int8-weight matmul (aten._weight_int8pack_mm): the heads draft in fp32",
                        torch.__version__)
        linear = _Int8Linear if self.draft_int8 and _HAS_INT8_MM else _Linear
        with torch.no_grad():
            blocks = tuple(tuple((linear(b.linear.weight, b.linear.bias), None) if isinstance(b, PaperBlock)
                                 else (linear(b.down.weight, b.down.bias), linear(b.up.weight, b.up.bias))
                                 for b in self.blocks[k]) for k in range(self.config.k_heads))
            projections = tuple(linear(w, None) for w in self.lm_heads) if self.config.own_lm_head \
                else (linear(self.projection, None),)
            mix = tuple(tuple(linear(layer.weight, None) for layer in (m if isinstance(m, nn.Sequential) else [m]))
                        for m in getattr(self, "mix", ()))
        params = tuple(self.parameters())
        self._fast = _InferenceWeights(self.draft_int8, params, _versions(params), blocks, projections, mix)
        return self._fast

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything the weights file stores: the blocks, the draft ids, and own projections if any."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}


class DependentHeads(MedusaHeads):
    """Heads that also read the embeddings of the tokens fixed before them on the tree path (see the docstring)."""

    def __init__(self, config: HeadsConfig, projection: torch.Tensor, embeddings: torch.Tensor,
                 draft_ids: torch.Tensor | None = None, *, draft_int8: bool = True) -> None:
        super().__init__(config, projection, draft_ids, draft_int8=draft_int8)
        c = config
        if tuple(embeddings.shape) != (c.n_vocab, c.n_embd):
            raise HeadsError(f"token embeddings have shape {tuple(embeddings.shape)}; "
                             f"expected [{c.n_vocab}, {c.n_embd}]")
        # Frozen and not stored in the weights file: rebuilt from the GGUF. fp16 halves its memory.
        self.register_buffer("embeddings", embeddings.to(torch.float16), persistent=False)
        if c.mix_rank:  # M_k = B_k A_k: A_k [r, k * n_embd], B_k [n_embd, r] (zero)
            self.mix = nn.ModuleList(
                nn.Sequential(nn.Linear(k * c.n_embd, c.mix_rank, bias=False), nn.Linear(c.mix_rank, c.n_embd, bias=False))
                for k in range(1, c.k_heads + 1))
            for m in self.mix:
                nn.init.zeros_(m[1].weight)
        else:
            self.mix = nn.ModuleList(nn.Linear(k * c.n_embd, c.n_embd, bias=False) for k in range(1, c.k_heads + 1))
            for m in self.mix:
                nn.init.zeros_(m.weight)

    def head_input(self, head: int, hidden: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
        """Input of head `head` (0-based): hidden [..., n_embd] + M [e(path_1); ...; e(path_k)], path [..., k]."""
        e = self.embeddings[path.clamp(min=0)].float()  # [..., k, n_embd]; -1 (past the end) reads token 0
        return hidden + self.mix[head](e.flatten(-2))

    def features(self, hidden: torch.Tensor, future: torch.Tensor | None = None) -> torch.Tensor:
        if future is None:
            raise ValueError("dependent heads need the tokens t+1..t+K (teacher forcing) to score every head")
        k_heads = self.config.k_heads
        if future.shape[-1] < k_heads:
            raise ValueError(f"dependent heads need {k_heads} future tokens, got {future.shape[-1]}")
        return torch.stack([self.blocks[i](self.head_input(i, hidden, future[..., : i + 1].long()))
                            for i in range(k_heads)], dim=-2)

    @torch.inference_mode()
    def topk(self, hidden: np.ndarray, k: int, n_heads: int | None = None) -> np.ndarray:
        raise TypeError("dependent heads' candidates depend on the tree path; use draft(hidden, root, tree)")

    @torch.inference_mode()
    def draft(self, hidden: np.ndarray, root: int, tree: Tree) -> list[int]:
        """Level by level: the parents at depth d-1 are scored by head d in one batched call."""
        tokens = [int(root)] + [0] * (tree.n_nodes - 1)
        if tree.depth == 0:
            return tokens
        fast = self._inference_weights()
        h = torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32))  # [n_embd]
        paths = {0: [int(root)]}
        for i, level in enumerate(_levels(tree)):  # head i + 1 scores the nodes at depth i
            path = torch.tensor([paths[p] for p in level.parents])  # [P, i + 1]
            e = self.embeddings[path].flatten(1)  # [P, (i + 1) * n_embd]
            for linear in fast.mix[i]:  # M_k, or its factors A_k then B_k
                e = linear(e)
            x = fast.block(i, h + e)  # [P, n_embd]
            logits = fast.logits(x, i)
            ids = self.draft_ids[torch.topk(logits, level.max_rank, dim=-1).indices].tolist()  # [P, k] full ids
            for node, row, rank in level.children:
                tokens[node] = ids[row][rank]
                paths[node] = paths[level.parents[row]] + [tokens[node]]
        return tokens


class _Linear:
    """y = x W^T + b over a few rows, W pre-transposed: the exact fp32 drafting path."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:  # weight [out, in]
        self.weight_t = weight.detach().float().T.contiguous()  # [in, out]
        self.bias = None if bias is None else bias.detach().float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [n, in] -> [n, out] fp32
        y = x.float() @ self.weight_t
        return y if self.bias is None else y + self.bias


class _Int8Linear:
    """y = x W^T + b with W stored as int8 rows and one scale per row (symmetric, per output channel).

    A draft runs right after llama.cpp's decode has flushed the caches, so it costs the time to stream its weights
    back in: int8 reads a quarter of fp32's bytes. Activations enter the kernel as bfloat16; the caller keeps the
    residual stream in fp32. The drafts are guesses that the base model verifies, so this rounding cannot change
    any output, only (slightly) which guesses are made.
    """

    ALIGN = 16  # torch's int8 kernel needs the inner size in multiples of 16 (it crashes otherwise): zero-pad

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:  # weight [out, in]
        w = weight.detach().float()
        self.pad = -w.shape[1] % self.ALIGN
        w = nn.functional.pad(w, (0, self.pad))
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # [out]
        self.weight = torch.round(w / scale[:, None]).to(torch.int8).contiguous()  # [out, in + pad]
        self.scale = scale.to(torch.bfloat16)
        self.bias = None if bias is None else bias.detach().float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [n, in] -> [n, out] fp32
        x = x.to(torch.bfloat16)
        if self.pad:
            x = nn.functional.pad(x, (0, self.pad))
        y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale).float()
        return y if self.bias is None else y + self.bias


def _versions(params: tuple[nn.Parameter, ...]) -> tuple[int, ...]:
    return tuple(p._version for p in params)  # bumped by every in-place change


@dataclass(frozen=True)
class _InferenceWeights:
    int8: bool
    params: tuple[nn.Parameter, ...]  # the parameters these were built from (walking the module tree costs 65 us)
    versions: tuple[int, ...]  # and their versions then
    blocks: tuple[tuple[tuple[_Linear, _Linear | None], ...], ...]  # [head][layer] = (down, up), or (W, None)
    projections: tuple[_Linear, ...]  # the shared projection, or one per head with own_lm_head
    mix: tuple[tuple[_Linear, ...], ...]  # dependent heads, per head: (M_k,) or (A_k, B_k)

    def block(self, head: int, x: torch.Tensor) -> torch.Tensor:  # [n, n_embd] -> [n, n_embd]
        for down, up in self.blocks[head]:
            x = x + (nn.functional.silu(down(x)) if up is None else up(nn.functional.silu(down(x))))
        return x

    def logits(self, x: torch.Tensor, head: int | None = None) -> torch.Tensor:
        """x [n, n_embd]: one row per head (head=None) or rows all for `head` -> logits [n, V_draft]."""
        if len(self.projections) == 1:
            return self.projections[0](x)
        if head is not None:
            return self.projections[head](x)
        return torch.cat([self.projections[k](x[k : k + 1]) for k in range(x.shape[0])])


@dataclass(frozen=True)
class _Level:
    parents: tuple[int, ...]  # nodes at depth d-1 with children at depth d
    children: tuple[tuple[int, int, int], ...]  # (node, row of its parent in `parents`, rank)
    max_rank: int  # candidates needed per parent


@functools.lru_cache(maxsize=64)
def _levels(tree: Tree) -> tuple[_Level, ...]:
    levels = []
    for d in range(1, tree.depth + 1):
        nodes = [i for i in range(tree.n_nodes) if tree.depths[i] == d]
        parents = tuple(sorted({tree.parents[i] for i in nodes}))
        row = {p: j for j, p in enumerate(parents)}
        children = tuple((i, row[tree.parents[i]], tree.ranks[i]) for i in nodes)
        levels.append(_Level(parents, children, max(tree.ranks[i] for i in nodes) + 1))
    return tuple(levels)


# -- files -------------------------------------------------------------------------------------------------------


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a kill never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_heads(heads: MedusaHeads, path: Path, *, half: bool = False) -> None:
    """Save the weights file (.pth) or its safetensors export (.safetensors, config as JSON metadata)."""
    state = heads.trainable_state_dict()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    config = asdict(heads.config)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file(state, str(tmp), metadata={"format": FORMAT, "config": json.dumps(config)})
        os.replace(tmp, path)
    else:
        atomic_torch_save({"format": FORMAT, "config": config, "state_dict": state}, path)


def read_heads_file(path: Path) -> tuple[HeadsConfig, dict[str, torch.Tensor]]:
    """Config and tensors of a weights file, never executing code from it."""
    path = Path(path)
    if not path.is_file():
        raise HeadsError(f"Medusa weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise HeadsError(f"{path} is not a readable safetensors file: {exc}") from None
        if meta.get("format") != FORMAT or "config" not in meta:
            raise HeadsError(f"{path} has no medusa-gguf config in its metadata (format {meta.get('format')!r})")
        return HeadsConfig.from_dict(json.loads(meta["config"])), state
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for unsafe globals, RuntimeError for junk
        raise HeadsError(
            f"refusing to load {path}: it is not a plain tensors-and-config weights file "
            f"(torch.load with weights_only=True said: {str(exc).splitlines()[0]})"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise HeadsError(f"{path} is not a medusa-gguf weights file (expected format {FORMAT!r})")
    return HeadsConfig.from_dict(data["config"]), data["state_dict"]


def check_compatible(config: HeadsConfig, path: Path, *, n_embd: int, n_vocab: int, k_heads: int | None = None) -> None:
    """Raise HeadsError naming both sides when a weights file does not fit the base model or the request."""
    if config.n_embd != n_embd:
        raise HeadsError(f"{path} was trained for a model of width {config.n_embd} "
                         f"({config.base_model_name or 'unknown'}); this model has width {n_embd}")
    if config.n_vocab != n_vocab:
        raise HeadsError(f"{path} was trained for a vocabulary of {config.n_vocab} tokens "
                         f"({config.base_model_name or 'unknown'}); this model has {n_vocab}")
    if k_heads is not None and config.k_heads != k_heads:
        raise HeadsError(f"{path} has {config.k_heads} heads but {k_heads} were requested; "
                         "the number of heads must match between training and inference")


def build_heads(config: HeadsConfig, projection: torch.Tensor, embeddings=None,
                draft_ids: torch.Tensor | None = None, *, draft_int8: bool = True) -> MedusaHeads:
    """Heads of `config.head_type`. `embeddings` (a tensor, or a callable returning one) is read only when needed."""
    if config.head_type == "medusa":
        return MedusaHeads(config, projection, draft_ids, draft_int8=draft_int8)
    if embeddings is None:
        raise HeadsError("dependent heads need the base model's token embeddings")
    return DependentHeads(config, projection, embeddings() if callable(embeddings) else embeddings, draft_ids,
                          draft_int8=draft_int8)


def load_heads(path: Path, projection: torch.Tensor, *, embeddings=None, k_heads: int | None = None,
               draft_int8: bool = True) -> MedusaHeads:
    """Rebuild heads from a weights file; `projection` is the base output matrix [n_vocab, n_embd] and
    `embeddings` its token-embedding table (or a callable giving it), needed by dependent heads only."""
    config, state = read_heads_file(path)
    n_vocab, n_embd = projection.shape
    check_compatible(config, path, n_embd=n_embd, n_vocab=n_vocab, k_heads=k_heads)
    heads = build_heads(config, projection, embeddings, state.get("draft_ids"), draft_int8=draft_int8)
    missing, unexpected = heads.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                                                strict=False)
    missing = [m for m in missing if m not in ("projection", "embeddings")]
    if missing or unexpected:
        raise HeadsError(f"{path} does not match its own config: missing {missing}, unexpected {unexpected}")
    return heads.eval()
