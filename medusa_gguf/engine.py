"""The engine: one backend (model + context) plus, when they fit, a drafter (Medusa or dependent heads, or an
EAGLE-3 drafter) and the trees it drafts.

Callers (CLI, server, benchmark) build an Engine from Settings and call `generate`. An Engine is not
thread-safe; the server builds one with `slots=N_PARALLEL` and serves each request on one of its `views()`, which
batch their decodes together (batching.py).

Choosing how to decode, in order:
1. TREE=plain: plain decoding.
2. The drafter: the weights at MEDUSA_WEIGHTS_PATH if that file exists: heads (.pth / .safetensors, Medusa or
   dependent) or an exported EAGLE-3 drafter (.gguf of architecture eagle3); a mismatch with the model is an error,
   not a fallback. Else the drafters shipped inside the package that were trained for this exact model file (same
   SHA-256), as DRAFTER allows (auto, heads, eagle3): with both and TREE=auto, the one whose calibration predicts
   more tokens per second; with a static tree, the heads. Else plain decoding.
3. The tree: TREE=auto calibrates one per context length from the drafter's recorded accuracies, this machine's
   measured step cost model (`costs.StepCosts`, cached under a key of everything it depends on) and the drafter's
   measured drafting cost (heads: per tree; EAGLE-3: per call, one call per level); where no tree is predicted to
   be faster, that context length decodes plainly, and with no tree anywhere the engine decodes plainly and says
   why. An EAGLE-3 drafter grows a dynamic tree of the calibrated size each step (eagle3_draft.py). Inside each
   request an acceptance guard then decodes plainly for a while whenever the tree steps' tokens per second fall
   below plain steps' (decoding.AcceptanceGuard). TREE=chain uses the top-1 chain, TREE=default and TREE=wide the
   static trees of `tree.py` (EAGLE-3: dynamic trees of 16 and 48 nodes), and TREE=PATH loads choices from a JSON
   file (heads only). Trees are cut to MAX_TOKENS_PER_STEP - 1 levels.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .backend import EXACT_BATCH, Backend
from .costs import CostCurve, StepCosts, cost_key, measure_step_costs, save_json
from .decoding import AcceptanceGuard, GenerationResult, SamplingParams, generate
from .eagle3_draft import DynamicSchedule, DynamicTreeParams, Eagle3Drafting
from .eagle3_gguf import drafter_info, is_eagle3_gguf, read_gguf_header
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
SHIPPED_EAGLE3 = ASSETS / "smollm2-135m-instruct-q4_1.eagle3.gguf"  # an exported EAGLE-3 drafter, bound by SHA-256
CALIBRATION_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 63)
NAMED_TREES = {"default": DEFAULT_CHOICES, "wide": WIDE_CHOICES}
LOAD_LEVELS = (2, 4, 8, 16, 32, 64, 128)  # requests per call at which a calibrated tree is sized again


@dataclass(frozen=True)
class DecodingPlan:
    heads: object | None  # MedusaHeads (drafting with a static tree or schedule), or None
    tree: Tree | TreeSchedule | None  # the heads' tree; TREE=auto: a schedule, the calibrated tree by context length
    reason: str  # why this plan: printed in logs and returned in every response's stats
    weights_path: Path | None = None
    calibration: Calibration | None = None  # TREE=auto: the calibration at the shortest measured context
    calibrations: tuple[tuple[int, Calibration], ...] = ()  # TREE=auto: (context length, calibration) each
    costs: StepCosts | None = None  # TREE=auto: the cost model the calibration used
    drafts: DraftCosts | None = None  # TREE=auto: the heads' drafting times it measured, per tree
    label: str = ""  # the drafter, in words
    eagle3: Eagle3Drafting | None = None  # an EAGLE-3 drafter growing its own trees, instead of heads

    @property
    def drafting(self) -> bool:
        return self.heads is not None or self.eagle3 is not None

    @property
    def predicted_speedup(self) -> float:
        """The calibration's prediction at the shortest context (1.0 without one)."""
        return self.calibration.predicted_speedup if self.calibration is not None else 1.0

    def guard(self) -> AcceptanceGuard | None:
        """A fresh acceptance guard for one request when the tree was calibrated (TREE=auto); a static tree
        is used as asked."""
        if not self.drafting or self.costs is None or not self.calibrations:
            return None
        costs = self.costs
        return AcceptanceGuard(lambda context: costs.plain(context) / 1e3)

    def generate(self, backend, prompt_tokens: Sequence[int], params: SamplingParams,
                 result: GenerationResult, cancelled=None) -> Iterator[str]:
        """decoding.generate with this plan's drafter, tree and a fresh guard (`backend`: a Backend or a Slot)."""
        return generate(backend, prompt_tokens, params, result, heads=self.heads, tree=self.tree,
                        guard=self.guard(), drafter=self.eagle3, cancelled=cancelled)

    def close(self) -> None:
        if self.eagle3 is not None:
            self.eagle3.close()


