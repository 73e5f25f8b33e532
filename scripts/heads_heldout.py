"""How often the heads guess right on prompts of your choice, against what their weights file claims.

    python scripts/heads_heldout.py --limit 22 --max-tokens 96 --threads 2 [--weights PATH] [--model M.gguf]

The tree calibration multiplies the per-head accuracies stored in the weights file (measured on the training run's
validation split). This script checks them on other prompts (by default the benchmark's held-out ones). For each
prompt it decodes the greedy answer with a top-1 chain of depth 1 (head 1's best guess, verified in the loop), then
extracts the hidden states of prompt + answer and scores every head on the answer's positions with training's
own shards and validation (teacher forcing). It prints three columns for head 1 and the offline top-1 of every head:
the file's figure, the offline figure on these prompts, and the in-loop acceptance of the depth-1 chain.
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
from medusa_gguf.engine import SHIPPED_HEADS, Engine, load_heads_for
from medusa_gguf.settings import Settings
from medusa_gguf.training import evaluate
from medusa_gguf.tree import chain

ROOT = Path(__file__).parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=Path, default=ROOT / "medusa_gguf/prompts/heldout.jsonl",
                    help="JSONL with 'prompt' (default: the benchmark's held-out prompts)")
    ap.add_argument("--limit", type=int, default=22, help="prompts taken from the file, spread over it (0: all)")
    ap.add_argument("--max-tokens", type=int, default=96, help="answer length")
    ap.add_argument("--weights", type=Path, default=SHIPPED_HEADS, help="heads file (default: the shipped default)")
    ap.add_argument("--model", type=Path, help="GGUF file (default: BASE_MODEL_PATH or the embedded model)")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp and torch threads")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    settings = Settings.from_env(n_threads=args.threads, base_model_path=args.model)
    engine = Engine(settings)
    backend = engine.backend
    heads = load_heads_for(backend, args.weights)
    seqs, first_rows = [], []
    accepted = steps = 0
    for p in tqdm(read_prompts(args.prompts, args.limit), desc="prompts", unit="prompt"):
        prompt = engine.chat_prompt([{"role": "user", "content": p["prompt"]}])
        result = GenerationResult()
        list(generate(backend, prompt, SamplingParams(max_tokens=args.max_tokens), result, heads=heads, tree=chain(1)))
        accepted += result.stats.accepted_per_depth[0] if result.stats.accepted_per_depth else 0
        steps += result.stats.steps
        seqs.append(prompt + result.tokens)
        first_rows.append(len(prompt) - 1)  # h of the last prompt token drafts the answer's second token
    with tempfile.TemporaryDirectory() as tmp:  # the answers' rows, extracted and scored as in training
        manifest = build_shards(backend, seqs, Path(tmp), model_sha256="held-out", n_future=heads.config.k_heads + 1,
                                first_rows=first_rows)
        scores = evaluate(heads, manifest.paths(Path(tmp)), torch.device("cpu"), decay=0.8, batch_size=4)
    k = heads.config.k_heads
    stored = [row[0] for row in heads.config.accuracy]
    offline = scores["top1"]
    in_loop = accepted / steps if steps else 0.0
    weights, prompts = _shown(args.weights), _shown(args.prompts)
    print(f"heads: {weights} ({heads.config.head_type}); prompts: {prompts} ({scores['val_positions']} answer positions)")
    print("| head | top-1 in the weights file (validation) | top-1 offline, these prompts |")
    print("|---:|---:|---:|")
    for i in range(k):
        print(f"| {i + 1} | {stored[i]:.3f} | {offline[i]:.3f} |")
    print(f"tau of the default tree, offline, these prompts: {scores['val_acceptance']:.3f}")
    print(f"head 1 in the decode loop (chain of depth 1): {accepted}/{steps} steps = {in_loop:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"weights": weights, "prompts": prompts,
                                         "answer_positions": scores["val_positions"], "top1_stored": stored,
                                         "top1_offline": offline, "tau_default_tree_offline": scores["val_acceptance"],
                                         "head1_in_loop": in_loop}, indent=1) + "\n")
        print(f"wrote {args.json}")


def _shown(path: Path) -> str:
    """The path relative to the repository when it lies inside it (so that a JSON written here is portable)."""
    try:
        return str(path.resolve().relative_to(ROOT.resolve()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    main()
