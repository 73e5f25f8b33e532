"""Streaming generation. Yields UTF-8-safe text pieces: a character split across tokens is held back until whole.

This is plain (one token per step) decoding; the Medusa step plugs into the same generator.
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .backend import Backend


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: whole vocabulary
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class GenerationResult:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" (EOS) or "length" (max_tokens or end of context)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick one token from logits [n_vocab]: argmax when greedy, else temperature / top-k / top-p."""
    if params.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / params.temperature
    order = np.argsort(-z, kind="stable")
    if params.top_k:
        order = order[: params.top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if params.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(p), params.top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])


def generate(backend: Backend, prompt_tokens: Sequence[int], params: SamplingParams, result: GenerationResult | None = None) -> Iterator[str]:
    """Yield text pieces of the reply to `prompt_tokens`; fill `result` (if given) as it goes."""
    result = result if result is not None else GenerationResult()
    rng = np.random.default_rng(params.seed)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = backend.prefill(prompt_tokens)
    while True:
        token = sample(out.logits[-1], params, rng)
        if backend.is_eog(token):
            result.finish_reason = "stop"
            break
        result.tokens.append(token)
        piece = decoder.decode(backend.token_bytes(token))
        if piece:
            result.text += piece
            yield piece
        if len(result.tokens) >= params.max_tokens or backend.n_past >= backend.n_ctx:
            result.finish_reason = "length"
            break
        out = backend.append([token])
    tail = decoder.decode(b"", final=True)
    if tail:
        result.text += tail
        yield tail