class Engine:
    def __init__(self, settings: Settings, *, backend: Backend | None = None, slots: int = 1) -> None:
        """`slots` > 1: one context holding that many texts, served through `views()` (batching.py)."""
        self.settings = settings
        self.backend = backend or Backend(settings, slots=slots)
        self.model_name = self.backend.model_path.name
        self._views: list[EngineSlot] | None = None
        # Planning runs torch (the heads' drafting costs) and llama.cpp (the step cost curve, the exactness check)
        # in a thread of its own; see `in_passing_thread`.
        in_passing_thread(self._plan, settings)

    def _plan(self, settings: Settings) -> None:
        self.plan = plan_decoding(self.backend, settings)
        if self.plan.eagle3 is not None and self.backend.slots > 1:
            # one drafter context follows one request's text (eagle3_draft.Eagle3Session)
            first = self.plan
            first.close()
            self.plan = plan_decoding(self.backend, settings, drafter="heads")
            if self.plan.eagle3 is not None:  # MEDUSA_WEIGHTS_PATH names the EAGLE-3 drafter itself
                self.plan.close()
                self.plan = DecodingPlan(None, None, f"plain decoding: {first.label} drafts for one request at a "
                                         f"time, and {self.backend.slots} slots were asked for (N_PARALLEL)")
            log.warning("%s drafts for one request at a time; with %d slots: %s", first.label, self.backend.slots,
                        self.plan.reason)
        log.info("decoding: %s", self.plan.reason)
        # Greedy Medusa output equals plain decoding only where llama.cpp's outputs do not depend on the batch:
        # measured here, at start, rather than assumed (another backend, weight type or build may differ).
        self.exactness = check_exactness(self.backend) if self.plan.drafting else None
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
        return "medusa" if self.plan.drafting else "plain"

    @property
    def plain_reason(self) -> str | None:
        return None if self.plan.drafting else self.plan.reason

    def tokenize(self, text: str) -> list[int]:
        return self.backend.tokenize(text)

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Tokens of chat messages rendered with the model's own template, ready for the assistant's reply."""
        return self.backend.tokenize(self.backend.apply_chat_template(messages))

    def prompt(self, text: str) -> list[int]:
        """Tokens of one prompt as benchmarks and training present it: a user turn through the chat template, or
        for a base model the text itself (`Backend.render`)."""
        return self.backend.tokenize(self.backend.render([{"role": "user", "content": text}]))

    def generate(
        self, prompt_tokens: Sequence[int], params: SamplingParams, result: GenerationResult | None = None,
        *, plain: bool = False, backend=None, cancelled=None,
    ) -> Iterator[str]:
        """Stream the completion's text pieces; `result` receives tokens, finish_reason and stats. `backend`: a
        Slot of `views()` instead of the engine's own Backend; `cancelled()` true stops before the next step."""
        result = result if result is not None else GenerationResult()
        target = backend if backend is not None else self.backend
        if plain or not self.plan.drafting:
            result.stats.reason = "plain decoding requested" if plain else self.plan.reason
            return generate(target, prompt_tokens, params, result, cancelled=cancelled)
        result.stats.reason = self.plan.reason
        result.stats.exact = self.exactness.exact if self.exactness is not None else None
        return self.plan.generate(target, prompt_tokens, params, result, cancelled)

    def views(self) -> list["EngineSlot"]:
        """One engine-like view per slot, each serving one request at a time; their decodes share rounds. The
        engine's own `generate` must not run while they serve (the Backend's texts belong to the views then)."""
        if self._views is None:
            from .batching import Batcher

            self.batcher = Batcher(self.backend)
            self._views = [EngineSlot(self, slot) for slot in self.batcher.slots]
        return self._views

    def close(self) -> None:
        if self._views is not None:
            self.batcher.close()
        self.plan.close()
        self.backend.close()


