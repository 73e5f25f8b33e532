"""Shared fixtures: the embedded default model loads in well under a second, so tests use the real thing."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medusa_gguf.backend import Backend
from medusa_gguf.models import embedded_model_path
from medusa_gguf.settings import Settings

TEST_SETTINGS = dict(n_ctx=1024, n_threads=2)


@pytest.fixture(scope="session")
def model_path():
    return embedded_model_path()


@pytest.fixture(scope="session")
def backend():
    with Backend(Settings(**TEST_SETTINGS)) as b:
        yield b


@pytest.fixture(scope="session")
def prompt_tokens(backend):
    text = backend.apply_chat_template([{"role": "user", "content": "Explain why the sky is blue in two sentences."}])
    return backend.tokenize(text)


ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "medusa_gguf" / "prompts" / "heldout.jsonl"


def heldout_chat_prompts(backend, n: int) -> list[list[int]]:
    """Token ids of `n` held-out prompts spread over the file, each in the model's chat template."""
    rows = [json.loads(line) for line in HELDOUT.read_text().splitlines()]
    picked = rows[:: max(1, len(rows) // n)][:n]
    return [backend.tokenize(backend.apply_chat_template([{"role": "user", "content": r["prompt"]}])) for r in picked]


def plain_greedy(backend, prompts, max_tokens: int) -> list[list[int]]:
    """Plain greedy completions of `prompts`: the outputs every drafter must reproduce."""
    from medusa_gguf.decoding import GenerationResult, SamplingParams, generate

    outs = []
    for p in prompts:
        r = GenerationResult()
        list(generate(backend, p, SamplingParams(max_tokens=max_tokens), r))
        outs.append(r.tokens)
    return outs
PROMPTS_SMALL = ROOT / "tests" / "data" / "prompts_small.jsonl"
TINY_TRAIN_FLAGS = ["--self_distill", "--prompts_file", str(PROMPTS_SMALL), "--distill_max_tokens", "96",
                    "--threads", "2", "--val_fraction", "0.2", "--draft_vocab_size", "2048", "--k_heads", "5",
                    "--batch_size", "2", "--learning_rate", "2e-3"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Heads trained through the founding document's entry point on a handful of self-distilled prompts
    (about a minute; 6 epochs, since the answers alone are only ~2,000 positions). Returns (run folder, the
    trainer's log)."""
    out = tmp_path_factory.mktemp("tiny_run")
    cmd = [sys.executable, str(ROOT / "model" / "train_medusa.py"), *TINY_TRAIN_FLAGS, "--epochs", "6",
           "--output_dir", str(out / "weights"), "--cache_dir", str(out / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stderr


@pytest.fixture(scope="session")
def tiny_dependent_run(tiny_run):
    """Dependent heads trained on the same cached data as `tiny_run` (training only). Returns the run folder."""
    out = tiny_run[0]
    cmd = [sys.executable, str(ROOT / "model" / "train_medusa.py"), *TINY_TRAIN_FLAGS, "--epochs", "6",
           "--head_type", "dependent", "--output_dir", str(out / "dependent"), "--cache_dir", str(out / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing" in proc.stderr  # the hidden states came from tiny_run's cache
    return out / "dependent"


@pytest.fixture(scope="session")
def tiny_heads(tiny_run, backend):
    from medusa_gguf.engine import load_heads_for

    return load_heads_for(backend, tiny_run[0] / "weights" / "medusa_heads_latest.pth")


@pytest.fixture(scope="session")
def tiny_dependent_heads(tiny_dependent_run, backend):
    from medusa_gguf.engine import load_heads_for

    return load_heads_for(backend, tiny_dependent_run / "medusa_heads_latest.pth")


@pytest.fixture(params=["medusa", "dependent"])
def trained_heads(request):
    """Both head types, for the tests that must hold for each."""
    return request.getfixturevalue("tiny_heads" if request.param == "medusa" else "tiny_dependent_heads")
