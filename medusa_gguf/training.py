"""Train Medusa heads on the base model's real hidden states.

    python model/train_medusa.py --base_model_path M.gguf --self_distill --prompts_file P.jsonl --epochs 2
    torchrun --nproc_per_node 2 model/train_medusa.py ...        (DistributedDataParallel, gloo on CPU)

Pipeline: samples -> (self-distillation) -> token sequences -> hidden-state shards (cached) -> training.
Loss = sum_k loss_decay^(k-1) * CE_k. Checkpoints go to --output_dir every --save_steps optimizer steps and at
each epoch end (medusa_heads_epoch{N}.pth, medusa_heads_latest.pth), written atomically; training_state.pth
holds what --resume needs (optimizer, scheduler, position, RNG) so a resumed run ends bit-identical.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import data as D
from .heads import HeadsConfig, MedusaHeads, atomic_torch_save, build_heads, save_heads
from .models import embedding_matrix, file_sha256, output_matrix, resolve_model_path
from .settings import Settings
from .train_args import TrainArgs
from .tree import DEFAULT_CHOICES, Tree, build_tree

log = logging.getLogger(__name__)
TOP_RANKS = 10  # accuracy is recorded for ranks 0..9 of each head


# -- distributed ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=torch.distributed.get_rank(), world=world)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch sees no CUDA device; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


# -- data ----------------------------------------------------------------------------------------------------------


def gather_samples(args: TrainArgs, backend, cache: Path) -> list[D.Sample]:
    samples: list[D.Sample] = []
    if args.dataset_name:
        samples += D.read_hf_dataset(args.dataset_name, args.dataset_config, args.dataset_split)
    for f in args.train_files:
        samples += D.read_file(Path(f))
    if args.self_distill:
        prompt_samples = D.read_file(Path(args.prompts_file)) if args.prompts_file else samples
        prompts = [s.prompt() for s in prompt_samples if s.prompt().strip()]
        if args.max_samples:
            prompts = prompts[: args.max_samples]
        if not prompts:
            raise D.DataError("--self_distill needs prompts: give --prompts_file or a dataset / --train_files")
        samples = D.self_distill(backend, prompts, cache / "self_distill.jsonl", max_new_tokens=args.distill_max_tokens)
    elif args.max_samples:
        samples = samples[: args.max_samples]
    if not samples:
        raise D.DataError("no training data: give --dataset_name, --train_files, or --self_distill --prompts_file")
    return samples


def training_sequences(args: TrainArgs, backend, cache: Path, model_sha: str) -> list[D.TokenSeq]:
    """Token sequences to train on: a stored self-distilled corpus (--corpus), else the gathered samples."""
    if args.corpus:
        return corpus_sequences(args, model_sha)[0]
    samples = gather_samples(args, backend, cache)
    return D.tokenize_samples(backend, samples, args.max_seq_len, train_on_prompt=args.train_on_prompt)


def corpus_draw(n: int, k: int, seed: int) -> list[int]:
    """The indices, sorted, of a seeded draw of `k` of a corpus's `n` sequences. The store grows one prompt source
    after another, so its first k sequences would all share one source."""
    return sorted(random.Random(seed).sample(range(n), k))


def corpus_sequences(args: TrainArgs, model_sha: str) -> tuple[list[D.TokenSeq], list[D.TokenSeq]]:
    """The corpus's --max_samples draw (all of it without), and with --train_on_rest the sequences outside the
    draw in a seeded order (else none). The store is read once for both."""
    from .corpus import corpus_dir, load

    if args.train_on_rest and not (args.corpus and args.max_samples):
        raise D.DataError("--train_on_rest needs --corpus and --max_samples N: it adds the sequences outside that draw")
    folder = corpus_dir(Path(args.corpus), model_sha)
    seqs = load(folder, model_sha256=model_sha, max_seq_len=args.max_seq_len)
    if not seqs:
        raise D.DataError(f"the corpus {folder} holds no answers yet: grow it with `python -m medusa_gguf.corpus grow`")
    drawn = corpus_draw(len(seqs), args.max_samples, args.seed) if 0 < args.max_samples < len(seqs) \
        else list(range(len(seqs)))
    log.info("training on %d sequences of the corpus %s", len(drawn), folder)
    rest: list[D.TokenSeq] = []
    if args.train_on_rest:
        taken = set(drawn)
        rest = [s for i, s in enumerate(seqs) if i not in taken]
        random.Random(args.seed).shuffle(rest)  # store order runs source by source; training reads shards in order
        log.info("--train_on_rest: %d corpus sequences outside the draw of %d join the training split", len(rest),
                 len(drawn))
    return [seqs[i] for i in drawn], rest


def sequences_per_shard(paths: list[Path], max_sequences: int = 0) -> list[int]:
    """Sequences used from each shard: all of them, or the first `max_sequences` in shard order (0: no limit).
    Reads only each shard's offsets."""
    from safetensors import safe_open

    counts = []
    for p in paths:
        with safe_open(str(p), framework="np") as f:
            counts.append(len(f.get_tensor("offsets")) - 1)
    if max_sequences:
        left = max_sequences
        used = []
        for c in counts:
            used.append(min(c, left))
            left -= used[-1]
        counts = used
    return counts