def in_passing_thread(fn, *args):
    """Run fn(*args) in a thread that ends with it, and return its result or raise its exception.

    OpenMP (which llama.cpp's CPU backend and torch share: one libgomp per process) keeps a pool of worker threads
    for every thread that ever ran a parallel region, and they stay for the life of that thread. Work run once at
    start from the thread that later only waits (the server's event loop) would leave such a pool beside the
    threads that decode, and on a machine with as many cores as decoding threads it costs those decodes their
    cores: measured on this 2-core machine (one slot, plain, three runs each), a server whose main thread had run
    torch decoded at 63-84 tokens/s, against 88-105 without torch and 91-106 with torch run on a thread that then
    ended. A pool made here leaves with this thread."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
            out["error"] = exc

    worker = threading.Thread(target=run, name="medusa-setup", daemon=True)  # Ctrl-C at start-up need not wait
    worker.start()
    worker.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


class EngineSlot:
    """What the server lends a request: the engine's model, tokenizer and plan, decoding on one slot."""

    def __init__(self, engine: Engine, slot) -> None:
        self.engine, self.slot = engine, slot
        self.model_name, self.n_ctx = engine.model_name, engine.n_ctx

    def tokenize(self, text: str) -> list[int]:
        return self.engine.tokenize(text)

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.engine.chat_prompt(messages)

    def generate(self, prompt_tokens: Sequence[int], params: SamplingParams, result: GenerationResult | None = None,
                 *, cancelled=None) -> Iterator[str]:
        """Engine.generate on this slot; the slot counts as busy until the generator is exhausted or closed."""
        with self.slot.serving(cancelled):
            yield from self.engine.generate(prompt_tokens, params, result, backend=self.slot, cancelled=cancelled)


def trained_for(path: Path, sha: str) -> bool:
    """Whether a heads file or an exported EAGLE-3 drafter was trained for the model file of this SHA-256."""
    if is_eagle3_gguf(path):
        return drafter_info(read_gguf_header(path).meta)[0] == sha
    from .heads import read_heads_file

    return read_heads_file(path)[0].base_model_sha256 == sha


def plan_decoding(backend: Backend, settings: Settings, *, tree: str | None = None,
                  weights: Path | None = None, drafter: str | None = None) -> DecodingPlan:
    """Decide the drafter and tree for this backend (see the module docstring)."""
    tree_setting, kind = tree or settings.tree, drafter or settings.drafter
    if tree_setting == "plain":
        return DecodingPlan(None, None, "plain decoding: drafting disabled (TREE=plain)")
    if settings.max_tokens_per_step < 2:
        return DecodingPlan(None, None, "plain decoding: MAX_TOKENS_PER_STEP=1 leaves no room for drafts")
    path = weights or settings.medusa_weights_path
    if path.is_file():
        if is_eagle3_gguf(path):
            return _plan_eagle3(backend, settings, path, tree_setting)
        return _plan_heads(backend, settings, path, tree_setting)
    sha = file_sha256(backend.model_path)
    shipped, why_not = {}, []
    if kind in ("auto", "heads") and SHIPPED_HEADS.is_file():
        from .heads import read_heads_file

        if trained_for(SHIPPED_HEADS, sha):
            shipped["heads"] = SHIPPED_HEADS
        else:
            why_not.append(f"the shipped heads were trained for {read_heads_file(SHIPPED_HEADS)[0].base_model_name}, "
                           f"not this model file")
    if kind in ("auto", "eagle3") and SHIPPED_EAGLE3.is_file():
        if trained_for(SHIPPED_EAGLE3, sha):
            shipped["eagle3"] = SHIPPED_EAGLE3
        else:
            why_not.append("the shipped EAGLE-3 drafter was trained for another model file")
    if not shipped:
        return DecodingPlan(None, None, f"plain decoding: no drafter weights at {path}"
                            + "".join(f", and {w}" for w in why_not) + f" (DRAFTER={kind})")
    if len(shipped) == 1 or tree_setting != "auto":  # static trees are head rank paths: heads first
        name = "heads" if "heads" in shipped else "eagle3"
        return (_plan_heads if name == "heads" else _plan_eagle3)(backend, settings, shipped[name], tree_setting)
    heads = _plan_heads(backend, settings, shipped["heads"], tree_setting)
    eagle3 = _plan_eagle3(backend, settings, shipped["eagle3"], tree_setting)
    if not heads.drafting and not eagle3.drafting:
        return replace(heads, reason=f"{heads.reason}; and with the EAGLE-3 drafter: {eagle3.reason}")
    best, other = sorted((heads, eagle3), key=lambda p: (-p.drafting, -p.predicted_speedup))
    other.close()
    return replace(best, reason=f"{best.reason} (TREE=auto chose it: predicted {best.predicted_speedup:.2f}x "
                                f"against {other.predicted_speedup:.2f}x for {other.label})")


