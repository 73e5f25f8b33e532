"""One streaming generator for every caller: the CLI, the server, the benchmark and evaluation.

`generate()` yields UTF-8-safe text pieces (a character split across tokens is held back until whole) and fills
a `GenerationResult` with the tokens, the finish reason and the step statistics as it goes. Each step emits one
or more tokens: one for plain decoding, up to the tree depth + 1 for a Medusa step. Stop handling is shared:
EOS, stop strings (never emitted, not even in part, even across steps), max_tokens and the end of the context.
"""
from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import numpy as np

from .backend import Backend, DecodeOutput


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: whole vocabulary
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


@dataclass
class GenerationStats:
    mode: str = "plain"  # "plain" or "medusa"
    reason: str | None = None  # why plain decoding was used, when it was
    steps: int = 0
    tokens: int = 0  # tokens produced by the model, including any dropped past a stop point
    accepted_per_depth: list[int] = field(default_factory=list)  # [d]: steps whose draft was accepted to depth d+1
    time_heads_s: float = 0.0
    time_decode_s: float = 0.0
    time_total_s: float = 0.0

    @property
    def tau(self) -> float:
        """Mean tokens per step (accepted drafts + the base model's own token)."""
        return self.tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.time_total_s if self.time_total_s > 0 else 0.0

    @property
    def time_python_s(self) -> float:
        return max(0.0, self.time_total_s - self.time_heads_s - self.time_decode_s)

    def acceptance_rate_per_depth(self) -> list[float]:
        return [n / self.steps for n in self.accepted_per_depth] if self.steps else []

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "reason": self.reason,
            "steps": self.steps,
            "tokens": self.tokens,
            "tau": round(self.tau, 4),
            "acceptance_rate_per_depth": [round(r, 4) for r in self.acceptance_rate_per_depth()],
            "tokens_per_s": round(self.tokens_per_s, 2),
            "time_heads_s": round(self.time_heads_s, 6),
            "time_decode_s": round(self.time_decode_s, 6),
            "time_python_s": round(self.time_python_s, 6),
        }


@dataclass
class GenerationResult:
    tokens: list[int] = field(default_factory=list)  # the completion's tokens (none past a stop point)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length" (max_tokens or end of context)
    stats: GenerationStats = field(default_factory=GenerationStats)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick one token from logits [n_vocab]: argmax when greedy, else from `probabilities`."""
    if params.temperature == 0:
        return int(np.argmax(logits))
    ids, p = probabilities(logits, params)
    return int(ids[rng.choice(len(ids), p=p)])


def probabilities(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The sampling distribution after temperature, top-k and top-p: (token ids, probabilities), most likely first."""
    z = logits.astype(np.float64) / params.temperature
    order = np.argsort(-z, kind="stable")
    if params.top_k:
        order = order[: params.top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if params.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(p), params.top_p) + 1)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return order, p


class Stepper(Protocol):
    """Produces the next tokens; plain decoding and Medusa both implement it.

    `step` returns 1..budget new tokens. All but the last are already in the KV cache; the last one is pending
    and is decoded by the next step (as the next tree's root, for Medusa).
    """

    def step(self, budget: int) -> list[int]: ...


class PlainStepper:
    """One token per step: decode the pending token, sample the next from its logits."""

    def __init__(self, backend: Backend, prefill: DecodeOutput, params: SamplingParams, stats: GenerationStats) -> None:
        self.backend, self.params, self.stats = backend, params, stats
        self.rng = np.random.default_rng(params.seed)
        self.logits = prefill.logits[-1]
        self.pending: int | None = None

    def step(self, budget: int) -> list[int]:
        if self.pending is not None:
            start = time.perf_counter()
            self.logits = self.backend.append([self.pending]).logits[-1]
            self.stats.time_decode_s += time.perf_counter() - start
        self.pending = sample(self.logits, self.params, self.rng)
        return [self.pending]


class _StopScanner:
    """Holds back text that could still become a stop string; finds the earliest complete one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was found). After a stop, the rest is dropped."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def generate(
    backend: Backend,
    prompt_tokens: Sequence[int],
    params: SamplingParams,
    result: GenerationResult | None = None,
) -> Iterator[str]:
    """Yield the text pieces of the completion of `prompt_tokens`; fill `result` (if given) as it goes.

    Closing the generator early (a client went away) stops decoding at once.
    """
    result = result if result is not None else GenerationResult()
    stats = result.stats
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    scanner = _StopScanner(params.stop)
    stepper: Stepper = PlainStepper(backend, backend.prefill(prompt_tokens), params, stats)
    t0 = time.perf_counter()
    try:
        while result.finish_reason is None:
            if backend.n_past >= backend.n_ctx:  # no room left for the pending token
                result.finish_reason = "length"
                break
            new_tokens = stepper.step(params.max_tokens - len(result.tokens))
            stats.steps += 1
            stats.tokens += len(new_tokens)
            for token in new_tokens:
                if backend.is_eog(token):
                    result.finish_reason = "stop"
                    break
                result.tokens.append(token)
                text, stopped = scanner.feed(decoder.decode(backend.token_bytes(token)))
                if text:
                    result.text += text
                    yield text
                if stopped:  # the stop string and everything after it are dropped
                    result.finish_reason = "stop"
                    return
                if len(result.tokens) >= params.max_tokens:
                    result.finish_reason = "length"
                    break
        tail = scanner.flush() + decoder.decode(b"", final=True)
        if tail:
            result.text += tail
            yield tail
    finally:
        stats.time_total_s = time.perf_counter() - t0
