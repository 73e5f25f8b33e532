"""Side-by-side benchmark: plain decoding, prompt lookup, Medusa heads with a static and with the calibrated tree,
dependent heads with the same two trees (when dependent weights are given or shipped), and an EAGLE-3 drafter's
dynamic trees, default and calibrated (when one is given or shipped).

    medusa-gguf bench --prompts medusa_gguf/prompts/heldout.jsonl --max-tokens 128 --json bench.json --plot bench.png

All methods run in one process on the same prompts, greedy, in an order that changes with every prompt so that
drift of a shared machine hits them alike, and so that no method always runs right after the same other method
(`balanced_orders`). For each method: tokens/s, tau (tokens per step), the speedup over
plain decoding (median of per-prompt ratios), whether every output matched plain decoding, and, for Medusa,
the head overhead and the ceiling tau / (tree cost in plain steps) that the machine allows.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from .backend import PromptLookup
from .decoding import GenerationResult, GenerationStats, SamplingParams
from .eagle3_gguf import is_eagle3_gguf
from .engine import (SHIPPED_DEPENDENT_HEADS, SHIPPED_EAGLE3, SHIPPED_MEDUSA_HEADS, DraftCosts, Engine, cost_curve,
                     plan_decoding, step_costs, trained_for)
from .models import file_sha256
from .settings import Settings
from .tree import Tree, TreeSchedule, expected_tokens_per_step, interpolate_cost

log = logging.getLogger(__name__)
METHODS = ("plain", "prompt_lookup", "medusa_static", "medusa_calibrated", "medusa_dependent",
           "medusa_dependent_calibrated", "eagle3_static", "eagle3_calibrated")


@dataclass
class Run:
    category: str
    tokens: list[int]
    seconds: float
    steps: int
    heads_s: float = 0.0
    produced: int = 0  # tokens the model produced, the final EOS included: tau counts these per step
    guard_plain_steps: int = 0  # calibrated trees: steps the acceptance guard decoded plainly
    predicted_s: float = 0.0  # the cost model's time for this run's very steps (its trace)
    predicted_speedup: float = 1.0  # what the calibration expected of this method at this run's contexts
    tree_steps: int = 0
    tree_tokens: int = 0  # tokens the tree steps emitted
    predicted_tree_tokens: float = 0.0  # what the heads' accuracies expected of those steps
    predicted: bool = True  # False: tree steps whose drafter the cost model cannot price (a dynamic EAGLE-3 tree)
    accepted_per_depth: list[int] = field(default_factory=list)  # drafts accepted at depth 1, 2, ... (all steps)


@dataclass
class MethodReport:
    name: str
    note: str = ""
    tree_nodes: int = 1
    runs: list[Run] = field(default_factory=list)


def read_prompts(path: Path, limit: int = 0) -> list[dict]:
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: each line needs a 'prompt' string")
            rows.append({"prompt": row["prompt"], "category": row.get("category", "all")})
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    if limit and limit < len(rows):  # spread the sample over the file (and so over its categories)
        rows = [rows[i * len(rows) // limit] for i in range(limit)]
    return rows


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of n methods (a Williams design) in which every method takes every place equally often and follows
    every other method equally often: n orders for even n, 2n for odd n.

    Rotating one order is not enough: each method would nearly always run right after the same neighbour, and a
    method that leaves the caches cold or the CPU hot (a drafting method, llama-cpp-python's own context) would
    always slow down the same successor.
    """
    first, low, high = [0], 1, n - 1
    while len(first) < n:  # 0, 1, n-1, 2, n-2, ...
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    orders = [[(m + i) % n for m in first] for i in range(n)]
    return orders if n % 2 == 0 else orders + [order[::-1] for order in orders]


