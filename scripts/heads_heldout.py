"""How often the heads guess right on prompts of your choice, against what their weights file claims, and the tau
each tree size would give them.

    python scripts/heads_heldout.py --limit 22 --max-tokens 96 --threads 2 \
        [--weights PATH ...] [--trees default,wide,flat] [--json J] [--plot P] [--model M.gguf]

The tree calibration multiplies the per-head accuracies stored in the weights file (measured on the training run's
validation split). This script checks them on other prompts (by default the benchmark's held-out ones). For each
heads file and prompt it decodes the greedy answer with a top-1 chain of depth 1 (head 1's best guess, verified in
the loop), then with each tree of `--trees`, and checks that every tree gave the same answer. It then extracts the
hidden states of prompt + answer and scores every head on the answer's positions with training's own shards and
validation (teacher forcing).

Printed per heads file: head 1's top-1 three ways (the file's figure, offline on these prompts, in the loop), every
head's offline top-1, and tau per tree, offline and in the loop. Trees: `default` (10 nodes, sized for this CPU),
`wide` (41 nodes), `flat` (the tree TREE=auto picks where a decode call costs the same for any number of tokens,
as on a GPU: 63 nodes, grown from the file's accuracies), and offline only, the calibration's candidate trees of
every size from 1 to 63 nodes (the curve `--plot` draws).
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from medusa_gguf.bench import read_prompts
from medusa_gguf.data import build_shards
from medusa_gguf.decoding import GenerationResult, SamplingParams, generate
from medusa_gguf.engine import SHIPPED, Engine, load_heads_for
from medusa_gguf.settings import Settings
from medusa_gguf.training import evaluate
from medusa_gguf.tree import (
    DEFAULT_CHOICES,
    WIDE_CHOICES,
    Tree,
    build_tree,
    calibrate_tree,
    chain,
    greedy_trees,
)

ROOT = Path(__file__).parent.parent
MAX_NODES = 63  # Medusa's own default tree for 7B models has 63 nodes
TARGET_TAU = 2.5  # the project's target, drawn on the plot


def named_trees(accuracy: list[list[float]], k_heads: int) -> dict[str, Tree]:
    flat = calibrate_tree(accuracy, {1: 1.0, 2: 1.0}, max_depth=k_heads, max_nodes=MAX_NODES).tree
    return {"default": build_tree(DEFAULT_CHOICES), "wide": build_tree(WIDE_CHOICES), "flat": flat}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=Path, default=ROOT / "medusa_gguf/prompts/heldout.jsonl",
                    help="JSONL with 'prompt' (default: the benchmark's held-out prompts)")
    ap.add_argument("--limit", type=int, default=22, help="prompts taken from the file, spread over it (0: all)")
    ap.add_argument("--max-tokens", type=int, default=96, help="answer length")
    ap.add_argument("--weights", type=Path, nargs="+", default=[SHIPPED["dependent"], SHIPPED["medusa"]],
                    help="heads files (default: both shipped ones)")
    ap.add_argument("--trees", default="default,wide,flat",
                    help="trees to decode with in the loop, comma-separated (default, wide, flat; '' for none)")
    ap.add_argument("--model", type=Path, help="GGUF file (default: BASE_MODEL_PATH or the embedded model)")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp and torch threads")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON here")
    ap.add_argument("--plot", type=Path, help="draw tau against tree size (PNG)")
    args = ap.parse_args()
    in_loop = [t for t in args.trees.split(",") if t]
    unknown = sorted(set(in_loop) - {"default", "wide", "flat"})
    if unknown:
        ap.error(f"--trees: unknown tree(s) {', '.join(unknown)}; choose from default, wide, flat")
    logging.basicConfig(level=logging.WARNING)

    settings = Settings.from_env(n_threads=args.threads, base_model_path=args.model)
    engine = Engine(settings)
    prompts = [engine.prompt(p["prompt"])
               for p in read_prompts(args.prompts, args.limit)]
    reports = [score(engine, path, prompts, args.max_tokens, in_loop) for path in args.weights]
    for rep in reports:
        print_report(rep, _shown(args.prompts))
    if args.json:
        args.json.write_text(json.dumps({"prompts": _shown(args.prompts), "max_tokens": args.max_tokens,
                                         "heads": reports}, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(reports, args.plot)
        print(f"wrote {args.plot}")


def score(engine: Engine, weights: Path, prompts: list[list[int]], max_tokens: int, in_loop: list[str]) -> dict:
    backend = engine.backend
    heads = load_heads_for(backend, weights)
    k = heads.config.k_heads
    trees = named_trees(heads.config.accuracy, k)
    curve = {f"{t.n_nodes} nodes": t for t in greedy_trees(heads.config.accuracy, k, MAX_NODES)}
    params = SamplingParams(max_tokens=max_tokens)
    seqs, first_rows = [], []
    head1_hits = head1_steps = 0
    loop = {name: {"steps": 0, "tokens": 0, "outputs_match": True} for name in in_loop}
    for prompt in tqdm(prompts, desc=f"{weights.name}: prompts", unit="prompt"):
        result = GenerationResult()
        list(generate(backend, prompt, params, result, heads=heads, tree=chain(1)))
        head1_hits += result.stats.accepted_per_depth[0] if result.stats.accepted_per_depth else 0
        head1_steps += result.stats.steps
        for name in in_loop:
            other = GenerationResult()
            list(generate(backend, prompt, params, other, heads=heads, tree=trees[name]))
            entry = loop[name]
            entry["steps"] += other.stats.steps
            entry["tokens"] += other.stats.tokens
            entry["outputs_match"] &= other.tokens == result.tokens
        seqs.append(prompt + result.tokens)
        first_rows.append(len(prompt) - 1)  # h of the last prompt token drafts the answer's second token
    with tempfile.TemporaryDirectory() as tmp:  # the answers' rows, extracted and scored as in training
        manifest = build_shards(backend, seqs, Path(tmp), model_sha256="held-out", n_future=k + 1,
                                first_rows=first_rows)
        scores = evaluate(heads, manifest.paths(Path(tmp)), torch.device("cpu"), decay=0.8, batch_size=4,
                          trees={**trees, **curve})
    offline = scores["tree_acceptance"]
    return {
        "weights": _shown(weights), "head_type": heads.config.head_type, "answer_positions": scores["val_positions"],
        "top1_stored": [row[0] for row in heads.config.accuracy], "top1_offline": scores["top1"],
        "head1_in_loop": head1_hits / head1_steps if head1_steps else 0.0,
        "trees": {name: {"nodes": tree.n_nodes, "depth": tree.depth, "tau_offline": offline[name],
                         **({"tau_in_loop": loop[name]["tokens"] / max(loop[name]["steps"], 1),
                             "outputs_match_chain_1": loop[name]["outputs_match"]} if name in loop else {})}
                  for name, tree in trees.items()},
        "tau_offline_by_nodes": [[t.n_nodes, offline[name]] for name, t in curve.items()],
    }


def print_report(rep: dict, prompts: str) -> None:
    print(f"\nheads: {rep['weights']} ({rep['head_type']}); prompts: {prompts} ({rep['answer_positions']} answer positions)")
    print("| head | top-1 in the weights file (validation) | top-1 offline, these prompts |")
    print("|---:|---:|---:|")
    for i, (stored, offline) in enumerate(zip(rep["top1_stored"], rep["top1_offline"]), start=1):
        print(f"| {i} | {stored:.3f} | {offline:.3f} |")
    print(f"head 1 in the decode loop (chain of depth 1): {rep['head1_in_loop']:.3f}")
    print("| tree | nodes | depth | tau offline | tau in the loop | same output |")
    print("|---|---:|---:|---:|---:|---|")
    for name, t in rep["trees"].items():
        loop = f"{t['tau_in_loop']:.2f}" if "tau_in_loop" in t else "-"
        same = ("yes" if t["outputs_match_chain_1"] else "NO") if "outputs_match_chain_1" in t else "-"
        print(f"| {name} | {t['nodes']} | {t['depth']} | {t['tau_offline']:.2f} | {loop} | {same} |")


def plot(reports: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for rep, color in zip(reports, ["#2a5", "#36a", "#c63", "#888"]):
        nodes, tau = zip(*rep["tau_offline_by_nodes"])
        ax.plot(nodes, tau, color=color, label=f"{rep['head_type']} heads, offline (calibration's trees)")
        for name, t in rep["trees"].items():
            if "tau_in_loop" in t:
                ax.plot(t["nodes"], t["tau_in_loop"], "o", color=color, markerfacecolor="none")
                ax.annotate(name, (t["nodes"], t["tau_in_loop"]), textcoords="offset points", xytext=(4, -10),
                            fontsize=8, color=color)
    ax.plot([], [], "o", color="#444", markerfacecolor="none", label="named tree, measured in the decode loop")
    ax.axhline(TARGET_TAU, color="#999", linestyle="--", linewidth=1, label=f"target tau {TARGET_TAU}")
    ax.set_xlabel("tree nodes (tokens verified per step)")
    ax.set_ylabel("tau (tokens per step)")
    ax.set_title("Tau against tree size on held-out prompts")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _shown(path: Path) -> str:
    """The path relative to the repository when it lies inside it (so that a JSON written here is portable)."""
    try:
        return str(path.resolve().relative_to(ROOT.resolve()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    main()
