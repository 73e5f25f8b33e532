"""In-loop acceptance of an EAGLE-3 drafter per prompt source: is a gap to validation the loop's or the prompts'?

The drafter's validation split comes from the corpus's own prompt source. This script decodes, with a fixed
dynamic tree shape (TREE=default, or --tree), prompts from three sources. Corpus prompts that neither the drafter's
training draw (`--max_samples N --seed S` of train_medusa.py, repeated here as `--trained N --seed S`) nor the first
`--trained-first M` samples of the corpus (what drafters trained before the draw existed read) touched are the
validation split's source, but unseen. The template held-out set is instruction prompts from templates. The
hand-written unseen set is chat. It prints tau and the share of steps accepted to each depth, per source. When the
corpus row matches validation and the others fall below it, the loop is right and the gap is the prompts'.

    .venv/bin/python scripts/eagle3_by_source.py --per-source 10 --max-tokens 64 --json runs/by_source.json
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
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
    ap.add_argument("--trained", type=int, default=3600,
                    help="the drafter's training draw from the corpus (its --max_samples; default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="the draw's seed (train_medusa.py --seed; default: %(default)s)")
    ap.add_argument("--trained-first", type=int, default=2000,
                    help="also leave out the corpus's first samples (the previous drafter's data; default: %(default)s)")
    ap.add_argument("--tree", choices=("default", "wide", "chain"), default="default",
                    help="dynamic tree shape (TREE=...; default <= 16 nodes, wide <= 48; default: %(default)s)")
    ap.add_argument("--sources", nargs="+", choices=("corpus", "template", "chat"), default=["corpus", "template", "chat"],
                    help="prompt sources to decode (default: all three)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from medusa_gguf.corpus import ROOT as CORPUS_ROOT
    from medusa_gguf.corpus import Store, corpus_dir, read_manifest, read_prompts
    from medusa_gguf.train_args import TrainArgs
    from medusa_gguf.training import training_sequences
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
    plan = plan_decoding(engine.backend, settings, tree=args.tree, weights=drafter)

    def read(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    sha = file_sha256(engine.backend.model_path)
    folder = corpus_dir(CORPUS_ROOT, sha)
    manifest = read_manifest(folder)
    with tempfile.TemporaryDirectory() as tmp:
        drawn = {tuple(s.tokens) for s in training_sequences(
            TrainArgs(corpus=str(CORPUS_ROOT), max_samples=args.trained, seed=args.seed), None, Path(tmp), sha)}
    step = TrainArgs.max_seq_len
    trained = set(manifest.done[: args.trained_first])
    for r in Store(folder, manifest).records():
        toks = [*r.prompt.tolist(), *r.answer.tolist(), *(manifest.end_of_turn if r.finished else [])]
        if any(tuple(toks[i : i + step]) in drawn for i in range(0, len(toks), step)):
            trained.add(r.id)
    fresh = [p.text for p in read_prompts(PROMPTS / "corpus_prompts.jsonl") if p.id not in trained]
    print(f"{len(fresh)} corpus prompts untouched by training", flush=True)
    sources = {
        "corpus prompts past the trained samples (validation's source)": ("corpus", fresh),
        "template held-out (heldout.jsonl)": ("template", [r["prompt"] for r in read(PROMPTS / "heldout.jsonl")]),
        "hand-written chat (unseen.jsonl)": ("chat", [r["prompt"] for r in read(PROMPTS / "unseen.jsonl")]),
    }
    sources = {name: spread(rows, args.per_source) for name, (key, rows) in sources.items() if key in args.sources}
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
        row = {"source": name, "prompts": len(prompts), "steps": steps, "tokens": tokens, "tree": args.tree,
               "tau": tokens / steps, "accepted_per_depth": [n / steps for n in depth], "seconds": time.perf_counter() - t0}
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
