"""Train an EAGLE-3 drafter with training-time test on the target's own three-layer features.

    python model/train_medusa.py --head_type eagle3 --self_distill --prompts_file P.jsonl --ttt_steps 3

Pipeline: samples -> (self-distillation) -> token sequences -> features of three target layers at EVERY position
(features.extract_feature_shards; the drafter attends over the prompt too, so prompt rows are kept as context)
-> training. Each micro-batch is whole sequences, padded at the end (causal attention never reads the padding).
The drafter is unrolled `ttt_steps` times on its own prenorm states (eagle3.Eagle3Drafter.ttt_forward); step k at
row t predicts token t+k+2 and its loss counts only where the step's input token is real, the target lies in the
draft vocabulary, and t is an answer row (from the last prompt token on, like the heads; --train_on_prompt keeps
all). Loss = sum_k loss_decay^k * CE_k.

Validation reports, per step, top-1 accuracy given that every earlier step was right (what a chain accepts), and
the offline tau of a chain of `ttt_steps` drafts: 1 + sum_k P(steps 0..k all right).
Checkpoints (eagle3_epoch{N}.pth, eagle3_latest.pth), training_state.pth (--resume), metrics.jsonl and
training_curves.png go to --output_dir, written atomically, as for the heads.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import data as D
from .heads import atomic_torch_save
from .models import file_sha256, resolve_model_path
from .settings import Settings
from .train_args import TrainArgs

log = logging.getLogger(__name__)

LATEST = "eagle3_latest.pth"


def _shards(paths: list[Path]) -> list[dict[str, np.ndarray]]:
    return [D.read_shard(p) for p in paths]


BUCKET = 32  # batches per length-sorted window


def sequence_batches(paths: list[Path], first_rows: list[int], batch_size: int, epoch: int, seed: int,
                     shuffle: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches of whole sequences in shard order: features [B, T, 3d] float32, tokens [B, T], future
    [B, T, F] (-1 = none), answer [B, T] bool (rows trained and scored), valid [B, T] bool (not padding).

    `first_rows[i]` is sequence i's first answer row, sequences numbered across the shards in order. Shuffled
    batches are drawn from windows of `BUCKET` batches sorted by length, so that little of a batch is padding."""
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    base = 0
    for path in paths:
        shard = D.read_shard(path)
        offsets = shard["offsets"]
        n = len(offsets) - 1
        order = torch.randperm(n, generator=gen).tolist() if shuffle else list(range(n))
        groups, span = [], batch_size * (BUCKET if shuffle else 1)
        for w in range(0, n, span):
            window = order[w : w + span]
            if shuffle:
                window.sort(key=lambda i: int(offsets[i + 1] - offsets[i]))
            groups += [window[b : b + batch_size] for b in range(0, len(window), batch_size)]
        if shuffle:
            groups = [groups[i] for i in torch.randperm(len(groups), generator=gen).tolist()]
        for seqs in groups:
            T = max(int(offsets[i + 1] - offsets[i]) for i in seqs)
            B, width, n_future = len(seqs), shard["features"].shape[1], shard["future"].shape[1]
            feats = np.zeros((B, T, width), dtype=np.float32)
            tokens = np.zeros((B, T), dtype=np.int64)
            future = np.full((B, T, n_future), -1, dtype=np.int64)
            answer = np.zeros((B, T), dtype=bool)
            valid = np.zeros((B, T), dtype=bool)
            for j, i in enumerate(seqs):
                lo, hi = int(offsets[i]), int(offsets[i + 1])
                L = hi - lo
                feats[j, :L] = shard["features"][lo:hi]
                tokens[j, :L] = shard["tokens"][lo:hi]
                future[j, :L] = shard["future"][lo:hi]
                valid[j, :L] = True
                answer[j, first_rows[base + i]:L] = True
            yield {"features": torch.from_numpy(feats), "tokens": torch.from_numpy(tokens),
                   "future": torch.from_numpy(future), "answer": torch.from_numpy(answer),
                   "valid": torch.from_numpy(valid)}
        base += n


OOV = -2  # step_targets: a target the draft vocabulary lacks


def draft_index(drafter) -> torch.Tensor:
    """[n_vocab]: each target id's draft id, -1 outside the draft vocabulary (d2t is the identity without one)."""
    index = torch.full((drafter.config.n_vocab,), -1, dtype=torch.long)
    index[drafter.d2t] = torch.arange(len(drafter.d2t))
    return index


