"""EAGLE-3 drafter in torch, computing exactly what llama.cpp's `eagle3` architecture computes.

Graph (vendor/llama.cpp src/models/eagle3.cpp, llama-cpp-python 0.3.36):
- encoder: g = fc(f), f = [feature of target layer k0 | k1 | k2] at one position (3 * target_width -> width).
  The layer ids follow llama.cpp's input convention (medusa_gguf/features.py). With norm_before_fc (EAGLE-3.1,
  eagle3.norm_before_fc), g = fc(rms(f) * input_norm): ONE RMSNorm over the whole concatenated row (3 * target_width),
  eps rms_eps, weight input_norm [3 * target_width] (GGUF enc.output_norm.weight, HF input_norm.weight).
- decoder, one layer, per row (token x, state g, position p):
    a = concat(rms(e(x)) * attn_norm, rms(g) * hidden_norm)        # [2 * width]; e = frozen target embeddings
    h = g + wo(attention(rope(wq a), rope(wk a), wv a))             # residual from the raw g
    prenorm = h + down(silu(gate(n)) * up(n)),  n = rms(h) * ffn_norm
    logits = output(rms(prenorm) * output_norm)                     # over the draft vocabulary
  RoPE is llama.cpp's NORM type (LLM_ARCH_EAGLE3 -> LLAMA_ROPE_TYPE_NORM): it rotates ADJACENT pairs
  (x[2i], x[2i+1]) by p * rope_theta^(-2i / head_dim), no scaling. Attention is causal, scaled by 1/sqrt(head_dim),
  with grouped KV heads (query head h reads KV head h // (n_head / n_head_kv)). Draft id i is target id d2t[i]
  (absolute ids, as conversion/llama.py writes them and ggml_set_rows uses them).

Inference convention (common/speculative.cpp, common_speculative_impl_draft_eagle3), with f_t the target features
at position t (the target has read tokens 0..t) and x_t the token at position t:
- context entry at position t: (token x_{t+1}, g = fc(f_t)); its logits predict x_{t+2}.
  The newest position t is filled once x_{t+1} is known (the target's own next token).
- draft depth k >= 1 from anchor t: (drafted token ~x_{t+k+1}, g = prenorm of depth k-1 at anchor t), position
  t + k; it predicts x_{t+k+2}. It attends to the context entries at positions <= t and to the draft entries
  of depths 1..k on its own path, nothing else.

Training-time test (`ttt_forward`) unrolls exactly that on a sequence: step k, row t (the anchor) gets token
x_{t+1+k}, position t + k, state g = fc(f_t) for k = 0 and the step-(k-1) prenorm of row t for k >= 1; it sees the
step-0 rows s <= t and the step-1..k rows of its own t. Step k's logits at row t predict x_{t+k+2}: a loss at
step k uses rows t < T - k - 2 against tokens[:, k + 2:]. Rows whose input token would lie past the sequence get
token 0; their outputs mean nothing and must be left out of any loss.

A weights file is `torch.save({"format", "config", "state_dict"})` (or .safetensors with the config as JSON),
loaded with `torch.load(weights_only=True)`: data, never code. The target embeddings are not stored.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .heads import atomic_torch_save

FORMAT = "medusa-gguf-eagle3/1"

KV = tuple[torch.Tensor, torch.Tensor]  # keys (after RoPE), values: [B, n_head_kv, T, head_dim] each


class Eagle3Error(ValueError):
    """A drafter config, file or input that cannot be used; the message names both sides of a mismatch."""


@dataclass(frozen=True)
class Eagle3Config:
    target_width: int  # target model width; the encoder reads 3 * target_width features
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int  # target vocabulary
    target_layers: tuple[int, int, int]  # llama.cpp layer-input ids of the target (features.py)
    draft_vocab_size: int = 0  # 0: the full target vocabulary (identity d2t)
    width: int = 0  # drafter width; 0: target_width (it must equal it while the target's embeddings are shared)
    head_dim: int = 0  # 0: width // n_head
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    norm_before_fc: bool = False  # RMSNorm the concatenated features before fc (module docstring); old files: False
    n_ctx_train: int = 4096  # written to the GGUF as context_length
    base_model_name: str = ""
    base_model_sha256: str = ""
    training_args: dict[str, Any] = field(default_factory=dict)
    # validation: accuracy[k][r] = P(step k's rank-r guess is right | steps < k right); sizes the tree at inference
    accuracy: tuple[tuple[float, ...], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_layers", tuple(int(x) for x in self.target_layers))
        object.__setattr__(self, "accuracy", tuple(tuple(float(a) for a in row) for row in self.accuracy))
        if not self.width:
            object.__setattr__(self, "width", self.target_width)
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.width // max(self.n_head, 1))
        if not self.draft_vocab_size:
            object.__setattr__(self, "draft_vocab_size", self.n_vocab)
        if len(self.target_layers) != 3:
            raise Eagle3Error(f"EAGLE-3 reads exactly 3 target layers, got {self.target_layers}")
        if min(self.target_width, self.n_head, self.n_head_kv, self.n_ff, self.n_vocab) < 1:
            raise Eagle3Error(f"invalid EAGLE-3 config: {self}")
        if self.n_head % self.n_head_kv:
            raise Eagle3Error(f"n_head={self.n_head} is not a multiple of n_head_kv={self.n_head_kv}")
        if self.head_dim % 2:
            raise Eagle3Error(f"head_dim={self.head_dim} must be even for RoPE")
        if not 0 < self.draft_vocab_size <= self.n_vocab:
            raise Eagle3Error(f"draft_vocab_size={self.draft_vocab_size} must lie in 1..n_vocab={self.n_vocab}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_layers"] = list(self.target_layers)
        data["accuracy"] = [list(row) for row in self.accuracy]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Eagle3Config":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """ggml_rms_norm followed by the weight: x / sqrt(mean(x^2) + eps) * w."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_norm(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's NORM RoPE: rotate adjacent pairs (x[2i], x[2i+1]) by p * theta^(-2i/d).

    x: [B, H, T, d]; positions: [B, T]. Angles in float64 so large positions keep their precision."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)  # [d/2]
    ang = positions.to(torch.float64)[:, None, :, None] * inv  # [B, 1, T, d/2]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class Eagle3Drafter(nn.Module):
    """fc encoder + one decoder layer + draft-vocabulary head; token embeddings are the target's, frozen."""

    def __init__(self, config: Eagle3Config, embeddings: torch.Tensor, d2t: torch.Tensor | None = None,
                 target_output: torch.Tensor | None = None) -> None:
        """`embeddings`: the target's token embeddings [n_vocab, target_width]. `d2t`: draft id -> target id
        [draft_vocab_size] (None: identity over the full vocabulary). `target_output`: the target's output
        matrix [n_vocab, target_width]; when given, the head starts as its rows for the draft vocabulary."""
        super().__init__()
        c = self.config = config
        if tuple(embeddings.shape) != (c.n_vocab, c.target_width):
            raise Eagle3Error(f"target embeddings are {tuple(embeddings.shape)}, the config expects "
                              f"({c.n_vocab}, {c.target_width})")
        if c.width != c.target_width:
            raise Eagle3Error(f"drafter width {c.width} differs from the target width {c.target_width}; the decoder "
                              "reads the target's token embeddings, so the widths must match")
        if d2t is None:
            d2t = torch.arange(c.n_vocab)
        d2t = torch.as_tensor(d2t, dtype=torch.int64).reshape(-1)
        if d2t.numel() != c.draft_vocab_size:
            raise Eagle3Error(f"d2t has {d2t.numel()} entries, the config's draft_vocab_size is {c.draft_vocab_size}")
        if d2t.numel() and (int(d2t.min()) < 0 or int(d2t.max()) >= c.n_vocab or d2t.unique().numel() != d2t.numel()):
            raise Eagle3Error(f"d2t must hold distinct target ids in 0..{c.n_vocab - 1}")
        w, q, kv = c.width, c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        self.register_buffer("embeddings", embeddings.detach().float(), persistent=False)  # frozen: shared, not copied
        self.register_buffer("d2t", d2t.clone())
        if c.norm_before_fc:
            self.input_norm = nn.Parameter(torch.ones(3 * c.target_width))  # on the concatenated features
        self.fc = nn.Linear(3 * c.target_width, w, bias=False)
        self.attn_norm = nn.Parameter(torch.ones(w))  # on the token embedding
        self.hidden_norm = nn.Parameter(torch.ones(w))  # on g (llama.cpp: attn_norm_2)
        self.wq = nn.Linear(2 * w, q, bias=False)
        self.wk = nn.Linear(2 * w, kv, bias=False)
        self.wv = nn.Linear(2 * w, kv, bias=False)
        self.wo = nn.Linear(q, w, bias=False)
        self.ffn_norm = nn.Parameter(torch.ones(w))
        self.ffn_gate = nn.Linear(w, c.n_ff, bias=False)
        self.ffn_up = nn.Linear(w, c.n_ff, bias=False)
        self.ffn_down = nn.Linear(c.n_ff, w, bias=False)
        self.output_norm = nn.Parameter(torch.ones(w))
        self.output = nn.Linear(w, c.draft_vocab_size, bias=False)
        if target_output is not None:
            if tuple(target_output.shape) != (c.n_vocab, w):
                raise Eagle3Error(f"target output matrix is {tuple(target_output.shape)}, expected ({c.n_vocab}, {w})")
            with torch.no_grad():
                self.output.weight.copy_(target_output.float()[self.d2t])

    # -- the two graphs --------------------------------------------------------------------------------------

    def fuse(self, features: torch.Tensor) -> torch.Tensor:  # [..., 3 * target_width] -> g [..., width]
        """The encoder pass: the fc over the three concatenated target layers (RMS-normed first if norm_before_fc)."""
        if self.config.norm_before_fc:
            features = rms_norm(features, self.input_norm, self.config.rms_eps)
        return self.fc(features)

    def layer(self, tokens: torch.Tensor, g: torch.Tensor, positions: torch.Tensor, *,
              mask: torch.Tensor | Literal["causal", "diagonal"] = "causal",
              context: KV | None = None, context_mask: torch.Tensor | None = None,
              path: Sequence[KV] = ()) -> tuple[torch.Tensor, KV]:
        """The decoder layer: (prenorm [B, T, width], this pass's KV). tokens: [B, T] target ids; g: [B, T, width];
        positions: [B, T] or [T].

        Which keys a row sees: this pass's rows per `mask` ("causal": rows j <= i, "diagonal": its own row only,
        or a bool [T, T] / [B, T, T], True = visible); the earlier entries `context` ([B, Hkv, Tc, d]) per
        `context_mask` ([T, Tc] / [B, T, Tc], default all visible); and row i of every KV in `path` (entries
        from earlier passes on the row's own draft path, e.g. shallower TTT steps)."""
        c = self.config
        B, T = tokens.shape
        positions = positions.expand(B, T) if positions.dim() == 1 else positions
        e = self.embeddings[tokens]  # [B, T, width]
        a = torch.cat((rms_norm(e, self.attn_norm, c.rms_eps), rms_norm(g, self.hidden_norm, c.rms_eps)), dim=-1)
        q = self.wq(a).view(B, T, c.n_head, c.head_dim).transpose(1, 2)  # [B, H, T, d]
        k = self.wk(a).view(B, T, c.n_head_kv, c.head_dim).transpose(1, 2)  # [B, Hkv, T, d]
        v = self.wv(a).view(B, T, c.n_head_kv, c.head_dim).transpose(1, 2)
        q, k = rope_norm(q, positions, c.rope_theta), rope_norm(k, positions, c.rope_theta)
        att = self._attend(q, (k, v), mask, context, context_mask, path)  # [B, H, T, d]
        h = g + self.wo(att.transpose(1, 2).reshape(B, T, c.n_head * c.head_dim))
        n = rms_norm(h, self.ffn_norm, c.rms_eps)
        return h + self.ffn_down(F.silu(self.ffn_gate(n)) * self.ffn_up(n)), (k, v)

    def logits(self, prenorm: torch.Tensor) -> torch.Tensor:  # [..., width] -> [..., draft_vocab_size]
        return self.output(rms_norm(prenorm, self.output_norm, self.config.rms_eps))

    def forward(self, tokens: torch.Tensor, g: torch.Tensor, positions: torch.Tensor, **attend: Any
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder pass: (prenorm [B, T, width], draft logits [B, T, draft_vocab_size]); `attend` as in
        `layer` (mask, context, context_mask, path)."""
        prenorm, _ = self.layer(tokens, g, positions, **attend)
        return prenorm, self.logits(prenorm)

    def _attend(self, q: torch.Tensor, own: KV, mask, context: KV | None, context_mask: torch.Tensor | None,
                path: Sequence[KV]) -> torch.Tensor:
        """Softmax over [context | this pass | path] keys at once, so the rows normalise as one set."""
        c = self.config
        rep = c.n_head // c.n_head_kv
        scale = 1.0 / math.sqrt(c.head_dim)
        T = q.shape[2]

        def heads(x: torch.Tensor) -> torch.Tensor:  # [B, Hkv, ., d] -> [B, H, ., d]
            return x.repeat_interleave(rep, dim=1) if rep > 1 else x

        parts: list[tuple[torch.Tensor, torch.Tensor, bool]] = []  # (scores [B, H, T, n], values, per-row?)
        if context is not None:
            s = (q @ heads(context[0]).transpose(-1, -2)) * scale  # [B, H, T, Tc]
            if context_mask is not None:
                s = s.masked_fill(~_batched(context_mask), float("-inf"))
            parts.append((s, heads(context[1]), False))
        ko, vo = heads(own[0]), heads(own[1])
        if isinstance(mask, str) and mask == "diagonal":
            parts.append((((q * ko).sum(-1) * scale).unsqueeze(-1), vo, True))
        else:
            if isinstance(mask, str):
                if mask != "causal":
                    raise Eagle3Error(f"unknown mask {mask!r}; expected 'causal', 'diagonal' or a bool tensor")
                mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            s = (q @ ko.transpose(-1, -2)) * scale  # [B, H, T, T]
            parts.append((s.masked_fill(~_batched(mask), float("-inf")), vo, False))
        for kp, vp in path:
            parts.append((((q * heads(kp)).sum(-1) * scale).unsqueeze(-1), heads(vp), True))
        probs = torch.softmax(torch.cat([s for s, _, _ in parts], dim=-1), dim=-1)
        out, start = torch.zeros_like(q), 0
        for s, v, per_row in parts:
            p = probs[..., start : start + s.shape[-1]]
            start += s.shape[-1]
            out = out + (p * v if per_row else p @ v)
        return out

    # -- training-time test ----------------------------------------------------------------------------------

    def ttt_forward(self, features: torch.Tensor, tokens: torch.Tensor, steps: int,
                    positions: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Draft logits of each of `steps` unrolled steps, [B, T, draft_vocab_size] each (module docstring).

        features: [B, T, 3 * target_width] at positions 0..T-1 (or `positions`, [T] / [B, T]); tokens: [B, T]."""
        return [self.logits(h) for h in self.ttt_states(features, tokens, steps, positions)]

    def ttt_states(self, features: torch.Tensor, tokens: torch.Tensor, steps: int,
                   positions: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The prenorm states [B, T, width] of each unrolled step, as `ttt_forward` but before the head: training
        applies the head only to the rows a loss counts (the head is about half a step's work)."""
        B, T = tokens.shape
        if features.shape[:2] != (B, T):
            raise Eagle3Error(f"features are {tuple(features.shape)} but tokens are {tuple(tokens.shape)}")
        if steps < 1:
            raise Eagle3Error(f"steps={steps}; at least 1")
        pos = torch.arange(T, device=tokens.device) if positions is None else positions
        pos = pos.expand(B, T) if pos.dim() == 1 else pos
        causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
        g = self.fuse(features)
        out: list[torch.Tensor] = []
        context: KV | None = None
        path: list[KV] = []
        for k in range(steps):
            x = torch.zeros_like(tokens)
            x[:, : max(T - 1 - k, 0)] = tokens[:, 1 + k :]
            if k == 0:
                h, context = self.layer(x, g, pos)
            else:
                h, kv = self.layer(x, g, pos + k, mask="diagonal", context=context, context_mask=causal, path=path)
                path.append(kv)
            out.append(h)
            g = h
        return out

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.state_dict().items()}


def _batched(mask: torch.Tensor) -> torch.Tensor:  # [T, Tk] or [B, T, Tk] -> broadcastable over heads
    return mask[None, None] if mask.dim() == 2 else mask[:, None]


# -- files -------------------------------------------------------------------------------------------------------


def save_drafter(drafter: Eagle3Drafter, path: Path, *, half: bool = False) -> None:
    """Save the weights file (.pth) or a .safetensors export with the config as JSON metadata; atomic."""
    path = Path(path)
    state = drafter.trainable_state_dict()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    config = drafter.config.to_dict()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                  metadata={"format": FORMAT, "config": json.dumps(config)})
        os.replace(tmp, path)
    else:
        atomic_torch_save({"format": FORMAT, "config": config, "state_dict": state}, path)


def read_drafter_file(path: Path) -> tuple[Eagle3Config, dict[str, torch.Tensor]]:
    """Config and tensors of a drafter file, never executing code from it."""
    path = Path(path)
    if not path.is_file():
        raise Eagle3Error(f"EAGLE-3 weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise Eagle3Error(f"{path} is not a readable safetensors file: {exc}") from None
        if meta.get("format") != FORMAT or "config" not in meta:
            raise Eagle3Error(f"{path} has no EAGLE-3 config in its metadata (format {meta.get('format')!r})")
        return Eagle3Config.from_dict(json.loads(meta["config"])), state
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise Eagle3Error(f"refusing to load {path}: not a plain tensors-and-config file "
                          f"(torch.load with weights_only=True said: {str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise Eagle3Error(f"{path} is not an EAGLE-3 drafter file (expected format {FORMAT!r})")
    return Eagle3Config.from_dict(data["config"]), data["state_dict"]


def load_drafter(path: Path, embeddings: torch.Tensor) -> Eagle3Drafter:
    """Rebuild a drafter from its file; `embeddings` is the target's token-embedding matrix [n_vocab, width]."""
    config, state = read_drafter_file(path)
    if tuple(embeddings.shape) != (config.n_vocab, config.target_width):
        raise Eagle3Error(f"{path} was built for a target of vocabulary {config.n_vocab} and width "
                          f"{config.target_width} ({config.base_model_name or 'unknown'}); the embeddings given are "
                          f"{tuple(embeddings.shape)}")
    drafter = Eagle3Drafter(config, embeddings, state.get("d2t"))
    missing, unexpected = drafter.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise Eagle3Error(f"{path} does not match its own config: missing {missing}, unexpected {unexpected}")
    return drafter.eval()
