"""In-loop acceptance of an EAGLE-3 drafter per prompt source: is a gap to validation the loop's or the prompts'?

The drafter's validation split comes from the corpus's own prompt source. This script decodes, with a static
dynamic tree (TREE=default), prompts from three sources. Corpus prompts outside the first --trained samples of
the corpus (the shipped drafter trained on the first 2,000: `--max_samples 2000`) are the validation split's
source, but unseen. The template held-out set is instruction prompts from templates. The
hand-written unseen set is chat. It prints tau and the share of steps accepted to each depth, per source. When the
corpus row matches validation and the others fall below it, the loop is right and the gap is the prompts'.

    .venv/bin/python scripts/eagle3_by_source.py --per-source 10 --max-tokens 64 --json runs/by_source.json
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "medusa_gguf" / "prompts"


def spread(rows: list[str], n: int) -> list[str]:
    return rows[:: max(1, len(rows) // n)][:n]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", type=Path, default=None, help="EAGLE-3 .gguf (default: the shipped drafter)")
    ap.add_argument("--per-source", type=int, default=10, help="prompts per source")
    ap.add_argument("--trained", type=int, default=2000,
                    help="corpus samples the drafter was trained on (its --max_samples; default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from medusa_gguf.corpus import ROOT as CORPUS_ROOT
    from medusa_gguf.corpus import corpus_dir, read_manifest, read_prompts
    from medusa_gguf.models import file_sha256
    from medusa_gguf.decoding import GenerationResult, SamplingParams
    from medusa_gguf.engine import SHIPPED_EAGLE3, Engine, plan_decoding
    from medusa_gguf.settings import Settings

    logging.basicConfig(level=logging.WARNING)
    settings = Settings.from_env(n_threads=args.threads)
    engine = Engine(settings)
    drafter = args.drafter or SHIPPED_EAGLE3
    if not drafter.is_file():
        ap.error(f"no EAGLE-3 drafter at {drafter}")
    plan = plan_decoding(engine.backend, settings, tree="default", weights=drafter)

    def read(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    trained = set(read_manifest(corpus_dir(CORPUS_ROOT, file_sha256(engine.backend.model_path))).done[:args.trained])
    fresh = [p.text for p in read_prompts(PROMPTS / "corpus_prompts.jsonl") if p.id not in trained]
    sources = {
        "corpus prompts past the trained samples (validation's source)": spread(fresh, args.per_source),
        "template held-out (heldout.jsonl)": spread([r["prompt"] for r in read(PROMPTS / "heldout.jsonl")],
                                                    args.per_source),
        "hand-written chat (unseen.jsonl)": spread([r["prompt"] for r in read(PROMPTS / "unseen.jsonl")],
                                                   args.per_source),
    }
    params = SamplingParams(max_tokens=args.max_tokens)
    results = []
    for name, prompts in sources.items():
        if not prompts:
            print(f"{name}: no prompts")
            continue
        steps = tokens = 0
        depth: list[int] = []
        t0 = time.perf_counter()
        for p in prompts:
            r = GenerationResult()
            list(plan.generate(engine.backend, engine.prompt(p), params, r))
            steps += r.stats.steps
            tokens += r.stats.tokens
            depth = [a + b for a, b in zip(depth, r.stats.accepted_per_depth)] if depth \
                else list(r.stats.accepted_per_depth)
        row = {"source": name, "prompts": len(prompts), "steps": steps, "tokens": tokens, "tau": tokens / steps,
               "accepted_per_depth": [n / steps for n in depth], "seconds": time.perf_counter() - t0}
        results.append(row)
        print(f"{name}: tau {row['tau']:.2f}, accepted to depth 1..{len(depth)}: "
              f"{' / '.join(f'{a:.3f}' for a in row['accepted_per_depth'])} ({len(prompts)} prompts)", flush=True)
    plan.close()
    engine.close()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