def step_targets(batch: dict[str, torch.Tensor], full_to_draft: torch.Tensor, steps: int) -> torch.Tensor:
    """Draft-vocabulary targets [steps, B, T]: -1 where a row does not count at that step, OOV (-2) where it counts
    but its target lies outside the draft vocabulary (no loss; a miss in validation).

    Step k at row t reads token t+1+k (future[:, t, k], real only inside the sequence) and predicts token t+k+2
    (future[:, t, k+1]; past the shards' future columns, the batch's own token t+k+2); the row must be an answer
    row."""
    fut, tokens = batch["future"], batch["tokens"]
    T = fut.shape[1]
    length = batch["valid"].sum(1, keepdim=True)
    out = []
    for k in range(steps):
        if k + 1 < fut.shape[2]:
            tgt = fut[:, :, k + 1]
        else:
            at = torch.arange(T) + k + 2
            tgt = torch.where(at < length, tokens[:, at.clamp(max=T - 1)], torch.full_like(tokens, -1))
        # ttt_forward gives row t the token at t+1+k only when that row exists in the batch (t+1+k < T)
        inside = torch.arange(T) + 1 + k < length
        ok = (tgt >= 0) & inside & batch["answer"]
        mapped = full_to_draft[tgt.clamp(min=0)]
        out.append(torch.where(ok, torch.where(mapped >= 0, mapped, torch.full_like(mapped, OOV)),
                               torch.full_like(mapped, -1)))
    return torch.stack(out)


def ttt_loss(drafter, states: list[torch.Tensor], targets: torch.Tensor, decay: float
             ) -> tuple[torch.Tensor, list[float]]:
    """sum_k decay^k * CE_k over the rows that count; per-step CE for the log. The head runs on those rows only."""
    total = torch.zeros(())
    per_step = []
    for k, h in enumerate(states):
        rows = targets[k] >= 0  # OOV rows (-2) carry no loss
        if rows.any():
            ce = F.cross_entropy(drafter.logits(h[rows]).float(), targets[k][rows])
        else:
            ce = h.sum() * 0.0
        total = total + decay ** k * ce
        per_step.append(float(ce.detach()))
    return total, per_step


def autocast(precision: str):
    """The matmuls' precision context: bf16 autocast (weights stay fp32) or none."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def pick_precision(name: str) -> str:
    """auto: bf16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX: about 2x the fp32 matmul speed
    measured here), else fp32."""
    if name not in ("auto", "fp32", "bf16"):
        raise ValueError(f"--precision must be auto, fp32 or bf16, got {name!r}")
    if name != "auto":
        return name
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16" if native else "fp32"


@torch.no_grad()
def evaluate(drafter, paths: list[Path], first_rows: list[int], steps: int, decay: float, batch_size: int,
             full_to_draft: torch.Tensor, ranks: int = 8, precision: str = "fp32", eval_steps: int = 0
             ) -> dict[str, Any]:
    """Validation loss, per-step top-1, the chain's tau (over the `steps` trained steps), and the rank accuracies
    that size the tree at inference, over max(steps, eval_steps) unrolled steps: rank_accuracy[k][r], the share of
    rows whose steps before k were right where step k's rank-r guess is."""
    unrolled = max(steps, eval_steps)
    drafter.eval()
    losses, rows = [], 0
    right_chain = torch.zeros(steps)
    top1 = torch.zeros(steps)
    counted = torch.zeros(steps)
    at_rank = torch.zeros(unrolled, ranks)  # rows whose target is step k's rank-r guess, the earlier steps right
    reached = torch.zeros(unrolled)  # rows whose earlier steps were right
    for batch in sequence_batches(paths, first_rows, batch_size, 0, 0, shuffle=False):
        targets = step_targets(batch, full_to_draft, unrolled)
        with autocast(precision):
            states = drafter.ttt_states(batch["features"], batch["tokens"], unrolled)
            loss, _ = ttt_loss(drafter, states[:steps], targets[:steps], decay)
        losses.append(float(loss))
        base = targets[0] != -1  # rows where the first draft counts: the chain's starting points
        chain = base.clone()
        for k in range(unrolled):
            valid = targets[k] != -1  # OOV targets count, as misses
            with autocast(precision):
                lg = drafter.logits(states[k][valid]).float()  # [n, draft_vocab]
            top = torch.full((*valid.shape, ranks), -1, dtype=torch.long)
            top[valid] = lg.topk(ranks, dim=-1).indices
            hit = (top[..., 0] == targets[k]) & valid
            live = chain & valid
            at_rank[k] += (top[live] == targets[k][live][:, None]).float().sum(0)
            reached[k] += float(live.sum())
            chain &= hit
            if k < steps:
                top1[k] += float(hit[valid].sum())
                counted[k] += float(valid.sum())
                right_chain[k] += float(chain[base].sum())
        rows += int(base.sum())
    drafter.train()
    rows = max(rows, 1)
    accept = (right_chain / rows).tolist()
    return {"val_loss": float(np.mean(losses)) if losses else float("nan"),
            "top1": (top1 / counted.clamp(min=1)).tolist(), "chain_accept": accept,
            "val_tau_chain": 1.0 + float(sum(accept)), "val_rows": rows,
            "rank_accuracy": (at_rank / reached.clamp(min=1)[:, None]).tolist()}