def _plan_heads(backend: Backend, settings: Settings, path: Path, tree_setting: str) -> DecodingPlan:
    heads = load_heads_for(backend, path)
    label = f"{heads.config.head_type} heads {path.name}"
    max_depth = min(heads.config.k_heads, settings.max_tokens_per_step - 1)
    if tree_setting == "chain":
        t = chain(max_depth)
        return DecodingPlan(heads, t, f"{label} with a top-1 chain of depth {t.depth}", path, label=label)
    if tree_setting in NAMED_TREES:
        t = build_tree(c for c in NAMED_TREES[tree_setting] if len(c) <= max_depth)
        return DecodingPlan(heads, t, f"{label} with the static {tree_setting} tree "
                            f"({t.n_nodes} nodes, depth {t.depth})", path, label=label)
    if tree_setting != "auto":
        t = load_choices(tree_setting)
        if t.depth > heads.config.k_heads:
            raise ValueError(f"tree {tree_setting} is {t.depth} deep but {path} has {heads.config.k_heads} heads")
        t = build_tree(c for c in t.choices if len(c) <= max_depth)
        return DecodingPlan(heads, t, f"{label} with the tree from {tree_setting} "
                            f"({t.n_nodes} nodes, depth {t.depth})", path, label=label)
    if not heads.config.accuracy:
        t = chain(min(max_depth, 2))
        return DecodingPlan(heads, t, f"{label} carry no accuracies to calibrate with; "
                            f"using a top-1 chain of depth {t.depth}", path, label=label)
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
                            f"({where}; {label})", path, cals[0][1], cals, costs, label=label)
    loaded, under = [], []
    for load in (n for n in LOAD_LEVELS if n <= backend.slots):
        trees = tuple(calibrate_tree(accuracy, _loaded_step_ms(costs, c, load, drafts), max_depth=max_depth,
                                     max_nodes=EXACT_BATCH).tree for c in costs.contexts)
        loaded.append((load, TreeSchedule(bounds, trees)))
        under.append(f"{load} requests: " + ("plain" if not max(t.depth for t in trees) else
                                            "/".join(str(t.n_nodes) for t in trees) + " nodes"))
    if loaded:
        schedule = replace(schedule, loaded=tuple(loaded))
        where += f"; sharing each call with others (by context length): {', '.join(under)}"
    return DecodingPlan(heads, schedule, f"{label}, calibrated by context length: {where}", path, cals[0][1], cals,
                        costs, drafts, label=label)


def _loaded_step_ms(costs: StepCosts, context: int, load: int, drafts: "DraftCosts"):
    """The milliseconds of a round of `load` requests that all draft this tree (they share one calibration), their
    steps in one call (batching.py), their drafts one after another on the same cores; plain: `load` tokens. A
    request's speed relative to plain decoding is then its expected tokens per step times plain's round / this."""
    return lambda tree: (costs.tree(load * tree.n_nodes, load * (n_leaves(tree) - 1) + 1, context) + load * drafts(tree)
                         if tree.n_nodes > 1 else costs.tree(load, 1, context))