def run_bench(settings: Settings, prompts: list[dict], max_tokens: int, *, static_tree: str = "default",
              weights: Path | None = None, dependent_weights: Path | None = None,
              eagle3: Path | None = None) -> dict:
    """Run every method on every prompt. `weights` (the medusa_* rows) defaults to MEDUSA_WEIGHTS_PATH, else the
    shipped Medusa-type heads; `dependent_weights` to the shipped dependent heads, if any; `eagle3` (the eagle3_*
    rows) to MEDUSA_WEIGHTS_PATH if it is an EAGLE-3 .gguf, else the shipped drafter, if any."""
    engine = Engine(settings)
    backend = engine.backend
    curve = cost_curve(backend, settings)
    costs = step_costs(backend, settings)
    sha = file_sha256(backend.model_path)

    def shipped(path: Path) -> Path | None:  # a shipped drafter is a default only for the model it was trained for
        if not path.is_file():
            return None
        if not trained_for(path, sha):
            log.info("%s was trained for another model file: its rows are left out", path.name)
            return None
        return path

    given = settings.medusa_weights_path if settings.medusa_weights_path.is_file() else None
    if given is not None and is_eagle3_gguf(given):  # MEDUSA_WEIGHTS_PATH names the eagle3 rows' drafter
        eagle3, given = eagle3 or given, None
    elif eagle3 is None:
        eagle3 = shipped(SHIPPED_EAGLE3)
    if weights is None and given is None:
        weights = shipped(SHIPPED_MEDUSA_HEADS)  # the shipped default may be dependent heads; these rows are Medusa's
    plans = {}
    if weights is not None or given is not None:
        plans["medusa_static"] = plan_decoding(backend, settings, tree=static_tree, weights=weights)
        plans["medusa_calibrated"] = plan_decoding(backend, settings, tree="auto", weights=weights)
    else:
        log.info("no Medusa-type heads given or shipped for this model: the medusa methods are left out")
    dependent = dependent_weights or shipped(SHIPPED_DEPENDENT_HEADS)
    if dependent is not None:
        plans["medusa_dependent"] = plan_decoding(backend, settings, tree=static_tree, weights=dependent)
        plans["medusa_dependent_calibrated"] = plan_decoding(backend, settings, tree="auto", weights=dependent)
    else:
        log.info("no dependent heads given or shipped: the medusa_dependent methods are left out")
    if eagle3 is not None:
        plans["eagle3_static"] = plan_decoding(backend, settings, tree=static_tree if static_tree in (
            "default", "wide", "chain") else "default", weights=eagle3)
        plans["eagle3_calibrated"] = plan_decoding(backend, settings, tree="auto", weights=eagle3)
    else:
        log.info("no EAGLE-3 drafter given or shipped: the eagle3 methods are left out")
    lookup = PromptLookup(settings, extra_bufts=backend.extra_bufts)  # the kernels plain decoding runs
    params = SamplingParams(max_tokens=max_tokens)
    tokenized = [engine.prompt(p["prompt"]) for p in prompts]

    def medusa(plan) -> Callable[[list[int]], GenerationResult]:
        def go(tokens: list[int]) -> GenerationResult:
            r = GenerationResult()
            r.stats.trace = []
            list(plan.generate(backend, tokens, params, r))
            return r
        return go

    def plain(tokens: list[int]) -> GenerationResult:
        r = GenerationResult()
        r.stats.trace = []
        list(engine.generate(tokens, params, r, plain=True))
        return r

    def prompt_lookup(tokens: list[int]) -> GenerationResult:
        out = lookup.generate(tokens, max_tokens)  # its steps are not observable from outside llama-cpp-python
        return GenerationResult(tokens=out, stats=GenerationStats(tokens=len(out)))

    runners = {"plain": plain, "prompt_lookup": prompt_lookup, **{name: medusa(plan) for name, plan in plans.items()}}
    reports = {
        "plain": MethodReport("plain", "llama.cpp greedy, one token per decode call"),
        "prompt_lookup": MethodReport("prompt_lookup", "llama-cpp-python LlamaPromptLookupDecoding(num_pred_tokens=10)"),
        **{name: MethodReport(name, plan.reason, _nodes(plan)) for name, plan in plans.items()},
    }
    methods = [m for m in METHODS if m in runners]
    for name in methods:  # warm-up: caches, allocations
        if name != "prompt_lookup":
            runners[name](tokenized[0][:8])
    orders = balanced_orders(len(methods))
    predictors = {name: Predictor(plan, costs, backend.n_embd) for name, plan in plans.items()}
    for i, (prompt, tokens) in enumerate(tqdm(list(zip(prompts, tokenized)), desc="bench", unit="prompt")):
        for name in (methods[j] for j in orders[i % len(orders)]):
            t0 = time.perf_counter()
            r = runners[name](tokens)
            st = r.stats
            run = Run(prompt["category"], r.tokens, time.perf_counter() - t0, st.steps, st.time_heads_s, st.tokens,
                      st.guard_plain_steps, accepted_per_depth=list(st.accepted_per_depth))
            if st.trace is not None:
                predictors.get(name, Predictor(None, costs, backend.n_embd)).fill(run, st.trace)
            reports[name].runs.append(run)
    lookup.close()
    for plan in plans.values():
        plan.close()
    engine.close()
    return summarize(reports, curve.ms, prompts, max_tokens)


