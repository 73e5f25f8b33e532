"""Medusa heads: small residual blocks on the base model's final hidden state, scored by a (shared) projection.

Index convention: h_t is the final hidden state at position t; the base lm_head maps h_t to token t+1; Medusa
head k (k = 1..K, stored at index k-1) maps h_t to token t+1+k.

A head is `num_layers` bottleneck residual blocks, x + W_up SiLU(W_down x) with W_down [hidden_dim, n_embd] and
W_up zero-initialised, so an untrained head is exactly the base lm_head. The projection is the base model's own
output matrix, read from the GGUF and frozen (not stored in the weights file), optionally restricted to a draft
vocabulary: the most frequent training targets, mapped back to full ids. `own_lm_head` trains one projection
per head instead (initialised from the base matrix, stored in the file).

A weights file is `torch.save({"format": ..., "config": {...}, "state_dict": {...}})`, loaded with
`torch.load(weights_only=True)`: data, never code. `.safetensors` export/import carries the config as JSON.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT = "medusa-gguf-heads/1"


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
    base_model_name: str = ""
    base_model_sha256: str = ""
    # accuracy[k][r]: share of held-out positions where head k+1's rank-r candidate was the right token.
    accuracy: list[list[float]] = field(default_factory=list)
    training_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.k_heads < 1 or self.num_layers < 0 or self.hidden_dim < 1:
            raise HeadsError(f"invalid heads config: k_heads={self.k_heads} num_layers={self.num_layers} "
                             f"hidden_dim={self.hidden_dim}")
        if self.head_type not in ("medusa", "dependent"):
            raise HeadsError(f"unknown head_type {self.head_type!r}; expected 'medusa' or 'dependent'")

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


class MedusaHeads(nn.Module):
    """K heads over a frozen projection. forward(h) -> logits [..., K, V_draft]."""

    def __init__(self, config: HeadsConfig, projection: torch.Tensor, draft_ids: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        c = config
        # A fresh module per head and per layer: `[block] * k` would repeat one module and share its weights.
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResBlock(c.n_embd, c.hidden_dim) for _ in range(c.num_layers)]) for _ in range(c.k_heads)
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

    def features(self, hidden: torch.Tensor) -> torch.Tensor:  # hidden: [..., n_embd] -> [..., K, n_embd]
        return torch.stack([blocks(hidden) for blocks in self.blocks], dim=-2)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # -> [..., K, V_draft]
        x = self.features(hidden)
        if self.config.own_lm_head:  # x: [..., K, n_embd], lm_heads: [K, V_draft, n_embd]
            return torch.einsum("...kd,kvd->...kv", x, self.lm_heads)
        return x @ self.projection.T

    @torch.inference_mode()
    def topk(self, hidden: np.ndarray, k: int, n_heads: int | None = None) -> np.ndarray:
        """Full-vocabulary ids of each head's k best candidates for one hidden state [n_embd] -> [K, k]."""
        n = n_heads or self.config.k_heads
        h = torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32))
        x = torch.stack([self.blocks[i](h) for i in range(n)])  # [n, n_embd]
        logits = x @ self.projection.T if not self.config.own_lm_head else torch.einsum("kd,kvd->kv", x, self.lm_heads[:n])
        idx = torch.topk(logits, k, dim=-1).indices  # [n, k] in draft space
        return self.draft_ids[idx].numpy()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything the weights file stores: the blocks, the draft ids, and own projections if any."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}


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


def load_heads(path: Path, projection: torch.Tensor, *, k_heads: int | None = None) -> MedusaHeads:
    """Rebuild MedusaHeads from a weights file; `projection` is the base output matrix [n_vocab, n_embd]."""
    config, state = read_heads_file(path)
    n_vocab, n_embd = projection.shape
    check_compatible(config, path, n_embd=n_embd, n_vocab=n_vocab, k_heads=k_heads)
    heads = MedusaHeads(config, projection, state.get("draft_ids"))
    missing, unexpected = heads.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                                                strict=False)
    missing = [m for m in missing if m != "projection"]
    if missing or unexpected:
        raise HeadsError(f"{path} does not match its own config: missing {missing}, unexpected {unexpected}")
    return heads.eval()
