"""The engine: one backend (model + context) plus, when they fit, Medusa heads and the tree they use.

Callers (CLI, server, benchmark) build an Engine from Settings and call `generate`. An Engine is not
thread-safe; the server keeps one per parallel slot.

Choosing how to decode, in order:
1. TREE=plain: plain decoding.
2. Weights at MEDUSA_WEIGHTS_PATH if that file exists (a mismatch with the model is an error, not a fallback);
   else the heads shipped inside the package, if they were trained for this exact model file (same SHA-256);
   else plain decoding. The file says its head type (Medusa or dependent); both decode through the same code.
3. The tree: TREE=auto calibrates one per context length from the heads' recorded accuracies, this machine's
   measured step cost model (`costs.StepCosts`, cached under a key of everything it depends on) and the heads'
   measured drafting cost per tree; where no tree is predicted to be faster, that context length decodes plainly,
   and with no tree anywhere the engine decodes plainly and says why. Inside each request an acceptance guard
   then decodes plainly for a while whenever the tree steps' tokens per second fall below plain steps'
   (decoding.AcceptanceGuard). TREE=chain uses the top-1 chain, TREE=default
   and TREE=wide the static trees of `tree.py`, and TREE=PATH loads choices from a JSON file. The tree is cut to
   MAX_TOKENS_PER_STEP - 1 levels.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .backend import EXACT_BATCH, Backend
from .costs import CostCurve, StepCosts, cost_key, measure_step_costs, save_json
from .decoding import AcceptanceGuard, GenerationResult, SamplingParams, generate
from .exactness import check_exactness
from .models import file_sha256, user_cache_dir
from .settings import Settings
from .tree import (DEFAULT_CHOICES, WIDE_CHOICES, Calibration, Tree, TreeSchedule, build_tree, calibrate_tree, chain,
                   load_choices, n_leaves)

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
SHIPPED = {t: ASSETS / f"smollm2-135m-instruct-q4_1.{t}.pth" for t in ("medusa", "dependent")}  # per head type
SHIPPED_MEDUSA_HEADS, SHIPPED_DEPENDENT_HEADS = SHIPPED["medusa"], SHIPPED["dependent"]
SHIPPED_HEADS = SHIPPED_DEPENDENT_HEADS  # used when MEDUSA_WEIGHTS_PATH is absent; the README says why this type
CALIBRATION_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 63)
NAMED_TREES = {"default": DEFAULT_CHOICES, "wide": WIDE_CHOICES}


@dataclass(frozen=True)
class DecodingPlan:
    heads: object | None  # MedusaHeads, or None for plain decoding
    tree: Tree | TreeSchedule | None  # TREE=auto: a schedule, the calibrated tree by context length
    reason: str  # why this plan: printed in logs and returned in every response's stats
    weights_path: Path | None = None
    calibration: Calibration | None = None  # TREE=auto: the calibration at the shortest measured context
    calibrations: tuple[tuple[int, Calibration], ...] = ()  # TREE=auto: (context length, calibration) each
    costs: StepCosts | None = None  # TREE=auto: the cost model the calibration used
    drafts: DraftCosts | None = None  # TREE=auto: the heads' drafting times it measured, per tree

    def guard(self) -> AcceptanceGuard | None:
        """A fresh acceptance guard for one request when the tree was calibrated (TREE=auto); a static tree
        is used as asked."""
        if self.heads is None or self.costs is None or not self.calibrations:
            return None
        costs = self.costs
        return AcceptanceGuard(lambda context: costs.plain(context) / 1e3)


class Engine:
    def __init__(self, settings: Settings, *, backend: Backend | None = None) -> None:
        self.settings = settings
        self.backend = backend or Backend(settings)
        self.model_name = self.backend.model_path.name
        self.plan = plan_decoding(self.backend, settings)
        log.info("decoding: %s", self.plan.reason)
        # Greedy Medusa output equals plain decoding only where llama.cpp's outputs do not depend on the batch:
        # measured here, at start, rather than assumed (another backend, weight type or build may differ).
        self.exactness = check_exactness(self.backend) if self.plan.heads is not None else None
        if self.exactness is not None:
            (log.info if self.exactness.exact else log.warning)("%s", self.exactness.summary)

    @property
    def n_ctx(self) -> int:
        return self.backend.n_ctx

    @property
    def model_path(self) -> Path:
        return self.backend.model_path

    @property
    def decoding_mode(self) -> str:
        return "medusa" if self.plan.heads is not None else "plain"

    @property
    def plain_reason(self) -> str | None:
        return None if self.plan.heads is not None else self.plan.reason

    def tokenize(self, text: str) -> list[int]:
        return self.backend.tokenize(text)

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Tokens of chat messages rendered with the model's own template, ready for the assistant's reply."""
        return self.backend.tokenize(self.backend.apply_chat_template(messages))

    def generate(
        self, prompt_tokens: Sequence[int], params: SamplingParams, result: GenerationResult | None = None,
        *, plain: bool = False,
    ) -> Iterator[str]:
        """Stream the completion's text pieces; `result` receives tokens, finish_reason and stats."""
        result = result if result is not None else GenerationResult()
        if plain or self.plan.heads is None:
            result.stats.reason = "plain decoding requested" if plain else self.plan.reason
            return generate(self.backend, prompt_tokens, params, result)
        result.stats.reason = self.plan.reason
        result.stats.exact = self.exactness.exact if self.exactness is not None else None
        return generate(self.backend, prompt_tokens, params, result, heads=self.plan.heads, tree=self.plan.tree,
                        guard=self.plan.guard())

    def close(self) -> None:
        self.backend.close()