def batches(paths: list[Path], batch_size: int, epoch: int, seed: int,
            per_shard: list[int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Micro-batches of `batch_size` whole sequences, shard order and sequence order shuffled per epoch.
    `per_shard` limits the sequences taken from each shard (see `sequences_per_shard`)."""
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    for si in torch.randperm(len(paths), generator=gen).tolist():
        shard = D.read_shard(paths[si])
        offsets = shard["offsets"]
        n = len(offsets) - 1 if per_shard is None else per_shard[si]
        order = torch.randperm(n, generator=gen).tolist()
        for b in range(0, len(order), batch_size):
            rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in order[b : b + batch_size]])
            yield torch.from_numpy(shard["hidden"][rows]), torch.from_numpy(shard["future"][rows])


# -- loss and metrics ----------------------------------------------------------------------------------------------


def draft_targets(future: torch.Tensor, full_to_draft: torch.Tensor, k_heads: int) -> torch.Tensor:
    """Targets of heads 1..K in draft-vocabulary ids, -1 where absent or outside the draft vocabulary: [N, K]."""
    tgt = future[:, 1 : k_heads + 1].long()
    mapped = full_to_draft[tgt.clamp(min=0)]
    return torch.where(tgt >= 0, mapped, torch.full_like(mapped, -1))


def medusa_loss(logits: torch.Tensor, targets: torch.Tensor, decay: float) -> tuple[torch.Tensor, list[float]]:
    """sum_k decay^(k-1) CE_k; logits [N, K, V], targets [N, K] (-1 ignored). Also per-head CE values."""
    total = logits.new_zeros(())
    per_head = []
    for k in range(logits.shape[1]):
        valid = targets[:, k] >= 0
        if not valid.any():
            per_head.append(float("nan"))
            continue
        ce = nn.functional.cross_entropy(logits[valid, k].float(), targets[valid, k])
        total = total + decay**k * ce
        per_head.append(float(ce.detach()))
    return total, per_head


@torch.no_grad()
def evaluate(heads: MedusaHeads, paths: list[Path], device: torch.device, decay: float, batch_size: int,
             trees: Mapping[str, Tree] | None = None) -> dict[str, Any]:
    """Validation loss, per-head top-1/top-5 accuracy, rank accuracies and the greedy acceptance (tau) of the
    default tree on held-out text (and of each of `trees`, under "tree_acceptance"). Accuracy counts every
    position, draft-vocabulary misses included.

    Dependent heads are scored with the true earlier tokens as their path (teacher forcing), so their accuracy is
    conditional on the earlier tokens being right: what the tree calibration multiplies along a path. The
    acceptance is exact for both types, since a node's candidates only count when its whole path was right."""
    heads.eval()
    tree = build_tree(DEFAULT_CHOICES)
    k_heads = heads.config.k_heads
    full_to_draft = _full_to_draft(heads)
    rank_hits = torch.zeros(k_heads, TOP_RANKS, dtype=torch.float64)
    counts = torch.zeros(k_heads, dtype=torch.float64)
    loss_sum, loss_n, accepted_sum, positions = 0.0, 0, 0.0, 0
    tree_sums = dict.fromkeys(trees or {}, 0.0)
    for hidden, future in batches(paths, batch_size, epoch=0, seed=12345):
        hidden, future = hidden.to(device).float(), future.to(device).long()
        logits = heads(hidden, future[:, :k_heads])  # [N, K, V]; dependent heads: given the true earlier tokens
        targets = draft_targets(future, full_to_draft.to(device), k_heads)
        loss, _ = medusa_loss(logits, targets, decay)
        loss_sum, loss_n = loss_sum + float(loss) * len(hidden), loss_n + len(hidden)
        top = heads.draft_ids[torch.topk(logits, TOP_RANKS, dim=-1).indices]  # [N, K, R] full ids
        truth = future[:, 1 : k_heads + 1]  # [N, K]
        valid = truth >= 0
        rank_hits += ((top == truth.unsqueeze(-1)) & valid.unsqueeze(-1)).sum(0).double().cpu()
        counts += valid.sum(0).double().cpu()
        accepted_sum += float(_accepted_depth(tree, top, future).sum())
        for name in tree_sums:
            tree_sums[name] += float(_accepted_depth(trees[name], top, future).sum())
        positions += len(hidden)
    acc = (rank_hits / counts.clamp(min=1).unsqueeze(-1)).tolist()
    heads.train()
    return {
        "val_loss": loss_sum / max(loss_n, 1),
        "top1": [a[0] for a in acc],
        "top5": [sum(a[:5]) for a in acc],
        "accuracy": acc,
        "val_acceptance": 1.0 + accepted_sum / max(positions, 1),  # tokens per greedy step, default tree
        "val_positions": positions,
        **({"tree_acceptance": {name: 1.0 + v / max(positions, 1) for name, v in tree_sums.items()}} if trees else {}),
    }


def _accepted_depth(tree, top: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
    """Deepest accepted node of `tree` at each position: [N]. top [N, K, R] candidate ids, future [N, F]."""
    n = top.shape[0]
    ok = [torch.ones(n, dtype=torch.bool, device=top.device)]  # root: the base model's own token
    depth = torch.zeros(n, dtype=torch.long, device=top.device)
    for i in range(1, tree.n_nodes):
        d, r, p = tree.depths[i], tree.ranks[i], tree.parents[i]
        if d > top.shape[1] or d >= future.shape[1]:
            ok.append(torch.zeros(n, dtype=torch.bool, device=top.device))
            continue
        hit = ok[p] & (top[:, d - 1, r] == future[:, d])
        ok.append(hit)
        depth = torch.where(hit, torch.clamp(depth, min=d), depth)
    return depth


def _full_to_draft(heads: MedusaHeads) -> torch.Tensor:
    table = torch.full((heads.config.n_vocab,), -1, dtype=torch.long)
    table[heads.draft_ids.cpu()] = torch.arange(len(heads.draft_ids))
    return table


# -- the run -------------------------------------------------------------------------------------------------------


def lr_lambda(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(args: TrainArgs) -> Path:
    """Run the whole pipeline; return the path of medusa_heads_latest.pth (eagle3_latest.pth for --head_type eagle3)."""
    from .backend import Backend  # llama.cpp is loaded only when training really starts

    if args.head_type == "eagle3":
        from .eagle3_train import train_eagle3

        return train_eagle3(args)
    if args.train_on_rest:
        raise D.DataError("--train_on_rest is for --head_type eagle3 (the heads' cache is one split)")
    if args.eval_only:
        raise D.DataError("--eval_only is for --head_type eagle3 (heads record their accuracies as they train)")

    device = pick_device(args.device)
    dist = init_distributed(device)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    cache = Path(args.cache_dir) if args.cache_dir else out / "cache"
    model_path = resolve_model_path(args.base_model_path)
    model_sha = file_sha256(model_path)
    settings = Settings.from_env(base_model_path=model_path, n_threads=args.threads or None, n_ctx=8192)
    log.info("rank %d/%d: base model %s (sha256 %s…), device %s", dist.rank, dist.world, model_path, model_sha[:12], device)

    backend = Backend(settings)
    if dist.world > 1 and not dist.main:
        torch.distributed.barrier()  # rank 0 generates (or finds) the self-distilled corpus first
    seqs = training_sequences(args, backend, cache, model_sha)
    if dist.world > 1 and dist.main:
        torch.distributed.barrier()
    context = sum(s.first_row for s in seqs)
    if context:
        log.info("%d of %d positions are prompt and chat template: decoded as context, not trained or scored "
                 "(--train_on_prompt keeps them)", context, sum(len(s.tokens) for s in seqs))
    train_seqs, val_seqs = D.split_sequences(seqs, args.val_fraction, args.seed)
    n_future = args.k_heads + 1

    def shards(part: list[D.TokenSeq], folder: str, desc: str) -> D.Manifest:
        return D.build_shards(backend, [s.tokens for s in part], cache / folder, model_sha256=model_sha,
                              n_future=n_future, desc=desc, first_rows=[s.first_row for s in part])

    train_manifest = shards(train_seqs[dist.rank :: dist.world], f"train-rank{dist.rank}",
                            f"hidden states (train, rank {dist.rank})")
    val_manifest = shards(val_seqs, "val", "hidden states (validation)") if dist.main else None
    backend.close()
    train_paths = train_manifest.paths(cache / f"train-rank{dist.rank}")
    val_paths = val_manifest.paths(cache / "val") if val_manifest else []
    log.info("rank %d: %d training rows from %d sequences; %d validation sequences",
             dist.rank, train_manifest.rows, train_manifest.sequences, len(val_seqs))

    output = output_matrix(model_path)
    projection = torch.from_numpy(output)  # [n_vocab, n_embd], frozen
    n_vocab, n_embd = projection.shape
    counts = torch.from_numpy(D.token_counts(train_paths, n_vocab, n_future))
    if dist.world > 1:
        torch.distributed.all_reduce(counts)
    draft_ids = None
    if args.draft_vocab_size and args.draft_vocab_size < n_vocab:
        draft_ids = torch.sort(torch.argsort(counts, descending=True, stable=True)[: args.draft_vocab_size]).values
        covered = float(counts[draft_ids].sum() / counts.sum().clamp(min=1))
        log.info("draft vocabulary: %d tokens cover %.1f%% of training targets", len(draft_ids), 100 * covered)
    config = HeadsConfig(
        k_heads=args.k_heads, n_embd=n_embd, n_vocab=n_vocab, hidden_dim=args.hidden_dim or n_embd // 2,
        num_layers=args.num_layers, head_type=args.head_type, mix_rank=args.mix_rank, own_lm_head=args.own_lm_head,
        block=args.block,
        draft_vocab_size=len(draft_ids) if draft_ids is not None else 0,
        base_model_name=model_path.name, base_model_sha256=model_sha, training_args=asdict(args),
    )
    heads = build_heads(config, projection, lambda: torch.from_numpy(embedding_matrix(model_path, output)),
                        draft_ids).to(device)
    model: nn.Module = heads
    if dist.world > 1:
        model = nn.parallel.DistributedDataParallel(heads, broadcast_buffers=False)
    full_to_draft = _full_to_draft(heads).to(device)

    per_shard = sequences_per_shard(train_paths, args.max_train_sequences)
    if args.max_train_sequences:
        log.info("rank %d: training on the first %d of %d sequences (--max_train_sequences)", dist.rank,
                 sum(per_shard), train_manifest.sequences)
    micro_per_epoch = sum(math.ceil(n / args.batch_size) for n in per_shard)
    if dist.world > 1:  # every rank must take the same number of steps
        n = torch.tensor([micro_per_epoch])
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
        micro_per_epoch = int(n)
    steps_per_epoch = max(1, micro_per_epoch // args.grad_accum)
    total_steps = steps_per_epoch * args.epochs
    warmup = args.warmup_steps or max(1, total_steps // 20)
    params = [p for p in heads.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_lambda(s, warmup, total_steps))
    step, start_epoch, start_micro = 0, 0, 0
    state_path = out / "training_state.pth"
    if args.resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"--resume: no training state at {state_path}; start without --resume")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        heads.load_state_dict(state["heads"], strict=False)
        optim.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, start_epoch, start_micro = state["step"], state["epoch"], state["micro"]
        torch.set_rng_state(state["rng"])
        log.info("resumed from %s at step %d (epoch %d, micro-batch %d)", state_path, step, start_epoch, start_micro)

    metrics_path = out / "metrics.jsonl"
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        if not args.resume and metrics_path.exists():
            metrics_path.unlink()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null_context()
    last_eval: dict[str, Any] | None = None

    def checkpoint(epoch: int, micro: int, names: list[str]) -> None:
        if not dist.main:
            return
        cfg = replace(heads.config, accuracy=last_eval["accuracy"]) if last_eval else heads.config
        heads.config = cfg
        for name in names:
            save_heads(heads, out / name)
        atomic_torch_save(
            {"heads": heads.trainable_state_dict(), "optimizer": optim.state_dict(), "scheduler": sched.state_dict(),
             "step": step, "epoch": epoch, "micro": micro, "rng": torch.get_rng_state()},
            state_path,
        )

    def log_metrics(row: dict[str, Any]) -> None:
        if dist.main:
            with open(metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    for epoch in range(start_epoch, args.epochs):
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step", disable=not dist.main)
        bar.update(start_micro // args.grad_accum)
        rows_seen, t0 = 0, time.perf_counter()
        optim.zero_grad(set_to_none=True)
        for micro, (hidden, future) in enumerate(batches(train_paths, args.batch_size, epoch, args.seed, per_shard)):
            if micro >= steps_per_epoch * args.grad_accum:
                break
            if micro < start_micro:
                continue
            hidden, future = hidden.to(device).float(), future.to(device)
            targets = draft_targets(future, full_to_draft, args.k_heads)
            with autocast:
                logits = model(hidden, future[:, : args.k_heads])
            loss, per_head = medusa_loss(logits, targets, args.loss_decay)
            (loss / args.grad_accum).backward()
            rows_seen += len(hidden)
            if (micro + 1) % args.grad_accum:
                continue
            grad_norm = float(nn.utils.clip_grad_norm_(params, args.max_grad_norm))
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - t0
            row = {"step": step, "epoch": epoch + 1, "loss": float(loss.detach()), "ce_per_head": per_head,
                   "lr": sched.get_last_lr()[0], "grad_norm": grad_norm, "rows_per_s": rows_seen / elapsed}
            log_metrics(row)
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", tok_s=f"{rows_seen / elapsed:.0f}")
            if args.save_steps and step % args.save_steps == 0:
                checkpoint(epoch, micro + 1, ["medusa_heads_latest.pth"])
            if args.stop_after_steps and step >= args.stop_after_steps:
                checkpoint(epoch, micro + 1, ["medusa_heads_latest.pth"])
                bar.close()
                log.warning("stopping after %d steps (--stop_after_steps)", step)
                return out / "medusa_heads_latest.pth"
        bar.close()
        start_micro = 0
        if dist.main:
            last_eval = evaluate(heads, val_paths, device, args.loss_decay, args.batch_size)
            log_metrics({"step": step, "epoch": epoch + 1, **{k: v for k, v in last_eval.items() if k != "accuracy"}})
            log.info("epoch %d: val loss %.3f, top-1 %s, top-5 %s, acceptance (tokens/step, default tree) %.3f",
                     epoch + 1, last_eval["val_loss"], _fmt(last_eval["top1"]), _fmt(last_eval["top5"]),
                     last_eval["val_acceptance"])
        checkpoint(epoch + 1, 0, [f"medusa_heads_epoch{epoch + 1}.pth", "medusa_heads_latest.pth"])
        if dist.world > 1:
            torch.distributed.barrier()
    if dist.main:
        plot_metrics(metrics_path, out / "training_curves.png")
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    return out / "medusa_heads_latest.pth"


class _null_context:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _fmt(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def plot_metrics(metrics_path: Path, png: Path) -> None:
    """Loss against step, and each head's validation top-1 accuracy against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "top1" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], lw=1, label="train loss")
    ax1.plot([r["step"] for r in val_rows], [r["val_loss"] for r in val_rows], "o-", label="validation loss")
    ax1.set_xlabel("optimizer step"), ax1.set_ylabel("weighted CE"), ax1.legend(), ax1.set_title("loss")
    for k in range(len(val_rows[0]["top1"]) if val_rows else 0):
        ax2.plot([r["step"] for r in val_rows], [r["top1"][k] for r in val_rows], "o-", label=f"head {k + 1}")
    ax2.set_xlabel("optimizer step"), ax2.set_ylabel("top-1 accuracy (held out)"), ax2.set_title("heads")
    if val_rows:
        ax2.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
