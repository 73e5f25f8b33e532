"""The engine: one backend (model + context) plus, when they fit, Medusa heads and the tree they use.

Callers (CLI, server, benchmark) build an Engine from Settings and call `generate`. An Engine is not
thread-safe; the server keeps one per parallel slot.

Choosing how to decode, in order:
1. TREE=plain: plain decoding.
2. Weights at MEDUSA_WEIGHTS_PATH if that file exists (a mismatch with the model is an error, not a fallback);
   else the heads shipped inside the package, if they were trained for this exact model file (same SHA-256);
   else plain decoding. The file says its head type (Medusa or dependent); both decode through the same code.
3. The tree: TREE=auto calibrates one from the heads' recorded accuracies and this machine's measured cost
   curve (cached per model and settings); it falls back to plain decoding when no tree is predicted to be
   faster. Inside each request an acceptance guard then decodes plainly for a while whenever the tree's
   tokens per step fall below its cost (decoding.AcceptanceGuard). TREE=chain uses the top-1 chain, TREE=default
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

from .backend import Backend
from .costs import CostCurve, measure_costs, save_curve
from .decoding import AcceptanceGuard, GenerationResult, SamplingParams, generate
from .models import file_sha256, user_cache_dir
from .settings import Settings
from .tree import DEFAULT_CHOICES, WIDE_CHOICES, Calibration, Tree, build_tree, calibrate_tree, chain, load_choices

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
    tree: Tree | None
    reason: str  # why this plan: printed in logs and returned in every response's stats
    weights_path: Path | None = None
    calibration: Calibration | None = None

    def guard(self) -> AcceptanceGuard | None:
        """A fresh acceptance guard for one request when the tree was calibrated (TREE=auto); a static tree
        is used as asked."""
        if self.heads is None or self.calibration is None or self.calibration.tree.depth == 0:
            return None
        return AcceptanceGuard(self.calibration.break_even_tokens)


class Engine:
    def __init__(self, settings: Settings, *, backend: Backend | None = None) -> None:
        self.settings = settings
        self.backend = backend or Backend(settings)
        self.model_name = self.backend.model_path.name
        self.plan = plan_decoding(self.backend, settings)
        log.info("decoding: %s", self.plan.reason)

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
    curve = cost_curve(backend, settings)
    head_ms = head_cost_ms(heads, backend.n_embd, max_depth)
    accuracy = [row for row in heads.config.accuracy[:max_depth]]
    cal = calibrate_tree(accuracy, curve.ms, max_depth=max_depth, head_cost_ms=head_ms)
    if cal.tree.depth == 0:
        return DecodingPlan(None, None, f"plain decoding: {cal.reason} (heads {path.name}, {heads.config.head_type} "
                            f"type, cost {head_ms[0]:.2f}-{head_ms[-1]:.2f} ms per step by depth)", path, cal)
    return DecodingPlan(heads, cal.tree, f"{label}, calibrated tree: {cal.reason}", path, cal)


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
    h = np.random.default_rng(0).standard_normal(n_embd).astype(np.float32)
    flush = np.ones(flush_mb * 2**20 // 8)
    costs = []
    for depth in range(1, max_depth + 1):
        tree = chain(depth)
        heads.draft(h, 0, tree)  # first-call work (weight layout, allocations)
        times = []
        for _ in range(repeats):
            flush.sum()
            t0 = time.perf_counter()
            heads.draft(h, 0, tree)
            times.append(time.perf_counter() - t0)
        costs.append(float(np.median(times) * 1e3))
    return costs


def cost_curve(backend: Backend, settings: Settings) -> CostCurve:
    """This machine's cost curve for this model and these settings, measured once and cached."""
    key = f"{file_sha256(backend.model_path)[:16]}-t{settings.n_threads or 0}-g{settings.n_gpu_layers}"
    cache = user_cache_dir() / "costs" / f"{key}.json"
    if cache.is_file():
        try:
            curve = CostCurve.from_json(json.loads(cache.read_text()))
            log.info("cost curve from %s", cache)
            return curve
        except (KeyError, ValueError):
            log.warning("ignoring unreadable cost curve %s", cache)
    log.info("measuring this machine's cost curve (once; cached in %s)", cache)
    curve = measure_costs(backend, CALIBRATION_SIZES, repeats=5, context_tokens=64, progress=False)
    backend.reset()
    try:
        save_curve(curve, cache)
    except OSError as exc:
        log.warning("could not cache the cost curve: %s", exc)
    return curve