class Predictor:
    """What the cost model and the heads' accuracies predict for a run, from the run's own steps (its trace): the
    time of those steps, the tokens its tree steps should have emitted, and the speedup the calibration expected at
    the run's contexts. Set beside the measured figures, a wrong model shows."""

    def __init__(self, plan, costs, n_embd: int) -> None:
        self.plan, self.costs = plan, costs
        self.drafts = None
        if plan is not None and plan.heads is not None:  # a calibrated plan has measured its drafts already
            self.drafts = plan.drafts or DraftCosts(plan.heads, n_embd)
        self.accuracy = plan.heads.config.accuracy if self.drafts is not None else None

    def tree_at(self, context: int) -> Tree | None:
        tree = self.plan.tree if self.plan is not None else None
        return tree.tree_at(context) if isinstance(tree, TreeSchedule) else tree

    def fill(self, run: Run, trace: list[tuple[int, int, int, int, float]]) -> None:
        predicted_ms = 0.0
        for context, nodes, leaves, tokens, _ in trace:
            predicted_ms += self.costs.tree(nodes, leaves, context)  # a 1-node step: a plain step
            if nodes == 1:
                continue
            tree = self.tree_at(context)
            predicted_ms += self.drafts(tree) if tree is not None else 0.0
            run.tree_steps += 1
            run.tree_tokens += tokens
            if tree is not None and tree.n_nodes == nodes:  # (a tree cut near max_tokens is not counted)
                run.predicted_tree_tokens += expected_tokens_per_step(tree, self.accuracy[: tree.depth])
            else:
                run.predicted_tree_tokens += tokens
        run.predicted_s = predicted_ms / 1e3
        if run.tree_steps and self.drafts is None:  # no prediction: better a blank than plain's 1.0 or the measure
            run.predicted = False
        if trace and self.drafts is not None:
            context = int(statistics.mean(c for c, *_ in trace))
            tree = self.tree_at(context)
            if tree is not None and tree.depth:
                expected = expected_tokens_per_step(tree, self.accuracy[: tree.depth])
                step_ms = self.drafts.step_ms(self.costs, context)(tree)
                run.predicted_speedup = expected * self.costs.plain(context) / step_ms


def _nodes(plan) -> int:
    """The tree size a method starts with (a calibrated schedule: its tree at the shortest context)."""
    if plan.calibration is not None and plan.drafting:
        return plan.calibration.tree.n_nodes
    if plan.eagle3 is not None:
        params = plan.eagle3.schedule.at(0)
        return params.nodes if params is not None else 1
    return plan.tree.n_nodes if plan.heads is not None and plan.tree is not None else 1