def _plan_eagle3(backend: Backend, settings: Settings, path: Path, tree_setting: str) -> DecodingPlan:
    """EAGLE-3 dynamic trees: TREE=default / wide / chain name fixed shapes; TREE=auto sizes them (nodes, depth,
    width, top-k) from the drafter's validation accuracies, this machine's step costs and the drafter's measured
    cost per level, per context length."""
    max_depth = settings.max_tokens_per_step - 1
    label = f"EAGLE-3 drafter {path.name}"
    named = {"default": DynamicTreeParams(depth=min(6, max_depth)),
             "wide": DynamicTreeParams(nodes=48, depth=min(6, max_depth), width=8, topk=8),
             "chain": DynamicTreeParams(nodes=max_depth + 1, depth=max_depth, width=1, topk=1)}
    if tree_setting not in named and tree_setting != "auto":
        raise ValueError(f"TREE={tree_setting}: an EAGLE-3 drafter ({path}) grows its own trees; use TREE=auto, "
                         f"default, wide, chain or plain")
    drafting = Eagle3Drafting(backend, path, DynamicSchedule.of(named[tree_setting]) if tree_setting in named
                              else None)
    sha, accuracy = drafter_info(drafting.runtime.meta)  # the header llama.cpp's loader was checked against
    if sha and sha != file_sha256(backend.model_path):
        log.warning("%s was trained on another model file (SHA-256 %s...), not %s: it fits its shape, but expect "
                    "fewer accepted drafts", path, sha[:12], backend.model_path.name)
    if tree_setting in named:
        return DecodingPlan(None, None, f"{label} with {tree_setting} dynamic trees "
                            f"({named[tree_setting].describe()})", path, label=label, eagle3=drafting)
    if not accuracy:
        p = named["default"]
        drafting.schedule = DynamicSchedule.of(p)
        return DecodingPlan(None, None, f"{label} carries no accuracies to calibrate with; using default dynamic "
                            f"trees ({p.describe()})", path, label=label, eagle3=drafting)
    costs = step_costs(backend, settings)
    # beyond the levels validation measured (--eval_steps), the deepest one's accuracies are assumed
    accuracy = [list(accuracy[min(d, len(accuracy) - 1)]) for d in range(max_depth)]
    level_ms = drafting.measure_costs()
    cals = tuple((c, calibrate_tree(accuracy, _eagle3_step_ms(costs, c, level_ms), max_depth=max_depth,
                                    max_nodes=min(EXACT_BATCH, 2 * drafting.max_width * max_depth)))
                 for c in costs.contexts)
    bounds = tuple((a + b) // 2 for (a, _), (b, _) in zip(cals, cals[1:]))
    drafting.schedule = DynamicSchedule.like(TreeSchedule(bounds, tuple(cal.tree for _, cal in cals)))
    where = "; ".join(f"at {c} tokens of context {_verdict(cal)}" for c, cal in cals)
    if drafting.schedule.depth == 0:
        drafting.close()
        return DecodingPlan(None, None, f"plain decoding: no tree beats plain decoding on this machine "
                            f"({where}; {label})", path, cals[0][1], cals, costs, label=label)
    return DecodingPlan(None, None, f"{label}, dynamic trees calibrated by context length: {where}", path,
                        cals[0][1], cals, costs, label=label, eagle3=drafting)


def _eagle3_step_ms(costs: StepCosts, context: int, level_ms: dict[int, float]):
    """A whole EAGLE-3 step's milliseconds for a tree shape at this context: the target's verification call, the
    drafter's catch-up (level_ms[0]) and one drafter call per further level over its widest frontier."""
    widest = max(level_ms)

    def step_ms(tree: Tree) -> float:
        ms = costs.tree(tree.n_nodes, n_leaves(tree), context)
        p = DynamicTreeParams.like(tree)  # the shape the schedule will draft for this tree
        if p is not None:
            ms += level_ms[0] + (p.depth - 1) * level_ms[min(p.width, widest)]
        return ms

    return step_ms


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
