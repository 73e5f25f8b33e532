"""The recipe behind the heads shipped for the default model, reproducible from nothing:

    medusa-gguf recipe default [--prompts N] [--epochs E] [--install]

1. self-distillation: the embedded SmolLM2-135M-Instruct answers the project's training prompts
   (medusa_gguf/prompts/train.jsonl; the held-out prompts are never used);
2. hidden-state extraction; 3. training; 4. validation (inside training, every epoch);
5. tree calibration against this machine's cost curve; then a report (REPORT.md) beside the heads.
`--install` copies the heads, in fp16, to medusa_gguf/assets/, where the engine finds them for this model.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

from .train_args import TrainArgs

log = logging.getLogger(__name__)
PROMPTS = Path(__file__).parent / "prompts" / "train.jsonl"


def default_args(output_dir: Path, prompts: int, epochs: int, threads: int, head_type: str = "medusa") -> TrainArgs:
    # An own projection per head: +4 points of top-1 for either type. Dependent heads read one projection per tree
    # level anyway; Medusa heads score every head in one call, which would then read 4-5 matrices instead of one
    # (13.1% of a plain step instead of 7.8% on the default tree, over the 10% budget, for +0.06 tau).
    return TrainArgs(
        self_distill=True, prompts_file=str(PROMPTS), max_samples=prompts, distill_max_tokens=192,
        output_dir=str(output_dir), cache_dir=str(output_dir / "cache"), k_heads=5, head_type=head_type, num_layers=1,
        own_lm_head=head_type == "dependent", draft_vocab_size=4096, batch_size=4, learning_rate=1e-3, epochs=epochs,
        save_steps=200, threads=threads,
    )


def run_recipe(output_dir: Path, *, prompts: int, epochs: int, threads: int, install: bool, resume: bool = False,
               head_type: str = "medusa") -> Path:
    from .training import train

    args = replace(default_args(output_dir, prompts, epochs, threads, head_type), resume=resume)
    t0 = time.perf_counter()
    train(args)
    return finalize(args, time.perf_counter() - t0, install=install)


def finalize(args: TrainArgs, train_s: float, *, install: bool, note: str = "") -> Path:
    """After training: calibrate on this machine, write the fp16 heads and REPORT.md; `install` copies the heads
    into the package as the shipped heads of their type."""
    from .backend import Backend
    from .engine import SHIPPED, cost_curve, head_cost_ms, load_heads_for
    from .heads import save_heads
    from .settings import Settings
    from .tree import calibrate_tree

    output_dir = Path(args.output_dir)
    settings = Settings.from_env(n_threads=args.threads or None)
    with Backend(settings) as backend:
        heads = load_heads_for(backend, output_dir / "medusa_heads_latest.pth")
        curve = cost_curve(backend, settings)
        head_ms = head_cost_ms(heads, backend.n_embd, heads.config.k_heads)
    cal = calibrate_tree(heads.config.accuracy, curve.ms, max_depth=min(heads.config.k_heads, settings.max_tokens_per_step - 1),
                         head_cost_ms=head_ms)
    shipped = output_dir / "medusa_heads_shipped.pth"
    save_heads(heads, shipped, half=True)
    write_report(output_dir, args, heads.config, train_s, cal, head_ms, shipped, note)
    if install:
        target = SHIPPED[args.head_type]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shipped, target)
        log.info("installed %s (%.1f MB)", target, target.stat().st_size / 1e6)
    return shipped


def write_report(out: Path, args: TrainArgs, config, train_s: float, cal, head_ms: list[float], shipped: Path,
                 note: str = "") -> None:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [r for r in rows if "top1" in r]
    last = val[-1] if val else {}
    cache = Path(args.cache_dir) if args.cache_dir else out / "cache"
    manifest = json.loads((cache / "train-rank0" / "manifest.json").read_text())
    lines = [
        f"# Training report: {args.head_type} heads for SmolLM2-135M-Instruct (Q4_1)",
        "",
        f"Recipe: `medusa-gguf recipe default --prompts {args.max_samples} --epochs {args.epochs}"
        f" --head-type {args.head_type}`"
        f" ({args.k_heads} {args.head_type} heads, {args.num_layers} residual block each"
        f"{', an own projection each' if args.own_lm_head else ''}, draft vocabulary {args.draft_vocab_size},"
        f" lr {args.learning_rate}, batch {args.batch_size} sequences).",
        "",
        f"- Data: {args.max_samples} prompts of medusa_gguf/prompts/train.jsonl, answered greedily by the model itself"
        f" (at most {args.distill_max_tokens} tokens); {manifest['rows']} training positions from"
        f" {manifest['sequences']} sequences; {last.get('val_positions', 0)} held-out positions"
        + (" (every position, prompts included)." if args.train_on_prompt else
           " (the answers' positions only, from the last prompt token on: the prompts are context)."),
        f"- Time on this machine (distillation, extraction and training): {train_s / 60:.1f} min{note}.",
        f"- Validation loss: {last.get('val_loss', float('nan')):.3f}.",
        f"- Validation acceptance (tokens per greedy step, default tree): {last.get('val_acceptance', float('nan')):.3f}.",
        "",
        "| head | top-1 | top-5 |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {k + 1} | {t1:.3f} | {t5:.3f} |" for k, (t1, t5) in enumerate(zip(last.get("top1", []), last.get("top5", [])))]
    lines += [
        "",
        f"Tree calibration on this machine (heads cost {' / '.join(f'{m:.2f}' for m in head_ms)} ms per step for"
        f" drafts of depth 1..{len(head_ms)}): {cal.reason}.",
        "",
        f"Heads file: `{shipped.name}`, {shipped.stat().st_size / 1e6:.1f} MB (fp16; "
        + ("each head's projection onto the draft vocabulary is its own, trained from the model's output matrix)."
           if args.own_lm_head else "the projection is the model's own output matrix, read from the GGUF)."),
        "",
        "![training curves](training_curves.png)",
    ]
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")