def summarize(reports: dict[str, MethodReport], curve_ms: dict[int, float], prompts: list[dict], max_tokens: int) -> dict:
    plain_runs = reports["plain"].runs
    one_step_ms = interpolate_cost(curve_ms, 1)
    plain_steps = sum(p.steps for p in plain_runs)
    # A whole plain step as measured in this run (decode, sampling, Python): what the heads' time is compared with.
    plain_step_ms = 1e3 * sum(p.seconds for p in plain_runs) / plain_steps if plain_steps else one_step_ms
    methods = {}
    for name, rep in reports.items():
        pairs = list(zip(rep.runs, plain_runs))
        steps = sum(r.steps for r in rep.runs)
        tau = sum(r.produced for r in rep.runs) / steps if steps else None
        tree_cost = interpolate_cost(curve_ms, rep.tree_nodes) / one_step_ms
        measured_s = sum(r.seconds for r in rep.runs)
        entry = {
            **_totals(pairs),
            "tau": tau,
            "predicted_speedup": _median_predicted(rep.runs),
            # the cost model's time for the very steps this method took, over their measured wall time
            "cost_model_time_ratio": (sum(r.predicted_s for r in rep.runs) / measured_s
                                      if measured_s and all(r.predicted for r in rep.runs) else None),
            "outputs_match_plain": all(r.tokens == p.tokens for r, p in pairs),
            "match_rate": sum(r.tokens == p.tokens for r, p in pairs) / max(1, len(pairs)),
            "note": rep.note,
        }
        if name.startswith(("medusa", "eagle3")):
            entry["tree_nodes"] = rep.tree_nodes
            entry["tree_cost_in_plain_steps"] = tree_cost
            # Steps the acceptance guard decoded plainly cost one plain step each, tree steps `tree_cost`.
            guard_plain = sum(r.guard_plain_steps for r in rep.runs)
            entry["guard_plain_steps_share"] = guard_plain / steps if steps else 0.0
            step_costs = (steps - guard_plain) * tree_cost + guard_plain
            entry["ceiling_speedup"] = tau * steps / step_costs if tau and step_costs else None
            tree_steps = sum(r.tree_steps for r in rep.runs)
            entry["tree_steps_tau"] = sum(r.tree_tokens for r in rep.runs) / tree_steps if tree_steps else None
            entry["predicted_tree_steps_tau"] = (sum(r.predicted_tree_tokens for r in rep.runs) / tree_steps
                                                 if tree_steps and all(r.predicted for r in rep.runs) else None)
            depth = max((len(r.accepted_per_depth) for r in rep.runs), default=0)
            accepted = [sum(r.accepted_per_depth[d] for r in rep.runs if d < len(r.accepted_per_depth))
                        for d in range(depth)]
            # in the loop: the share of tree steps whose depth-1 draft was accepted, and deeper alike
            entry["acceptance_per_depth"] = [a / tree_steps for a in accepted] if tree_steps else None
            heads_s = sum(r.heads_s for r in rep.runs)
            entry["head_ms_per_step"] = heads_s / steps * 1e3 if steps else 0.0
            entry["head_overhead_vs_plain_step"] = entry["head_ms_per_step"] / plain_step_ms
        by_cat: dict[str, dict] = {}
        for cat in sorted({r.category for r in rep.runs}):
            cat_pairs = [(r, p) for r, p in pairs if r.category == cat]
            st = sum(r.steps for r, _ in cat_pairs)
            totals = _totals(cat_pairs)
            cat_s = sum(r.seconds for r, _ in cat_pairs)
            by_cat[cat] = {"tokens_per_s": totals["tokens_per_s"], "speedup_vs_plain": totals["speedup_vs_plain"],
                           "tau": sum(r.produced for r, _ in cat_pairs) / st if st else None,
                           "predicted_speedup": _median_predicted([r for r, _ in cat_pairs]),
                           "cost_model_time_ratio": (sum(r.predicted_s for r, _ in cat_pairs) / cat_s
                                                     if cat_s and all(r.predicted for r, _ in cat_pairs) else None)}
        entry["per_category"] = by_cat
        methods[name] = entry
    return {"prompts": len(prompts), "max_tokens": max_tokens, "cost_curve_ms": {str(k): v for k, v in curve_ms.items()},
            "plain_step_ms": plain_step_ms, "methods": methods}


def _median_predicted(runs: list[Run]) -> float | None:
    """The median predicted speedup of the runs, or None when some run's steps had no prediction."""
    return statistics.median(r.predicted_speedup for r in runs) if runs and all(r.predicted for r in runs) else None


def _totals(pairs: list[tuple[Run, Run]]) -> dict:
    """Tokens, seconds, tokens/s and the median per-prompt speedup of (run, plain run) pairs."""
    tokens = sum(len(r.tokens) for r, _ in pairs)
    seconds = sum(r.seconds for r, _ in pairs)
    ratios = [(len(r.tokens) / r.seconds) / (len(p.tokens) / p.seconds)
              for r, p in pairs if r.seconds > 0 and p.seconds > 0 and p.tokens]
    return {"tokens_per_s": tokens / seconds if seconds else 0.0,
            "speedup_vs_plain": statistics.median(ratios) if ratios else None, "tokens": tokens, "seconds": seconds}


