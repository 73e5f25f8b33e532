"""The `medusa-gguf` command line, run as a user runs it: a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "medusa_gguf"]


def run(args, env_extra=None, timeout=120):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(CLI + args, capture_output=True, text=True, env=env, timeout=timeout)


def test_generate_prints_a_reply():
    out = run(["generate", "What is the capital of France?", "--max-tokens", "12", "--threads", "2"])
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "finish_reason=" in out.stderr


def test_generate_greedy_is_deterministic_and_respects_max_tokens():
    args = ["generate", "Count from one to twenty in words.", "--max-tokens", "5", "--threads", "2"]
    first, second = run(args), run(args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert "5 generated, finish_reason=length" in first.stderr


def test_bad_environment_variable_is_named():
    out = run(["generate", "hi"], {"N_THREADS": "abc"})
    assert out.returncode == 2
    assert "N_THREADS='abc' is not an integer" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_model_is_named(tmp_path):
    out = run(["generate", "hi", "--model", str(tmp_path / "missing.gguf")])
    assert out.returncode == 2
    assert f"model file not found: {tmp_path / 'missing.gguf'}" in out.stderr


def test_prompt_longer_than_context_is_an_error_not_a_crash():
    out = run(["generate", "word " * 400, "--n-ctx", "64", "--threads", "2"])
    assert out.returncode == 2
    assert "exceeds the context window n_ctx=64" in out.stderr


def test_costs_writes_table_and_json(tmp_path):
    path = tmp_path / "curve.json"
    out = run(["costs", "--sizes", "1,2,4", "--repeats", "2", "--context", "16", "--threads", "2", "--json", str(path)])
    assert out.returncode == 0, out.stderr
    assert "| 4 |" in out.stdout
    data = json.loads(path.read_text())
    assert set(data["ms"]) == {"1", "2", "4"}
    assert all(v > 0 for v in data["ms"].values())
    assert data["relative"]["1"] == pytest.approx(1.0)


@pytest.mark.parametrize("command", [[], ["generate"], ["costs"]])
def test_help_explains(command):
    out = run(command + ["--help"])
    assert out.returncode == 0
    assert "usage: medusa-gguf" in out.stdout


def test_bench_runs_every_method_and_writes_json_and_plot(tmp_path, tiny_dependent_run):
    from .conftest import PROMPTS_SMALL

    path, png = tmp_path / "bench.json", tmp_path / "bench.png"
    out = run(["bench", "--prompts", str(PROMPTS_SMALL), "--limit", "2", "--max-tokens", "8", "--threads", "2",
               "--dependent-weights", str(tiny_dependent_run / "medusa_heads_latest.pth"),
               "--json", str(path), "--plot", str(png)], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    methods = json.loads(path.read_text())["methods"]
    assert set(methods) == {"plain", "prompt_lookup", "medusa_static", "medusa_calibrated", "medusa_dependent",
                            "medusa_dependent_calibrated", "eagle3_static", "eagle3_calibrated"}  # (the shipped drafter)
    assert methods["eagle3_static"]["outputs_match_plain"]
    for m in methods.values():
        assert {"tokens_per_s", "tau", "speedup_vs_plain", "outputs_match_plain"} <= set(m)
        assert m["tokens_per_s"] > 0
    assert methods["plain"]["outputs_match_plain"] and methods["medusa_static"]["outputs_match_plain"]
    assert methods["medusa_dependent"]["outputs_match_plain"]
    assert png.stat().st_size > 10_000 and "| medusa_dependent |" in out.stdout


def test_quantize_writes_a_model_that_loads_and_generates(tmp_path, model_path):
    target = tmp_path / "q8.gguf"
    out = run(["quantize", str(target), "--type", "q8_0", "--threads", "2"], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert target.stat().st_size > model_path.stat().st_size  # Q8_0 is larger than the Q4_1 source
    gen = run(["generate", "What is the capital of France?", "--max-tokens", "8", "--model", str(target),
               "--threads", "2"])
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.strip()
