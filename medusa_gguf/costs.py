"""What decoding costs on this machine, measured, never assumed.

- `CostCurve` (`medusa-gguf costs`): the time of one decode call with n tokens at one context length.
- `StepCosts`: the cost model the tree calibration and the benchmark use. It times whole steps of the decode
  loop itself (decode, sequence bookkeeping, verification, Python) by tree size, leaves and context length, and
  is cached under a key that covers everything it depends on (`cost_key`). The heads' drafting cost is measured
  separately, per tree (`engine.draft_cost_ms`).

Each number is the median of repeated warm runs. A tree step is timed right after a plain step and kept as its
ratio to that plain step, so that a shared machine's load, which moves both alike, cancels out of the ratios; the
plain steps' spread is recorded, and a model measured on a busy machine is measured again (`engine.step_costs`).
"""
from __future__ import annotations

import json
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
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


# -- the step cost model ---------------------------------------------------------------------------------------

STEP_SIZES = (1, 2, 3, 4, 6, 8, 16, 32, 63)
FAN_SIZES = (8, 24)  # sizes also measured as a fan (root + n-1 leaves), for the per-leaf bookkeeping
STEP_CONTEXTS = (64, 512, 2048)


@dataclass(frozen=True)
class StepCosts:
    """What one decode-loop step costs on this machine, measured in the loop's own code (`MedusaStepper.step`
    with a free drafter): the tree decode, the sequence bookkeeping (seq_cp per leaf, commit), the verification
    and the Python around them, at several context lengths. The drafting cost is the heads' own, added per tree.

    A tree of n nodes and L leaves at context c costs chain_ms[c][n] + (L - 1) * leaf_ms[c]; a plain step
    costs plain_ms[c]; between measured contexts both are linear in c, beyond the last they extrapolate.
    """

    key: str  # the cache key: everything the numbers depend on
    machine: dict  # the key's parts, readable
    contexts: tuple[int, ...]
    plain_ms: dict[int, float]  # context -> ms of one plain step (PlainStepper.step)
    chain_ms: dict[int, dict[int, float]]  # context -> nodes -> ms of a one-leaf tree step
    leaf_ms: dict[int, float]  # context -> ms per extra leaf
    spread: dict[int, float] = field(default_factory=dict)  # context -> slowest / fastest plain step measured

    @property
    def noise(self) -> float:
        """The largest spread of the plain steps: about 1.1 on a quiet machine, 2 and more on a busy one."""
        return max(self.spread.values(), default=1.0)

    def plain(self, context: int) -> float:
        return _lerp(self.contexts, [self.plain_ms[c] for c in self.contexts], context)

    def tree(self, n_nodes: int, n_leaves: int, context: int) -> float:
        """Milliseconds of a tree step without the drafting; a 1-node tree is a plain step."""
        if n_nodes <= 1:
            return self.plain(context)
        at = [interpolate_n(self.chain_ms[c], n_nodes) + (n_leaves - 1) * self.leaf_ms[c] for c in self.contexts]
        return _lerp(self.contexts, at, context)

    def curve(self, context: int) -> dict[int, float]:
        """The one-leaf step cost by tree size at one context (n=1: a plain step), for tables and plots."""
        sizes = sorted(self.chain_ms[self.contexts[0]])
        return {n: self.tree(n, 1, context) for n in sizes}

    @classmethod
    def from_curve(cls, ms: dict[int, float], context: int = 64, key: str = "given") -> "StepCosts":
        """A model from a per-call cost curve alone (n tokens -> ms): no context growth, no leaf cost."""
        return cls(key=key, machine={}, contexts=(context,), plain_ms={context: ms[1]}, chain_ms={context: dict(ms)},
                   leaf_ms={context: 0.0})

    def to_json(self) -> dict:
        return {"key": self.key, "machine": self.machine, "contexts": list(self.contexts),
                "plain_ms": {str(c): v for c, v in self.plain_ms.items()},
                "chain_ms": {str(c): {str(n): v for n, v in row.items()} for c, row in self.chain_ms.items()},
                "leaf_ms": {str(c): v for c, v in self.leaf_ms.items()},
                "spread": {str(c): v for c, v in self.spread.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "StepCosts":
        return cls(key=data["key"], machine=data["machine"], contexts=tuple(int(c) for c in data["contexts"]),
                   plain_ms={int(c): float(v) for c, v in data["plain_ms"].items()},
                   chain_ms={int(c): {int(n): float(v) for n, v in row.items()} for c, row in data["chain_ms"].items()},
                   leaf_ms={int(c): float(v) for c, v in data["leaf_ms"].items()},
                   spread={int(c): float(v) for c, v in data.get("spread", {}).items()})


def interpolate_n(ms: dict[int, float], n: int) -> float:
    xs = sorted(ms)
    return _lerp(xs, [ms[x] for x in xs], n)


def _lerp(xs: Sequence[int], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear through (xs, ys); beyond either end, the line through the last two points (at least
    the end value's half, so that a noisy slope cannot turn a cost negative)."""
    if len(xs) == 1:
        return ys[0]
    i = 1
    while i < len(xs) - 1 and x > xs[i]:
        i += 1
    y = ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return max(y, 0.5 * min(ys[0], ys[-1]))


def cost_key(backend: Backend) -> tuple[str, dict]:
    """A key that changes with everything a step's cost depends on: the model file, the llama.cpp build and its
    CPU features, the CPU, threads, buffer types, n_ctx, GPU layers, flash attention and the KV cache type."""
    import hashlib

    import llama_cpp as lc

    from .models import file_sha256

    s = backend.settings
    parts = {
        "model_sha256": file_sha256(backend.model_path)[:16],
        "llama_cpp_python": getattr(lc, "__version__", "?"),
        "system_info": lc.llama_print_system_info().decode(errors="replace").strip(),
        "cpu": _cpu_name(),
        "threads": backend.n_threads,
        "extra_bufts": backend.extra_bufts,
        "n_ctx": backend.n_ctx,
        "gpu_layers": s.n_gpu_layers,
        "flash_attn": backend.flash_attn,
        "kv_type": backend.kv_type,
        "format": 3,
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
    return digest, parts


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fan(n: int):
    """A root with n - 1 children: n - 1 leaves, the most bookkeeping a tree of n nodes can need."""
    from .tree import build_tree

    return build_tree((r,) for r in range(n - 1))


def measure_step_costs(
    backend: Backend,
    *,
    sizes: Sequence[int] = STEP_SIZES,
    contexts: Sequence[int] = STEP_CONTEXTS,
    repeats: int = 5,
    progress: bool = True,
) -> StepCosts:
    """Time whole decode-loop steps (median of `repeats`, sizes round-robin) at each context length that fits."""
    from .decoding import GenerationStats, MedusaStepper, PlainStepper, SamplingParams
    from .tree import chain

    key, parts = cost_key(backend)
    contexts = tuple(c for c in contexts if c + max(sizes) + 8 <= backend.n_ctx) or (min(64, backend.n_ctx // 4),)
    sizes = tuple(n for n in sizes if n == 1 or contexts[-1] + n + 8 <= backend.n_ctx)  # a tiny window: fewer sizes
    params = SamplingParams(max_tokens=1 << 20)
    shapes = [("plain", 1)] + [("chain", n) for n in sizes if n > 1] + [("fan", n) for n in FAN_SIZES if n in sizes]
    trees = {("chain", n): chain(n - 1) for n in sizes if n > 1}
    trees |= {("fan", n): fan(n) for n in FAN_SIZES if n in sizes}
    plain_ms, chain_ms, leaf_ms, spread = {}, {}, {}, {}
    bar = tqdm(total=len(contexts) * (repeats + 1) * (2 * len(shapes) - 1), desc="step costs", unit="step",
               disable=not progress)
    for ctx in contexts:
        prefill = backend.prefill([(i * 7919 + 13) % backend.n_vocab for i in range(1, ctx + 1)])

        def timed(shape: tuple[str, int]) -> float:
            backend.rollback(ctx)  # the same context for every step: the prompt, nothing after it
            stats = GenerationStats()
            if shape[0] == "plain":
                stepper = PlainStepper(backend, prefill, params, stats)
            else:
                stepper = MedusaStepper(backend, prefill, params, stats, _FreeDrafter(backend.n_vocab), trees[shape])
            stepper.step(8)  # the first token comes from the prompt's logits: no decode
            t0 = time.perf_counter()
            stepper.step(64)
            bar.update()
            return (time.perf_counter() - t0) * 1e3

        plain: list[float] = []
        ratios: dict[tuple[str, int], list[float]] = {s: [] for s in shapes[1:]}
        for r in range(repeats + 1):  # the first round warms up
            for shape in shapes[1:]:
                base = timed(("plain", 1))  # right before the tree step: the same load for both
                step = timed(shape)
                if r:
                    plain.append(base)
                    ratios[shape].append(step / base)
            if r:
                plain.append(timed(("plain", 1)))
            else:
                bar.update()
        plain_ms[ctx] = base_ms = statistics.median(plain)
        spread[ctx] = max(plain) / min(plain)
        med = {s: statistics.median(v) * base_ms for s, v in ratios.items()}
        chain_ms[ctx] = {1: base_ms, **{n: med[("chain", n)] for n in sizes if n > 1}}
        per_leaf = [(med[("fan", n)] - med[("chain", n)]) / (n - 2) for n in FAN_SIZES if n in sizes and n > 2]
        leaf_ms[ctx] = max(0.0, statistics.median(per_leaf)) if per_leaf else 0.0
    bar.close()
    backend.reset()
    return StepCosts(key=key, machine=parts, contexts=contexts, plain_ms=plain_ms, chain_ms=chain_ms, leaf_ms=leaf_ms,
                     spread=spread)


class _FreeDrafter:
    """Drafts cost nothing here: random tokens, so that only the step's own work is timed."""

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self.rng = random.Random(0)

    def draft(self, hidden, root: int, tree) -> list[int]:
        return [root] + [self.rng.randrange(self.n_vocab) for _ in range(tree.n_nodes - 1)]


def chain_tokens(p: float, nodes: int) -> float:
    """Tokens a chain of `nodes` (the root and nodes - 1 drafts) gains per step when each draft is right with
    probability p, given the ones before it: 1 + p + ... + p^(nodes-1)."""
    return sum(p**k for k in range(nodes))


def break_even_acceptance(cost_ratio: float, nodes: int, gain: float = 1.0) -> float | None:
    """The per-draft acceptance at which a chain of `nodes` costing `cost_ratio` plain steps reaches `gain` times
    plain decoding's tokens/s; None when even a chain that is always right falls short (nodes < gain * ratio)."""
    need = gain * cost_ratio
    if need > nodes:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chain_tokens(mid, nodes) < need else (lo, mid)
    return hi


def format_step_costs(costs: StepCosts, gains: Sequence[float] = (1.0, 1.25)) -> str:
    """The step costs by chain length and context, and, at the shortest context, the acceptance per draft that a
    chain needs to break even and to reach each of `gains` (drafting itself counted as free)."""
    c0 = costs.contexts[0]

    def need(n: int, gain: float) -> str:
        p = break_even_acceptance(costs.tree(n, 1, c0) / costs.plain(c0), n, gain)
        return "never" if p is None else f"{p:.2f}"

    lines = ["| tree nodes | " + " | ".join(f"ms at {c} tokens of context" for c in costs.contexts) + " | "
             + " | ".join(f"acceptance for {g:.2f}x" for g in gains) + " |",
             "|---:|" + "---:|" * (len(costs.contexts) + len(gains))]
    for n in sorted(costs.chain_ms[c0]):
        cells = [f"{costs.tree(n, 1, c):.2f} ({costs.tree(n, 1, c) / costs.plain(c):.2f}x)" for c in costs.contexts]
        lines.append(f"| {n} | " + " | ".join(cells) + " | " + " | ".join(
            "" if n == 1 else need(n, g) for g in gains) + " |")
    lines.append("| per extra leaf | " + " | ".join([f"{costs.leaf_ms[c]:.3f}" for c in costs.contexts]
                                                  + [""] * len(gains)) + " |")
    return "\n".join(lines)


def save_json(data: dict, path: Path) -> None:
    """Write JSON atomically (a killed run leaves the old file or the new one, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
