"""The training pipeline end to end on the embedded model: self-distillation, real hidden states, checkpoints,
validation, resume, DDP. One session-scoped run builds the data; the other tests reuse its cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from medusa_gguf import data as D
from medusa_gguf.heads import HeadsConfig, MedusaHeads, load_heads, read_heads_file
from medusa_gguf.models import output_matrix
from medusa_gguf.train_args import TrainArgs
from medusa_gguf.training import evaluate, train
from medusa_gguf.tree import DEFAULT_CHOICES, WIDE_CHOICES, build_tree, chain, plain

from .conftest import PROMPTS_SMALL, ROOT, TINY_TRAIN_FLAGS

K = 5  # heads in the tiny run


@pytest.fixture(scope="session")
def run(tiny_run):
    return tiny_run


@pytest.fixture(scope="session")
def projection(model_path):
    return torch.from_numpy(output_matrix(model_path))


def val_paths(out: Path) -> list[Path]:
    folder = out / "cache" / "val"
    return D.Manifest(**json.loads((folder / "manifest.json").read_text())).paths(folder)


def test_checkpoints_exist_and_reload(run, projection):
    out, log = run
    w = out / "weights"
    for name in ("medusa_heads_epoch1.pth", "medusa_heads_epoch3.pth", "medusa_heads_latest.pth", "metrics.jsonl",
                 "training_curves.png", "training_state.pth"):
        assert (w / name).is_file(), name
    heads = load_heads(w / "medusa_heads_latest.pth", projection, k_heads=K)
    cfg = heads.config
    assert cfg.base_model_name == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(cfg.base_model_sha256) == 64
    assert len(cfg.accuracy) == K and len(cfg.accuracy[0]) == 10 and 0 < cfg.accuracy[0][0] < 1
    assert cfg.training_args["k_heads"] == K and cfg.draft_vocab_size == 2048
    assert "val loss" in log and "acceptance" in log


def test_loss_fell(run):
    rows = [json.loads(line) for line in (run[0] / "weights" / "metrics.jsonl").read_text().splitlines()]
    train_loss = [r["loss"] for r in rows if "loss" in r]
    val_loss = [r["val_loss"] for r in rows if "val_loss" in r]
    assert np.mean(train_loss[-5:]) < np.mean(train_loss[:5])
    assert val_loss[-1] < val_loss[0] or val_loss[0] < train_loss[0]


@pytest.mark.parametrize("head_type", ["medusa", "dependent"])
def test_head1_beats_trivial_predictors(run, projection, backend, head_type, request):
    from medusa_gguf.engine import load_heads_for

    out, _ = run
    folder = out / "weights" if head_type == "medusa" else request.getfixturevalue("tiny_dependent_run")
    heads = load_heads_for(backend, folder / "medusa_heads_latest.pth")
    assert heads.config.head_type == head_type
    paths = val_paths(out)
    trees = {"plain": plain(), "chain 1": chain(1), "default": build_tree(DEFAULT_CHOICES), "wide": build_tree(WIDE_CHOICES)}
    result = evaluate(heads, paths, torch.device("cpu"), 0.8, 4, trees=trees)
    trained = result["top1"][0]
    tau = result["tree_acceptance"]
    assert tau["default"] == result["val_acceptance"]
    # Each tree holds the one before it, so it accepts at least as deep at every position.
    assert tau["plain"] == 1.0 < tau["chain 1"] <= tau["default"] < tau["wide"], tau
    assert tau["chain 1"] <= 1.0 + trained + 1e-9
    # Trivial 1: the untrained head = the base model's own argmax at t, taken as a guess for t+2.
    untrained = MedusaHeads(HeadsConfig(k_heads=K, n_embd=576, n_vocab=49152, hidden_dim=288), projection)
    base_guess = evaluate(untrained, paths, torch.device("cpu"), 0.8, 4)["top1"][0]
    # Trivial 2: always the most frequent training target.
    train_dir = out / "cache" / "train-rank0"
    train_paths = D.Manifest(**json.loads((train_dir / "manifest.json").read_text())).paths(train_dir)
    most_frequent = int(np.argmax(D.token_counts(train_paths, 49152, 4)))
    future = np.concatenate([f for _, f in D.iter_rows(paths)])
    frequent_guess = float(np.mean(future[:, 1] == most_frequent))
    assert trained > max(base_guess, frequent_guess) + 0.03, (trained, base_guess, frequent_guess)
    assert result["val_acceptance"] > 1.0


def test_max_train_sequences_limits_the_data_not_the_cache(run, tmp_path):
    out, _ = run
    args = TrainArgs(self_distill=True, prompts_file=str(PROMPTS_SMALL), distill_max_tokens=96, threads=2,
                     val_fraction=0.2, draft_vocab_size=2048, k_heads=K, batch_size=2, epochs=1,
                     cache_dir=str(out / "cache"), output_dir=str(tmp_path / "few"), max_train_sequences=3)
    train(args)
    rows = [json.loads(x) for x in (tmp_path / "few" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 2  # 3 sequences in micro-batches of 2


def test_training_hidden_states_equal_inference(run, backend):
    """The h_t stored for training is exactly what the backend returns when it decodes the same tokens, and the
    stored rows are the answer's: from the last prompt token on."""
    out, _ = run
    prompts = [s.prompt() for s in D.read_file(PROMPTS_SMALL)]
    samples = D.self_distill(backend, prompts, out / "cache" / "self_distill.jsonl")  # all cached: no decoding
    _, val = D.split_sequences(D.tokenize_samples(backend, samples, 512), 0.2, seed=0)
    seq = val[0]
    assert seq.first_row > 0 and backend.detokenize(seq.tokens[: seq.first_row + 1]).endswith("assistant\n")
    shard = D.read_shard(val_paths(out)[0])
    rows = slice(shard["offsets"][0], shard["offsets"][1])
    assert shard["tokens"][rows].tolist() == seq.tokens[seq.first_row : len(seq.tokens) - 2]
    backend.prefill(seq.tokens[: seq.first_row + 1])
    chain = seq.tokens[seq.first_row + 1 : seq.first_row + 41]
    node_states = backend.decode_tree(chain, list(range(-1, len(chain) - 1))).hidden
    backend.commit(-1)
    # shard row j holds h at position first_row + j; chain node i sits at position first_row + 1 + i
    assert np.array_equal(shard["hidden"][rows][1 : 1 + len(chain)], node_states.astype(np.float16))


