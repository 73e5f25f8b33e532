"""EAGLE-3 training with training-time test: the target masking convention, a real run through the founding
document's entry point on the tiny self-distilled corpus, and an interrupted run that resumes exactly."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medusa_gguf import data as D
from medusa_gguf.eagle3 import Eagle3Config, Eagle3Drafter, load_drafter, read_drafter_file
from medusa_gguf.eagle3_train import (OOV, BUCKET, pick_precision, sequence_batches, step_targets, train_eagle3,
                                      ttt_loss)
from medusa_gguf.models import embedding_matrix, output_matrix
from medusa_gguf.train_args import TrainArgs

from .conftest import PROMPTS_SMALL, ROOT, TINY_TRAIN_FLAGS


@pytest.fixture(scope="module")
def eagle3_run(tiny_run):
    """A drafter trained on tiny_run's cached answers (its features are extracted here). Returns the run folder."""
    out = tiny_run[0]
    cmd = [sys.executable, str(ROOT / "model" / "train_medusa.py"), *TINY_TRAIN_FLAGS, "--epochs", "3",
           "--head_type", "eagle3", "--ttt_steps", "3", "--output_dir", str(out / "eagle3"),
           "--cache_dir", str(out / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EAGLE-3: layers (2, 15, 27)" in proc.stderr
    return out / "eagle3"


def test_step_targets_follow_the_ttt_convention():
    # One sequence of 5 kept rows padded to 6; answer rows from row 1 on. future[t, j] = token t+1+j.
    tokens = torch.tensor([[10, 11, 12, 13, 14, 0]])
    future = torch.full((1, 6, 4), -1)
    for t in range(5):
        for j in range(4):
            if t + 1 + j <= 6:  # the sequence has tokens 10..16
                future[0, t, j] = 11 + t + j
    batch = {"tokens": tokens, "future": future, "answer": torch.tensor([[False, True, True, True, True, False]]),
             "valid": torch.tensor([[True] * 5 + [False]])}
    identity = torch.arange(100)
    got = step_targets(batch, identity, 3)
    # step k, row t: predicts token t+k+2 = 12+t+k; counts where the input token t+1+k is a kept row (< 5),
    # the row is an answer row and the target exists.
    assert got[0, 0].tolist() == [-1, 13, 14, 15, -1, -1]
    assert got[1, 0].tolist() == [-1, 14, 15, -1, -1, -1]
    assert got[2, 0].tolist() == [-1, 15, -1, -1, -1, -1]
    draft = torch.full((100,), -1)
    draft[13] = 0  # a draft vocabulary of one token: the others still count, as OOV (a miss, no loss)
    assert step_targets(batch, draft, 1)[0, 0].tolist() == [-1, 0, OOV, OOV, -1, -1]


def test_step_targets_past_the_future_columns_come_from_the_batchs_tokens():
    """Validation unrolls more steps than the shards hold future tokens for (--eval_steps): those targets come from
    the batch's own tokens, and equal what wider future columns would give."""
    rng = np.random.default_rng(0)
    seq = [int(x) for x in rng.integers(0, 50, 9)]
    tokens = torch.tensor([seq + [0, 0]])
    batch = {"tokens": tokens, "answer": torch.tensor([[False] + [True] * 8 + [False] * 2]),
             "valid": torch.tensor([[True] * 9 + [False] * 2])}
    future = torch.full((1, 11, 7), -1, dtype=torch.long)  # padding rows hold nothing
    future[0, :9] = torch.from_numpy(D.future_tokens(seq, 7)).long()
    wide, narrow = {**batch, "future": future}, {**batch, "future": future[:, :, :2]}
    identity = torch.arange(50)
    assert torch.equal(step_targets(narrow, identity, 6), step_targets(wide, identity, 6))
    assert (step_targets(narrow, identity, 6)[5] >= 0).tolist()[0] == [False, True] + [False] * 9  # t+7 <= 8, t >= 1


def _shard(path: Path, lengths: list[int], width: int = 6, seed: int = 0) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    n = sum(lengths)
    save_file({"features": rng.standard_normal((n, width)).astype(np.float16),
               "tokens": rng.integers(0, 40, n).astype(np.int32),
               "future": rng.integers(0, 40, (n, 4)).astype(np.int32),
               "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}, str(path))


def test_the_loss_on_the_counted_rows_equals_the_cross_entropy_over_all_logits(tmp_path):
    """ttt_loss runs the head on the rows a loss counts only; the result is the masked CE over every row's logits."""
    torch.manual_seed(0)
    c = Eagle3Config(target_width=16, n_head=2, n_head_kv=1, n_ff=32, n_vocab=40, target_layers=(0, 1, 2),
                     draft_vocab_size=24)
    drafter = Eagle3Drafter(c, torch.randn(40, 16), torch.randperm(40)[:24].sort().values)
    _shard(tmp_path / "s.safetensors", [9, 5, 12], width=48)
    (batch,) = sequence_batches([tmp_path / "s.safetensors"], [2, 0, 4], 3, 0, 0, shuffle=False)
    f2d = torch.full((40,), -1)
    f2d[drafter.d2t] = torch.arange(24)
    targets = step_targets(batch, f2d, 3)
    assert (targets == OOV).any() and (targets >= 0).any()
    states = drafter.ttt_states(batch["features"], batch["tokens"], 3)
    loss, per_step = ttt_loss(drafter, states, targets, 0.8)
    logits = drafter.ttt_forward(batch["features"], batch["tokens"], 3)
    want = [F.cross_entropy(lg.reshape(-1, 24), targets[k].clamp(min=-1).reshape(-1), ignore_index=-1)
            for k, lg in enumerate(logits)]
    assert per_step == pytest.approx([float(w.detach()) for w in want], rel=1e-5)
    assert float(loss.detach()) == pytest.approx(sum(0.8**k * float(w.detach()) for k, w in enumerate(want)), rel=1e-5)


def test_shuffled_batches_hold_every_sequence_once_sorted_by_length_within_windows(tmp_path):
    rng = np.random.default_rng(1)
    lengths = [int(x) for x in rng.integers(3, 60, 4 * BUCKET * 2 + 5)]
    path = tmp_path / "s.safetensors"
    _shard(path, lengths)
    firsts = [0] * len(lengths)
    seen, padded, plain_padded = [], 0, 0
    for epoch in (0, 1):
        batches = list(sequence_batches([path], firsts, 4, epoch, 0))
        order = [tuple(sorted(int(v) for v in b["valid"].sum(1))) for b in batches]
        seen.append(sorted(n for lens in order for n in lens))
        padded += sum(int((~b["valid"]).sum()) for b in batches)
        # the same sequences in the unsorted order the windows were drawn from pad far more
        gen = torch.Generator().manual_seed(epoch)
        perm = torch.randperm(len(lengths), generator=gen).tolist()
        plain_padded += sum(4 * max(lengths[i] for i in perm[b:b + 4]) - sum(lengths[i] for i in perm[b:b + 4])
                            for b in range(0, len(perm), 4))
    assert seen[0] == seen[1] == sorted(lengths)
    assert padded < plain_padded / 3, (padded, plain_padded)
    again = [b["tokens"] for b in sequence_batches([path], firsts, 4, 1, 0)]
    assert all(torch.equal(a, b["tokens"]) for a, b in zip(again, sequence_batches([path], firsts, 4, 1, 0)))


def test_precision_choice():
    assert pick_precision("fp32") == "fp32" and pick_precision("bf16") == "bf16"
    assert pick_precision("auto") in ("fp32", "bf16")
    with pytest.raises(ValueError, match="--precision"):
        pick_precision("fp8")


def test_training_writes_loadable_drafters_and_learns(eagle3_run, model_path):
    for name in ("eagle3_epoch1.pth", "eagle3_epoch3.pth", "eagle3_latest.pth", "training_state.pth",
                 "metrics.jsonl", "training_curves.png"):
        assert (eagle3_run / name).is_file(), name
    config, _ = read_drafter_file(eagle3_run / "eagle3_latest.pth")
    assert config.target_layers == (2, 15, 27) and config.draft_vocab_size == 2048
    assert config.training_args["ttt_steps"] == 3
    out = output_matrix(model_path)
    drafter = load_drafter(eagle3_run / "eagle3_latest.pth", torch.from_numpy(embedding_matrix(model_path, out)))
    assert drafter.config == config
    rows = [json.loads(line) for line in (eagle3_run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss" in r]
    assert len(val) == 3 and all(len(r["top1"]) == 3 for r in val)
    assert val[-1]["val_loss"] < val[0]["val_loss"], [r["val_loss"] for r in val]
    train_losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(train_losses[-3:]) < sum(train_losses[:3]), train_losses
    assert all(1.0 <= r["val_tau_chain"] <= 4.0 for r in val)


def test_eval_only_rescores_a_drafter_deeper_and_keeps_its_weights(eagle3_run, tmp_path):
    """--eval_only re-scores eagle3_latest.pth on the run's validation split, unrolled --eval_steps levels: the
    trained levels' accuracies are what training recorded, the deeper ones are added, the weights stay."""
    import shutil

    config, state = read_drafter_file(eagle3_run / "eagle3_latest.pth")
    assert len(config.accuracy) == 6  # training's validation unrolls --eval_steps (6) past the 3 TTT steps
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(eagle3_run / "eagle3_latest.pth", out / "eagle3_latest.pth")

    def eval_only(folder: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "model" / "train_medusa.py"), *TINY_TRAIN_FLAGS,
                               "--head_type", "eagle3", "--ttt_steps", "3", "--output_dir", str(folder),
                               "--cache_dir", str(eagle3_run.parent / "cache"), "--eval_only", "--eval_steps", "4"],
                              capture_output=True, text=True, timeout=600)

    proc = eval_only(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracies of 4 levels written" in proc.stderr
    again, state2 = read_drafter_file(out / "eagle3_latest.pth")
    assert len(again.accuracy) == 4
    assert np.allclose(again.accuracy, config.accuracy[:4], atol=1e-6)
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)
    missing = eval_only(tmp_path / "none")
    assert missing.returncode != 0 and "--eval_only: no drafter at" in missing.stderr


def test_resume_ends_with_the_same_weights(tiny_run, tmp_path):
    cache = tiny_run[0] / "cache"
    base = TrainArgs(self_distill=True, prompts_file=str(PROMPTS_SMALL), distill_max_tokens=96, threads=2,
                     val_fraction=0.2, draft_vocab_size=512, batch_size=4, learning_rate=2e-3, epochs=2,
                     head_type="eagle3", ttt_steps=2, cache_dir=str(cache), save_steps=0)
    whole = train_eagle3(TrainArgs(**{**base.__dict__, "output_dir": str(tmp_path / "whole")}))
    cut = TrainArgs(**{**base.__dict__, "output_dir": str(tmp_path / "cut")})
    train_eagle3(TrainArgs(**{**cut.__dict__, "stop_after_steps": 3}))
    resumed = train_eagle3(TrainArgs(**{**cut.__dict__, "resume": True}))
    a, b = read_drafter_file(whole)[1], read_drafter_file(resumed)[1]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_training_reads_the_stored_corpus(model_path, tmp_path):
    from medusa_gguf.corpus import CorpusError
    from medusa_gguf.models import file_sha256
    from medusa_gguf.training import training_sequences

    sha = file_sha256(model_path)
    seqs = training_sequences(TrainArgs(corpus=str(ROOT / "data" / "corpus")), None, tmp_path, sha)
    assert len(seqs) >= 16 and all(0 <= s.first_row < len(s.tokens) for s in seqs)
    assert sum(s.first_row > 0 for s in seqs) >= 0.99 * len(seqs)  # answers, with their prompts as context
    with pytest.raises((CorpusError, FileNotFoundError, ValueError), match=str(tmp_path)):
        training_sequences(TrainArgs(corpus=str(tmp_path)), None, tmp_path, sha)


def test_a_corpus_subset_is_drawn_over_the_whole_store(model_path, tmp_path):
    """The store grows one prompt source after another: --max_samples must not keep only the first source."""
    from medusa_gguf.models import file_sha256
    from medusa_gguf.training import training_sequences

    sha, corpus = file_sha256(model_path), str(ROOT / "data" / "corpus")
    full = training_sequences(TrainArgs(corpus=corpus), None, tmp_path, sha)
    picked = training_sequences(TrainArgs(corpus=corpus, max_samples=200), None, tmp_path, sha)
    again = training_sequences(TrainArgs(corpus=corpus, max_samples=200), None, tmp_path, sha)
    assert [s.tokens for s in picked] == [s.tokens for s in again]  # seeded
    where = {tuple(s.tokens): i for i, s in enumerate(full)}
    idx = [where[tuple(s.tokens)] for s in picked]
    assert len(set(idx)) == 200 and idx == sorted(idx)
    assert min(idx) < len(full) // 4 and max(idx) >= 3 * len(full) // 4


def test_train_on_rest_keeps_the_draw_and_its_features_and_adds_every_other_sequence(model_path, tmp_path):
    """--train_on_rest grows a --max_samples draw to the whole corpus: the draw's cached features and validation
    stay as they were, and only the sequences outside the draw are extracted, into a cache of their own."""
    from medusa_gguf import corpus as C
    from medusa_gguf.data import DataError
    from medusa_gguf.models import file_sha256
    from medusa_gguf.settings import Settings
    from medusa_gguf.training import corpus_sequences, training_sequences

    prompts = [p for p in C.read_prompts(ROOT / "medusa_gguf" / "prompts" / "corpus_prompts.jsonl")
               if len(p.text) < 120][:8]
    root = tmp_path / "corpus"
    C.grow(Settings(n_ctx=1024, n_threads=1), prompts, root=root, target_tokens=10**6, chunk_size=4, streams=2,
           gen=C.Generation(max_new_tokens=8), progress=False)
    cache = tmp_path / "cache"
    base = TrainArgs(corpus=str(root), max_samples=5, val_fraction=0.2, threads=2, draft_vocab_size=256,
                     batch_size=2, epochs=1, head_type="eagle3", ttt_steps=2, cache_dir=str(cache), save_steps=0)
    sha = file_sha256(model_path)
    drawn = training_sequences(base, None, tmp_path, sha)
    on_rest = TrainArgs(**{**base.__dict__, "train_on_rest": True})
    rest = corpus_sequences(on_rest, sha)[1]
    everything = training_sequences(TrainArgs(corpus=str(root)), None, tmp_path, sha)
    assert len(drawn) == 5 and len(rest) == 3
    assert sorted(map(tuple, (s.tokens for s in drawn + rest))) == sorted(map(tuple, (s.tokens for s in everything)))
    assert [s.tokens for s in rest] == [s.tokens for s in corpus_sequences(on_rest, sha)[1]]  # seeded
    assert [s.tokens for s in corpus_sequences(on_rest, sha)[0]] == [s.tokens for s in drawn]
    assert corpus_sequences(base, sha)[1] == []

    train_eagle3(TrainArgs(**{**base.__dict__, "output_dir": str(tmp_path / "draw")}))
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    train_eagle3(TrainArgs(**{**base.__dict__, "output_dir": str(tmp_path / "all"), "train_on_rest": True}))
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # the draw's features were reused untouched
    rest_manifest = json.loads((cache / "eagle3-rest-f3" / "manifest.json").read_text())
    assert rest_manifest["sequences"] == 3 and rest_manifest["complete"] and rest_manifest["rows"] > 0

    def val_rows(run: str) -> list[int]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["val_rows"] for line in lines if "val_rows" in line]

    assert val_rows("all") == val_rows("draw") and val_rows("draw")[0] > 0
    config, _ = read_drafter_file(tmp_path / "all" / "eagle3_latest.pth")
    assert config.training_args["train_on_rest"] is True

    with pytest.raises(DataError, match="--max_samples"):
        corpus_sequences(TrainArgs(corpus=str(root), train_on_rest=True), sha)
