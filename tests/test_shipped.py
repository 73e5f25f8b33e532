"""The heads shipped for the default model, and the recipe that reproduces them."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from medusa_gguf.decoding import GenerationResult, SamplingParams, generate
from medusa_gguf.engine import SHIPPED, SHIPPED_HEADS, load_heads_for
from medusa_gguf.heads import read_heads_file
from medusa_gguf.models import file_sha256
from medusa_gguf.tree import DEFAULT_CHOICES, build_tree

from .conftest import ROOT


def test_the_default_is_one_of_the_shipped_types():
    assert SHIPPED_HEADS in SHIPPED.values()


@pytest.mark.parametrize("head_type", SHIPPED)
def test_shipped_heads_exist_and_are_small(head_type):
    path = SHIPPED[head_type]
    assert path.is_file(), f"{path} is missing: run `medusa-gguf recipe default --head-type {head_type} --install`"
    config, state = read_heads_file(path)
    # fp16, and no full-vocabulary matrix: the embeddings (and the base projection) come from the GGUF.
    assert all(t.dtype == torch.float16 for t in state.values() if t.is_floating_point())
    assert all(config.n_vocab not in t.shape for t in state.values()), {k: t.shape for k, t in state.items()}
    assert path.stat().st_size < 40e6


@pytest.mark.parametrize("head_type", SHIPPED)
def test_shipped_heads_match_the_default_model(model_path, head_type):
    config, _ = read_heads_file(SHIPPED[head_type])
    assert config.head_type == head_type
    assert config.base_model_sha256 == file_sha256(model_path)
    assert config.base_model_name == model_path.name
    assert len(config.accuracy) == config.k_heads and all(len(row) == 10 for row in config.accuracy)
    assert 0 < config.accuracy[0][0] < 1


@pytest.mark.parametrize("head_type", SHIPPED)
def test_shipped_heads_greedy_equals_plain(backend, head_type):
    heads = load_heads_for(backend, SHIPPED[head_type])
    tree = build_tree(DEFAULT_CHOICES)
    prompt = backend.tokenize(backend.apply_chat_template([{"role": "user", "content": "Describe a thunderstorm."}]))
    plain, medusa = GenerationResult(), GenerationResult()
    list(generate(backend, prompt, SamplingParams(max_tokens=48), plain))
    list(generate(backend, prompt, SamplingParams(max_tokens=48), medusa, heads=heads, tree=tree))
    assert medusa.tokens == plain.tokens
    assert medusa.stats.mode == "medusa" and sum(medusa.stats.accepted_per_depth) > 0


def test_recipe_runs_end_to_end_in_a_tiny_configuration(tmp_path):
    out = tmp_path / "recipe"
    cmd = [sys.executable, "-m", "medusa_gguf", "recipe", "default", "--prompts", "6", "--epochs", "1",
           "--threads", "2", "--output-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**__import__("os").environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "REPORT.md").read_text()
    assert "| 1 |" in report and "Tree calibration" in report
    config, _ = read_heads_file(out / "medusa_heads_shipped.pth")
    assert config.k_heads == 5 and config.accuracy and config.head_type == "dependent"  # the recipe's default
    assert config.own_lm_head
    assert not (out / "cache" / "val" / "manifest.json").read_text() == ""