def format_report(result: dict) -> str:
    lines = ["| method | tokens/s | tau | speedup vs plain (median) | predicted speedup | tree-step tau: measured / "
             "predicted | step time: predicted / measured | ceiling | head overhead | accepted per tree step, "
             "depth 1 / 2 / 3 | outputs = plain |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, m in result["methods"].items():
        tau = f"{m['tau']:.2f}" if m["tau"] else "n/a"
        sp = f"{m['speedup_vs_plain']:.2f}x" if m["speedup_vs_plain"] is not None else "n/a"
        pred = f"{m['predicted_speedup']:.2f}x" if name != "prompt_lookup" and m.get("predicted_speedup") else ""
        predicted_ttau = m.get("predicted_tree_steps_tau")
        ttau = (f"{m['tree_steps_tau']:.2f} / {f'{predicted_ttau:.2f}' if predicted_ttau else '-'}"
                if m.get("tree_steps_tau") else ("no tree steps" if name.startswith(("medusa", "eagle3")) else ""))
        acc = " / ".join(f"{a:.2f}" for a in m["acceptance_per_depth"][:3]) if m.get("acceptance_per_depth") else ""
        ratio = f"{m['cost_model_time_ratio']:.2f}" if m.get("cost_model_time_ratio") else ""
        ceil = f"{m['ceiling_speedup']:.2f}x" if m.get("ceiling_speedup") else ""
        over = f"{100 * m['head_overhead_vs_plain_step']:.1f}%" if "head_overhead_vs_plain_step" in m else ""
        match = "yes" if m["outputs_match_plain"] else f"no: {100 * m['match_rate']:.0f}% of prompts match"
        lines.append(f"| {name} | {m['tokens_per_s']:.1f} | {tau} | {sp} | {pred} | {ttau} | {ratio} | {ceil} | {over} "
                     f"| {acc} | {match} |")
    cats = sorted(next(iter(result["methods"].values()))["per_category"])
    lines += ["", "| category | " + " | ".join(f"{n}: tok/s (tau), speedup (predicted)" for n in result["methods"])
              + " |", "|---|" + "---:|" * len(result["methods"])]
    for c in cats:
        cells = []
        for n, m in result["methods"].items():
            pc = m["per_category"][c]
            cell = f"{pc['tokens_per_s']:.1f} ({pc['tau']:.2f})" if pc["tau"] else f"{pc['tokens_per_s']:.1f}"
            if n != "plain" and pc["speedup_vs_plain"] is not None:
                cell += f", {pc['speedup_vs_plain']:.2f}x"
                if n != "prompt_lookup" and pc["predicted_speedup"] is not None:
                    cell += f" ({pc['predicted_speedup']:.2f}x)"
            cells.append(cell)
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "Notes:"] + [f"- {n}: {m['note']}" + (f" (acceptance guard: {100 * m['guard_plain_steps_share']:.0f}%"
                                                         " of steps decoded plainly)" if m.get("guard_plain_steps_share") else "")
                               for n, m in result["methods"].items()]
    return "\n".join(lines)


def plot_report(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["methods"])
    cats = sorted(result["methods"][names[0]]["per_category"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 2.2]})
    ax1.bar(names, [result["methods"][n]["tokens_per_s"] for n in names],
            color=["#888", "#c96", "#69c", "#36a", "#6a6", "#2a5"][: len(names)])
    ax1.set_ylabel("tokens/s"), ax1.set_title(f"all prompts ({result['prompts']}, greedy)")
    ax1.tick_params(axis="x", rotation=25)
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ax2.bar([c + i * width for c in range(len(cats))],
                [result["methods"][n]["per_category"][c]["tokens_per_s"] for c in cats], width, label=n)
    ax2.set_xticks([c + 0.4 - width / 2 for c in range(len(cats))], cats, rotation=30, ha="right")
    ax2.set_ylabel("tokens/s"), ax2.set_title("per category"), ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