@pytest.mark.parametrize("head_type", ["medusa", "dependent"])
def test_resume_ends_with_the_same_weights(run, tmp_path, head_type):
    out, _ = run
    base = TrainArgs(self_distill=True, prompts_file=str(PROMPTS_SMALL), distill_max_tokens=96, threads=2,
                     val_fraction=0.2, draft_vocab_size=2048, k_heads=K, batch_size=2, learning_rate=2e-3, epochs=2, save_steps=3,
                     cache_dir=str(out / "cache"), head_type=head_type)
    full = train(replace(base, output_dir=str(tmp_path / "full")))
    train(replace(base, output_dir=str(tmp_path / "cut"), stop_after_steps=5))  # as if killed after step 5
    resumed = train(replace(base, output_dir=str(tmp_path / "cut"), resume=True))
    a, b = read_heads_file(full)[1], read_heads_file(resumed)[1]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_without_state_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training state at"):
        train(TrainArgs(train_files=(str(PROMPTS_SMALL),), output_dir=str(tmp_path), resume=True, epochs=1, threads=2))


@pytest.mark.parametrize("head_type", ["medusa", "dependent"])
def test_ddp_two_processes(run, tmp_path, head_type):
    """torchrun with 2 CPU processes (gloo): each rank extracts its own shard; rank 0 alone writes files."""
    out, _ = run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "model" / "train_medusa.py"), *TINY_TRAIN_FLAGS, "--epochs", "1", "--threads", "1",
           "--head_type", head_type, "--output_dir", str(tmp_path / "ddp"), "--cache_dir", str(out / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0/2" in proc.stderr and "rank 1/2" in proc.stderr
    assert (out / "cache" / "train-rank1" / "manifest.json").is_file()
    assert (tmp_path / "ddp" / "medusa_heads_latest.pth").is_file()
    rows = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == len(set(rows))  # one writer: no line written twice
    assert read_heads_file(tmp_path / "ddp" / "medusa_heads_latest.pth")[0].head_type == head_type
