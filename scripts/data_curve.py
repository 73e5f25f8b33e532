"""How head accuracy and acceptance grow with the amount of self-distilled data, for each head type.

    python scripts/data_curve.py --cache runs/recipe/cache --prompts 440 --sequences 105,210,418 \
        --head-types medusa,dependent --epochs 6 --json docs/data_curve.json --plot docs/data_curve.png

Reuses the hidden-state cache of a `medusa-gguf recipe default --prompts N` run (`--prompts` must be that N, so
the cache matches) and trains the recipe's heads on the first S training sequences for each S, always validating
on the same held-out sequences, so the points differ only in the amount of training data. Each run lands in
`--output/<type>-<S>/` with its metrics and weights.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medusa_gguf.recipe import default_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, required=True, help="the recipe run's cache folder (distilled data, shards)")
    p.add_argument("--prompts", type=int, required=True, help="--prompts of the recipe run that built the cache")
    p.add_argument("--sequences", default="105,210,418", help="comma-separated numbers of training sequences")
    p.add_argument("--head-types", default="medusa,dependent", help="comma-separated: medusa, dependent")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", type=Path, default=Path("runs/data-curve"))
    p.add_argument("--json", type=Path, default=None, help="write the curve here")
    p.add_argument("--plot", type=Path, default=None, help="PNG: acceptance and head-1 top-1 against sequences")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from medusa_gguf.training import train

    if not (args.cache / "train-rank0" / "manifest.json").is_file():
        p.error(f"{args.cache} holds no hidden-state cache; run `medusa-gguf recipe default --prompts N` first")
    points = []
    for head_type in args.head_types.split(","):
        for n in (int(x) for x in args.sequences.split(",")):
            out = args.output / f"{head_type}-{n}"
            targs = replace(default_args(out, args.prompts, args.epochs, args.threads, head_type),
                            cache_dir=str(args.cache), max_train_sequences=n)
            t0 = time.perf_counter()
            train(targs)
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
            last = [r for r in rows if "top1" in r][-1]
            points.append({"head_type": head_type, "sequences": n,
                           "positions": _positions(args.cache, n), "val_acceptance": last["val_acceptance"],
                           "top1": last["top1"], "val_loss": last["val_loss"],
                           "train_minutes": (time.perf_counter() - t0) / 60})
            print(json.dumps(points[-1]), flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"epochs": args.epochs, "points": points}, indent=1) + "\n")
    if args.plot:
        plot(points, args.plot)
    return 0


def _positions(cache: Path, n: int) -> int:
    from safetensors import safe_open

    manifest = json.loads((cache / "train-rank0" / "manifest.json").read_text())
    rows = 0
    for name in manifest["shards"]:
        with safe_open(str(cache / "train-rank0" / name), framework="np") as f:
            offsets = f.get_tensor("offsets")
        take = min(n, len(offsets) - 1)
        rows += int(offsets[take])
        n -= take
        if n <= 0:
            break
    return rows


def plot(points: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for head_type in sorted({p["head_type"] for p in points}):
        pts = sorted((p for p in points if p["head_type"] == head_type), key=lambda p: p["positions"])
        x = [p["positions"] for p in pts]
        ax1.plot(x, [p["val_acceptance"] for p in pts], "o-", label=head_type)
        ax2.plot(x, [p["top1"][0] for p in pts], "o-", label=f"{head_type} head 1")
        ax2.plot(x, [p["top1"][1] for p in pts], "s--", label=f"{head_type} head 2")
    ax1.set_xscale("log"), ax2.set_xscale("log")
    ax1.set_xlabel("training positions (self-distilled tokens)"), ax1.set_ylabel("tau, default tree (held out)")
    ax2.set_xlabel("training positions (self-distilled tokens)"), ax2.set_ylabel("top-1 accuracy (held out)")
    ax1.legend(), ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
