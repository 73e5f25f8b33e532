"""How often the heads guess right on prompts of your choice, against what their weights file claims.

    python scripts/heads_heldout.py --limit 22 --max-tokens 96 --threads 2 [--weights PATH] [--model M.gguf]

The tree calibration multiplies the per-head accuracies stored in the weights file (measured on the training run's
validation split). This script checks them on other prompts (by default the benchmark's held-out ones). For each
prompt it decodes the greedy answer with a top-1 chain of depth 1 (head 1's best guess, verified in the loop), then
extracts the hidden states of prompt + answer as training does and scores every head offline on the answer's
positions (teacher forcing, like validation). It prints three columns for head 1 and the offline top-1 of every head:
the file's figure, the offline figure on these prompts, and the in-loop acceptance of the depth-1 chain.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from medusa_gguf.bench import read_prompts
from medusa_gguf.data import future_tokens
from medusa_gguf.decoding import GenerationResult, SamplingParams, generate
from medusa_gguf.engine import SHIPPED_HEADS, Engine, load_heads_for
from medusa_gguf.settings import Settings
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
    k = heads.config.k_heads
    hits, counts = np.zeros(k), np.zeros(k)
    accepted = steps = 0
    for p in tqdm(read_prompts(args.prompts, args.limit), desc="prompts", unit="prompt"):
        prompt = engine.chat_prompt([{"role": "user", "content": p["prompt"]}])
        result = GenerationResult()
        list(generate(backend, prompt, SamplingParams(max_tokens=args.max_tokens), result, heads=heads, tree=chain(1)))
        accepted += result.stats.accepted_per_depth[0] if result.stats.accepted_per_depth else 0
        steps += result.stats.steps
        seq = prompt + result.tokens
        first = len(prompt) - 1  # h of the last prompt token drafts the answer's second token
        hidden = torch.from_numpy(backend.extract_hidden([seq])[0][first:]).float()
        future = torch.from_numpy(future_tokens(seq, k + 1)[first:]).long()
        with torch.inference_mode():
            logits = heads(hidden, future[:, :k].clamp(min=0))  # dependent heads: the true earlier tokens
        top1 = heads.draft_ids[logits.argmax(-1)]
        truth = future[:, 1 : k + 1]
        hits += ((top1 == truth) & (truth >= 0)).sum(0).numpy()
        counts += (truth >= 0).sum(0).numpy()
    stored = [row[0] for row in heads.config.accuracy]
    offline = (hits / np.maximum(counts, 1)).tolist()
    in_loop = accepted / steps if steps else 0.0
    weights, prompts = _shown(args.weights), _shown(args.prompts)
    print(f"heads: {weights} ({heads.config.head_type}); prompts: {prompts} ({int(counts[0])} answer positions)")
    print("| head | top-1 in the weights file (validation) | top-1 offline, these prompts |")
    print("|---:|---:|---:|")
    for i in range(k):
        print(f"| {i + 1} | {stored[i]:.3f} | {offline[i]:.3f} |")
    print(f"head 1 in the decode loop (chain of depth 1): {accepted}/{steps} steps = {in_loop:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"weights": weights, "prompts": prompts,
                                         "answer_positions": int(counts[0]), "top1_stored": stored,
                                         "top1_offline": offline, "head1_in_loop": in_loop}, indent=1) + "\n")
        print(f"wrote {args.json}")


def _shown(path: Path) -> str:
    """The path relative to the repository when it lies inside it (so that a JSON written here is portable)."""
    try:
        return str(path.resolve().relative_to(ROOT.resolve()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    main()