def plan_decoding(backend: Backend, settings: Settings, *, tree: str | None = None,
                  weights: Path | None = None) -> DecodingPlan:
    """Decide heads and tree for this backend (see the module docstring)."""
    tree_setting = tree or settings.tree
    if tree_setting == "plain":
        return DecodingPlan(None, None, "plain decoding: Medusa heads disabled (TREE=plain)")
    path = weights or settings.medusa_weights_path
    if not path.is_file():
        shipped = SHIPPED_HEADS if SHIPPED_HEADS.is_file() else None
        if shipped is None:
            return DecodingPlan(None, None, f"plain decoding: no Medusa weights at {path}")
        from .heads import read_heads_file

        config, _ = read_heads_file(shipped)
        if config.base_model_sha256 != file_sha256(backend.model_path):
            return DecodingPlan(None, None, f"plain decoding: no Medusa weights at {path}, and the shipped heads "
                                f"were trained for {config.base_model_name}, not this model file")
        path = shipped
    heads = load_heads_for(backend, path)
    label = f"{heads.config.head_type} heads {path.name}"
    max_depth = min(heads.config.k_heads, settings.max_tokens_per_step - 1)
    if max_depth < 1:
        return DecodingPlan(None, None, "plain decoding: MAX_TOKENS_PER_STEP=1 leaves no room for drafts")
    if tree_setting == "chain":
        t = chain(max_depth)
        return DecodingPlan(heads, t, f"{label} with a top-1 chain of depth {t.depth}", path)
    if tree_setting in NAMED_TREES:
        t = build_tree(c for c in NAMED_TREES[tree_setting] if len(c) <= max_depth)
        return DecodingPlan(heads, t, f"{label} with the static {tree_setting} tree "
                            f"({t.n_nodes} nodes, depth {t.depth})", path)
    if tree_setting != "auto":
        t = load_choices(tree_setting)
        if t.depth > heads.config.k_heads:
            raise ValueError(f"tree {tree_setting} is {t.depth} deep but {path} has {heads.config.k_heads} heads")
        t = build_tree(c for c in t.choices if len(c) <= max_depth)
        return DecodingPlan(heads, t, f"{label} with the tree from {tree_setting} "
                            f"({t.n_nodes} nodes, depth {t.depth})", path)
    if not heads.config.accuracy:
        t = chain(min(max_depth, 2))
        return DecodingPlan(heads, t, f"{label} carry no accuracies to calibrate with; "
                            f"using a top-1 chain of depth {t.depth}", path)
    costs = step_costs(backend, settings)
    drafts = DraftCosts(heads, backend.n_embd)
    accuracy = [row for row in heads.config.accuracy[:max_depth]]
    cals = tuple((c, calibrate_tree(accuracy, drafts.step_ms(costs, c), max_depth=max_depth,
                                    max_nodes=EXACT_BATCH)) for c in costs.contexts)
    bounds = tuple((a + b) // 2 for (a, _), (b, _) in zip(cals, cals[1:]))
    schedule = TreeSchedule(bounds, tuple(cal.tree for _, cal in cals))
    where = "; ".join(f"at {c} tokens of context {_verdict(cal)}" for c, cal in cals)
    if schedule.depth == 0:
        return DecodingPlan(None, None, f"plain decoding: no tree beats plain decoding on this machine "
                            f"({where}; {heads.config.head_type} heads {path.name})", path, cals[0][1], cals, costs)
    return DecodingPlan(heads, schedule, f"{label}, calibrated by context length: {where}", path, cals[0][1], cals,
                        costs, drafts)


def _verdict(cal: Calibration) -> str:
    if cal.tree.depth:
        return (f"a {cal.tree.n_nodes}-node tree of depth {cal.tree.depth}, {cal.expected_tokens_per_step:.2f} "
                f"tokens/step, predicted {cal.predicted_speedup:.2f}x")
    best = max((row for row in cal.table if row[0] > 1), key=lambda row: row[3], default=None)
    return "plain" + (f" (best tree: {best[0]} nodes, predicted {best[3]:.2f}x)" if best else "")


class DraftCosts:
    """The heads' measured drafting time per tree (cached): in the loop every draft follows a llama.cpp decode
    that has pushed the heads' weights out of the caches, so each timed draft follows a read of `flush_mb` MB."""

    def __init__(self, heads, n_embd: int, *, repeats: int = 5, flush_mb: int = 64) -> None:
        self.heads, self.repeats = heads, repeats
        self.hidden = np.random.default_rng(0).standard_normal(n_embd).astype(np.float32)
        self.flush = np.ones(flush_mb * 2**20 // 8)
        self.ms: dict[Tree, float] = {}

    def __call__(self, tree: Tree) -> float:
        if tree.depth == 0:
            return 0.0
        if tree not in self.ms:
            self.heads.draft(self.hidden, 0, tree)  # first-call work (weight layout, allocations)
            times = []
            for _ in range(self.repeats):
                self.flush.sum()
                t0 = time.perf_counter()
                self.heads.draft(self.hidden, 0, tree)
                times.append(time.perf_counter() - t0)
            self.ms[tree] = float(np.median(times) * 1e3)
        return self.ms[tree]

    def step_ms(self, costs: StepCosts, context: int):
        """A whole step's milliseconds with a given tree at this context: the loop's own work plus the draft."""
        return lambda tree: costs.tree(tree.n_nodes, n_leaves(tree), context) + self(tree)


def load_heads_for(backend: Backend, path: Path):
    """The heads in `path`, over this backend's model's own output matrix (and token embeddings, if dependent)."""
    import torch

    from .heads import load_heads
    from .models import embedding_matrix, output_matrix

    # llama.cpp and torch share one OpenMP runtime here, and llama.cpp's threads idle while the heads run: a draft
    # streams its weights from memory, and two threads stream them faster than one (Medusa default tree 1.9 -> 1.5 ms).
    torch.set_num_threads(backend.n_threads)
    output = output_matrix(backend.model_path)
    return load_heads(path, torch.from_numpy(output),
                      embeddings=lambda: torch.from_numpy(embedding_matrix(backend.model_path, output)))


def head_cost_ms(heads, n_embd: int, max_depth: int, repeats: int = 9, flush_mb: int = 64) -> list[float]:
    """Median time to draft a top-1 chain of each depth 1..max_depth for one hidden state (entry d - 1).

    In the decode loop every draft follows a llama.cpp decode that has pushed the heads' weights out of the caches,
    so each timed draft here follows a read of `flush_mb` MB (0: warm timings, which understate the in-loop cost).
    Medusa heads score every head in one call; dependent heads run once per level, so their cost grows with depth.
    """
    drafts = DraftCosts(heads, n_embd, repeats=repeats, flush_mb=flush_mb)
    return [drafts(chain(depth)) for depth in range(1, max_depth + 1)]


def cost_curve(backend: Backend, settings: Settings) -> CostCurve:
    """One decode call's cost by size at a short context, for the heads' recipe report and older callers: the
    step cost model's curve at its shortest context (`step_costs`)."""
    costs = step_costs(backend, settings)
    c = costs.contexts[0]
    return CostCurve(model=str(backend.model_path), n_threads=settings.n_threads, n_gpu_layers=settings.n_gpu_layers,
                     context_tokens=c, repeats=0, ms=costs.curve(c))


def step_costs_cache(backend: Backend) -> Path:
    """Where the step cost model of this backend's model and settings is cached."""
    return user_cache_dir() / "costs" / f"steps-{cost_key(backend)[0]}.json"


NOISY_SPREAD = 1.6  # plain steps this much apart (slowest / fastest) mean a busy machine while measuring
_MEASURED: set[str] = set()  # keys measured in this process: once is enough


def step_costs(backend: Backend, settings: Settings) -> StepCosts:
    """This machine's step cost model for this model and these settings, measured once and cached under a key
    that covers the llama.cpp build, the CPU, threads, buffer types, n_ctx, GPU layers, flash attention and KV type.

    A cached model measured on a busy machine (plain steps spread over NOISY_SPREAD) is measured again, once per
    process, and the quieter of the two is kept: a model measured under load would otherwise stay forever."""
    key, _ = cost_key(backend)
    cache = step_costs_cache(backend)
    cached = None
    if cache.is_file():
        try:
            cached = StepCosts.from_json(json.loads(cache.read_text()))
        except (KeyError, ValueError, TypeError):
            log.warning("ignoring unreadable step cost model %s", cache)
    if cached is not None and (cached.noise <= NOISY_SPREAD or key in _MEASURED):
        log.info("step cost model from %s", cache)
        return cached
    if cached is None:
        log.info("measuring this machine's step costs (once, about half a minute; cached in %s)", cache)
    else:
        log.info("the cached step cost model %s was measured on a busy machine (plain steps %.1fx apart): "
                 "measuring again", cache, cached.noise)
    _MEASURED.add(key)
    costs = measure_step_costs(backend, repeats=4, progress=False)
    if costs.noise > NOISY_SPREAD:
        log.warning("the machine was busy while the step costs were measured (plain steps %.1fx apart); the "
                    "calibration may misjudge trees: `medusa-gguf costs --steps` on a quiet machine measures again",
                    costs.noise)
    if cached is not None and cached.noise < costs.noise:
        return cached
    try:
        save_json(costs.to_json(), cache)
    except OSError as exc:
        log.warning("could not cache the step cost model: %s", exc)
    return costs
