"""The heads shipped for the default model, and the recipe that reproduces them."""
from __future__ import annotations

import subprocess
import sys

import torch

from medusa_gguf.decoding import GenerationResult, SamplingParams, generate
from medusa_gguf.engine import SHIPPED_HEADS
from medusa_gguf.heads import load_heads, read_heads_file
from medusa_gguf.models import file_sha256, output_matrix
from medusa_gguf.tree import DEFAULT_CHOICES, build_tree

from .conftest import ROOT


def test_shipped_heads_exist_and_are_small():
    assert SHIPPED_HEADS.is_file(), f"{SHIPPED_HEADS} is missing: run `medusa-gguf recipe default --install`"
    assert SHIPPED_HEADS.stat().st_size < 10e6


def test_shipped_heads_match_the_default_model(model_path):
    config, _ = read_heads_file(SHIPPED_HEADS)
    assert config.base_model_sha256 == file_sha256(model_path)
    assert config.base_model_name == model_path.name
    assert len(config.accuracy) == config.k_heads and all(len(row) == 10 for row in config.accuracy)
    assert 0 < config.accuracy[0][0] < 1


def test_shipped_heads_greedy_equals_plain(backend, model_path):
    heads = load_heads(SHIPPED_HEADS, torch.from_numpy(output_matrix(model_path)))
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
    assert config.k_heads == 5 and config.accuracy
    assert not (out / "cache" / "val" / "manifest.json").read_text() == ""