@torch.no_grad()
def init_fuse(drafter) -> None:
    """Start g near the target's own late state: fc passes the highest layer's features through.

    With norm_before_fc the features are RMS-normed (input_norm starts at 1), so g starts at unit scale, like the
    layer's attention and FFN outputs, and a tenth of fc's random start is kept so the two lower layers reach g
    from the first step. Measured on the default model (80 steps of 2 sequences, lr 1e-3, CE per TTT step at the
    end): 4.9 / 5.9 / 6.3 this way, against 5.4 / 6.6 / 7.0 when input_norm restores the raw scale (the residual
    stream reaches ~25,000 there, so the layer's updates barely moved the prenorm) and 6.6 / 7.0 / 7.2 with a
    random fc. Without norm_before_fc, fc is the pass-through alone on the raw stream."""
    w = drafter.config.target_width
    if drafter.config.norm_before_fc:
        drafter.fc.weight.mul_(0.1)
        drafter.input_norm.fill_(1.0)
    else:
        drafter.fc.weight.zero_()
    drafter.fc.weight[:, 2 * w : 3 * w] += torch.eye(drafter.config.width, w)


def _lr(step: int, warmup: int, total: int) -> float:
    from .training import lr_lambda

    return lr_lambda(step, warmup, total)


def train_eagle3(args: TrainArgs) -> Path:
    """Run the whole EAGLE-3 pipeline; return the path of eagle3_latest.pth."""
    from .backend import Backend
    from .eagle3 import save_drafter
    from .eagle3_gguf import drafter_for_target
    from .features import default_target_layers, extract_feature_shards
    from .training import corpus_sequences, pick_device, plot_metrics, training_sequences

    if args.ttt_steps < 1:
        raise ValueError(f"--ttt_steps {args.ttt_steps}: at least 1")
    device = pick_device(args.device)
    if device.type != "cpu":
        log.info("EAGLE-3 training runs on the CPU in this version (device %s asked for)", device)
    precision = pick_precision(args.precision)
    log.info("EAGLE-3 training precision: %s%s", precision,
             " (auto: this CPU multiplies bf16 natively)" if args.precision == "auto" and precision == "bf16" else
             " (auto: no native bf16 on this CPU)" if args.precision == "auto" else "")
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    cache = Path(args.cache_dir) if args.cache_dir else out / "cache"
    model_path = resolve_model_path(args.base_model_path)
    model_sha = file_sha256(model_path)
    settings = Settings.from_env(base_model_path=model_path, n_threads=args.threads or None,
                                 n_ctx=max(1024, args.max_seq_len + 64))
    backend = Backend(settings)
    if args.train_on_rest:
        seqs, rest = corpus_sequences(args, model_sha)
    else:
        seqs, rest = training_sequences(args, backend, cache, model_sha), []
    train_seqs, val_seqs = D.split_sequences(seqs, args.val_fraction, args.seed)
    layers = default_target_layers(backend.n_layer)
    n_vocab = backend.n_vocab
    n_future = max(2, args.ttt_steps + 1)  # future[:, k + 1] is step k's target
    manifests = {}
    # each part has a cache of its own, so --train_on_rest reuses the draw's train and val features as they are
    parts = {"train": train_seqs, "val": val_seqs, **({"rest": rest} if rest else {})}
    if args.eval_only:
        parts = {"val": val_seqs}
    for name, part in parts.items():
        manifests[name] = extract_feature_shards(backend, [s.tokens for s in part], cache / f"eagle3-{name}-f{n_future}",
                                                 n_future=n_future, layers=layers,
                                                 desc=f"EAGLE-3 features ({name})")
    backend.close()
    if args.eval_only:
        return reevaluate(args, out / LATEST, model_path, model_sha, layers,
                          manifests["val"].paths(cache / f"eagle3-val-f{n_future}"), [s.first_row for s in val_seqs],
                          precision)
    trained = [name for name in parts if name != "val"]
    train_paths = [p for name in trained for p in manifests[name].paths(cache / f"eagle3-{name}-f{n_future}")]
    val_paths = manifests["val"].paths(cache / f"eagle3-val-f{n_future}")
    train_first = [s.first_row for s in train_seqs + rest]
    val_first = [s.first_row for s in val_seqs]
    log.info("EAGLE-3: layers %s, %d training rows from %d sequences, %d validation sequences, %d TTT steps",
             layers, sum(manifests[name].rows for name in trained), len(train_seqs) + len(rest),
             len(val_seqs), args.ttt_steps)

    # Draft vocabulary: the most frequent targets of the training answers.
    counts = np.zeros(n_vocab, dtype=np.int64)
    for p in train_paths:
        fut = D.read_shard(p)["future"][:, 1:]
        np.add.at(counts, fut[fut >= 0], 1)
    d2t = None
    if args.draft_vocab_size and args.draft_vocab_size < n_vocab:
        d2t = torch.sort(torch.argsort(torch.from_numpy(counts), descending=True, stable=True)[: args.draft_vocab_size]).values
        log.info("draft vocabulary: %d tokens cover %.1f%% of training targets", len(d2t),
                 100 * counts[d2t.numpy()].sum() / max(1, counts.sum()))
    drafter = drafter_for_target(model_path, d2t, target_layers=layers, norm_before_fc=args.norm_before_fc)
    init_fuse(drafter)
    drafter.config = replace(drafter.config, base_model_sha256=model_sha, training_args=asdict(args))
    full_to_draft = draft_index(drafter)

    n_batches = sum(math.ceil((len(D.read_shard(p)["offsets"]) - 1) / args.batch_size) for p in train_paths)
    steps_per_epoch = max(1, n_batches // args.grad_accum)
    total = steps_per_epoch * args.epochs
    warmup = args.warmup_steps or max(1, total // 20)
    params = [p for p in drafter.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: _lr(s, warmup, total))
    step, start_epoch, start_micro = 0, 0, 0
    state_path = out / "training_state.pth"
    if args.resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"--resume: no training state at {state_path}; start without --resume")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        drafter.load_state_dict(state["drafter"], strict=False)
        optim.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, start_epoch, start_micro = state["step"], state["epoch"], state["micro"]
        torch.set_rng_state(state["rng"])
        log.info("resumed from %s at step %d (epoch %d, micro-batch %d)", state_path, step, start_epoch, start_micro)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    if not args.resume and metrics_path.exists():
        metrics_path.unlink()

    def checkpoint(epoch: int, micro: int, names: list[str]) -> None:
        for name in names:
            save_drafter(drafter, out / name)
        atomic_torch_save({"drafter": drafter.trainable_state_dict(), "optimizer": optim.state_dict(),
                           "scheduler": sched.state_dict(), "step": step, "epoch": epoch, "micro": micro,
                           "rng": torch.get_rng_state()}, state_path)

    def log_metrics(row: dict[str, Any]) -> None:
        with open(metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    for epoch in range(start_epoch, args.epochs):
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step")
        bar.update(start_micro // args.grad_accum)
        rows_seen, t0 = 0, time.perf_counter()
        optim.zero_grad(set_to_none=True)
        for micro, batch in enumerate(sequence_batches(train_paths, train_first, args.batch_size, epoch, args.seed)):
            if micro >= steps_per_epoch * args.grad_accum:
                break
            if micro < start_micro:
                continue
            targets = step_targets(batch, full_to_draft, args.ttt_steps)
            with autocast(precision):
                states = drafter.ttt_states(batch["features"], batch["tokens"], args.ttt_steps)
                loss, per_step = ttt_loss(drafter, states, targets, args.loss_decay)
            (loss / args.grad_accum).backward()
            rows_seen += int(batch["valid"].sum())
            if (micro + 1) % args.grad_accum:
                continue
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm))
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - t0
            log_metrics({"step": step, "epoch": epoch + 1, "loss": float(loss.detach()), "ce_per_head": per_step,
                         "lr": sched.get_last_lr()[0], "grad_norm": grad_norm, "rows_per_s": rows_seen / elapsed})
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", tok_s=f"{rows_seen / elapsed:.0f}")
            if args.save_steps and step % args.save_steps == 0:
                checkpoint(epoch, micro + 1, [LATEST])
            if args.stop_after_steps and step >= args.stop_after_steps:
                checkpoint(epoch, micro + 1, [LATEST])
                bar.close()
                log.warning("stopping after %d steps (--stop_after_steps)", step)
                return out / LATEST
        bar.close()
        start_micro = 0
        ev = evaluate(drafter, val_paths, val_first, args.ttt_steps, args.loss_decay, args.batch_size, full_to_draft,
                      precision=precision, eval_steps=args.eval_steps)
        drafter.config = replace(drafter.config, accuracy=ev["rank_accuracy"])
        log_metrics({"step": step, "epoch": epoch + 1, **ev, "val_acceptance": ev["val_tau_chain"]})
        log.info("epoch %d: val loss %.3f, top-1 per step %s, chain tau (%d drafts) %.3f", epoch + 1, ev["val_loss"],
                 " ".join(f"{x:.3f}" for x in ev["top1"]), args.ttt_steps, ev["val_tau_chain"])
        checkpoint(epoch + 1, 0, [f"eagle3_epoch{epoch + 1}.pth", LATEST])
    plot_metrics(metrics_path, out / "training_curves.png")
    return out / LATEST


DATA_FLAGS = ("base_model_path", "dataset_name", "dataset_config", "dataset_split", "train_files", "self_distill",
              "corpus", "prompts_file", "max_samples", "max_seq_len", "val_fraction", "train_on_prompt", "seed")


def reevaluate(args: TrainArgs, path: Path, model_path: Path, model_sha: str, layers, val_paths: list[Path],
               val_first: list[int], precision: str) -> Path:
    """--eval_only: score the drafter at `path` on this run's validation split, unrolled max(its ttt_steps,
    --eval_steps) steps, and write the rank accuracies into it (atomically). Returns `path`."""
    from .eagle3 import load_drafter, save_drafter
    from .models import embedding_matrix, output_matrix

    if not path.is_file():
        raise FileNotFoundError(f"--eval_only: no drafter at {path}; train one into --output_dir first")
    drafter = load_drafter(path, torch.from_numpy(embedding_matrix(model_path, output_matrix(model_path))))
    c = drafter.config
    if c.base_model_sha256 and c.base_model_sha256 != model_sha:
        raise D.DataError(f"--eval_only: {path} was trained on another model file (SHA-256 {c.base_model_sha256[:12]}...)"
                          f", not {model_path.name}")
    if tuple(c.target_layers) != tuple(layers):
        raise D.DataError(f"--eval_only: {path} reads layers {tuple(c.target_layers)}, the features hold {tuple(layers)}")
    trained = c.training_args or {}

    def plain(v: Any) -> Any:  # a saved config may hold a tuple flag as a list
        return list(v) if isinstance(v, (list, tuple)) else v

    differ = [f"--{k} {trained[k]!r} (now {getattr(args, k)!r})" for k in DATA_FLAGS
              if k in trained and plain(trained[k]) != plain(getattr(args, k))]
    if differ:
        log.warning("--eval_only: %s was trained with other data flags: %s; its validation split may differ from this "
                    "one (and hold training sequences)", path, ", ".join(differ))
    steps = int(trained.get("ttt_steps", args.ttt_steps))
    ev = evaluate(drafter, val_paths, val_first, steps, args.loss_decay, args.batch_size, draft_index(drafter),
                  precision=precision, eval_steps=args.eval_steps)
    drafter.config = replace(c, accuracy=ev["rank_accuracy"])
    save_drafter(drafter, path)
    log.info("--eval_only: %s on %d validation rows: top-1 per step, given the earlier steps right, %s; chain tau "
             "(%d drafts) %.3f; accuracies of %d levels written", path, ev["val_rows"],
             " ".join(f"{row[0]:.3f}" for row in ev["rank_accuracy"]), steps, ev["val_tau_chain"],
             len(ev["rank_accuracy"]))
    return path
