"""Head overhead inside the decode loop: drafting time per step against a plain step, both measured in one process.

    python scripts/head_overhead.py --limit 6 --max-tokens 64 --threads 2 [--json docs/head_overhead.json]

For each shipped head type and tree (the static default tree, top-1 chains of depth 1 and 2) it decodes the same
held-out prompts with the exact fp32 drafting path on one torch thread (how drafting ran before) and with the int8
path on llama.cpp's thread count (how it runs now), alternating the two `--rounds` times so that machine drift hits
both. The heads' time is taken around `heads.draft` inside the loop, right after llama.cpp's decode, which is where
it counts: the same draft costs about half as much when its weights are still in the caches.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from medusa_gguf.bench import read_prompts
from medusa_gguf.decoding import GenerationResult, SamplingParams, generate
from medusa_gguf.engine import SHIPPED, Engine, plan_decoding
from medusa_gguf.settings import Settings
from medusa_gguf.tree import chain

MODES = {"fp32, 1 thread": (False, 1), "int8, llama.cpp's threads": (True, None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=Path, default=Path(__file__).parent.parent / "medusa_gguf/prompts/heldout.jsonl")
    ap.add_argument("--limit", type=int, default=6, help="prompts taken from the file (spread over it)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: N_THREADS or automatic)")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two drafting modes")
    ap.add_argument("--json", type=Path, help="write the table as JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    settings = Settings.from_env(n_threads=args.threads)
    engine = Engine(settings)
    backend = engine.backend
    prompts = [engine.prompt(p["prompt"]) for p in read_prompts(args.prompts, args.limit)]
    params = SamplingParams(max_tokens=args.max_tokens)

    def run(heads=None, tree=None) -> tuple[float, int, int, float]:  # seconds, steps, tokens, heads seconds
        t0, steps, tokens, heads_s = time.perf_counter(), 0, 0, 0.0
        for tokens_in in prompts:
            r = GenerationResult()
            list(generate(backend, tokens_in, params, r, heads=heads, tree=tree))
            steps, tokens, heads_s = steps + r.stats.steps, tokens + r.stats.tokens, heads_s + r.stats.time_heads_s
        return time.perf_counter() - t0, steps, tokens, heads_s

    run()  # warm-up
    plain_s, plain_steps, _, _ = run()
    rows: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    plans = {head_type: plan_decoding(backend, settings, tree="default", weights=path) for head_type, path in SHIPPED.items()}
    for _ in range(args.rounds):
        for head_type, plan in plans.items():
            for tree_name, tree in (("default", plan.tree), ("chain 1", chain(1)), ("chain 2", chain(2))):
                for mode, (int8, threads) in MODES.items():
                    plan.heads.draft_int8 = int8
                    torch.set_num_threads(threads or backend.n_threads)
                    _, steps, tokens, heads_s = run(plan.heads, tree)
                    rows.setdefault((head_type, tree_name, mode), []).append((heads_s / steps * 1e3, tokens / steps))
    plain_s2, plain_steps2, _, _ = run()
    plain_ms = 1e3 * (plain_s + plain_s2) / (plain_steps + plain_steps2)

    table = [{"heads": h, "tree": t, "mode": m, "head_ms_per_step": float(np.mean([ms for ms, _ in v])),
              "share_of_plain_step": float(np.mean([ms for ms, _ in v])) / plain_ms, "tau": v[0][1]}
             for (h, t, m), v in rows.items()]
    print(f"plain step {plain_ms:.2f} ms ({len(prompts)} prompts, {args.max_tokens} tokens, {backend.n_threads} threads)")
    print("| heads | tree | drafting | heads ms/step | share of a plain step | tau |\n|---|---|---|---:|---:|---:|")
    for r in table:
        print(f"| {r['heads']} | {r['tree']} | {r['mode']} | {r['head_ms_per_step']:.2f} | "
              f"{100 * r['share_of_plain_step']:.1f}% | {r['tau']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"plain_step_ms": plain_ms, "rows": table}, indent=1))
        print(f"wrote {args.json}")
    engine.close()


if __name__ == "__main__":
    main()
