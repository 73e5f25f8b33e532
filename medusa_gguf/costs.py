"""The machine's cost curve: time of one decode call with n tokens (logits for all), on the current model.

The Medusa tree is sized from this curve, so each number is the median of repeated warm calls, and the sizes
are measured round-robin so that drift of a shared machine hits all of them alike.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from .backend import Backend

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class CostCurve:
    model: str
    n_threads: int | None
    n_gpu_layers: int
    context_tokens: int  # committed tokens before each measured call
    repeats: int
    ms: dict[int, float]  # n tokens -> median milliseconds per decode call

    def relative(self) -> dict[int, float]:
        """Cost of each size relative to a single-token call."""
        return {n: t / self.ms[1] for n, t in self.ms.items()}

    def to_json(self) -> dict:
        data = asdict(self)
        data["ms"] = {str(n): t for n, t in self.ms.items()}
        data["relative"] = {str(n): r for n, r in self.relative().items()}
        data["machine"] = platform.machine()
        data["processor"] = platform.processor()
        return data

    @classmethod
    def from_json(cls, data: dict) -> "CostCurve":
        fields = {k: data[k] for k in ("model", "n_threads", "n_gpu_layers", "context_tokens", "repeats")}
        return cls(**fields, ms={int(n): float(t) for n, t in data["ms"].items()})


def measure_costs(
    backend: Backend,
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    repeats: int = 9,
    warmup: int = 2,
    context_tokens: int = 128,
    progress: bool = True,
) -> CostCurve:
    """Median wall time of one decode call of n tokens (a chain, logits and hidden states for all) after
    `context_tokens` committed tokens. A tree of n nodes costs the same as a chain of n tokens."""
    if 1 not in sizes:
        sizes = (1, *sizes)
    prompt = [(i * 7919) % backend.n_vocab for i in range(1, context_tokens + 1)]
    backend.prefill(prompt)
    samples: dict[int, list[float]] = {n: [] for n in sizes}
    rounds = tqdm(range(warmup + repeats), desc="cost curve", unit="round", disable=not progress)
    for r in rounds:
        for n in sizes:
            tokens = prompt[:n] if n <= len(prompt) else (prompt * (n // len(prompt) + 1))[:n]
            start = time.perf_counter()
            backend.append(tokens)
            elapsed = time.perf_counter() - start
            backend.rollback(context_tokens)
            if r >= warmup:
                samples[n].append(elapsed * 1e3)
    return CostCurve(
        model=str(backend.model_path),
        n_threads=backend.settings.n_threads,
        n_gpu_layers=backend.settings.n_gpu_layers,
        context_tokens=context_tokens,
        repeats=repeats,
        ms={n: statistics.median(v) for n, v in samples.items()},
    )


def format_table(curve: CostCurve) -> str:
    rel = curve.relative()
    lines = ["| tokens per call | ms per call (median) | relative to 1 token | ms per token |", "|---:|---:|---:|---:|"]
    for n, ms in curve.ms.items():
        lines.append(f"| {n} | {ms:.2f} | {rel[n]:.2f}x | {ms / n:.2f} |")
    return "\n".join(lines)


def save_curve(curve: CostCurve, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(curve.to_json(), indent=2))
    tmp.replace(path)
