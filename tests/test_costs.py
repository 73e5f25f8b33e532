"""The step cost model: its arithmetic on made-up numbers, and a real measurement in the decode loop's own code."""
from __future__ import annotations

from dataclasses import replace

import pytest

from medusa_gguf import engine as E
from medusa_gguf.costs import (StepCosts, break_even_acceptance, chain_tokens, cost_key, fan, format_step_costs,
                               measure_step_costs)
from medusa_gguf.tree import build_tree, chain, n_leaves

MADE_UP = StepCosts(
    key="k", machine={}, contexts=(64, 512),
    plain_ms={64: 10.0, 512: 14.0},
    chain_ms={64: {1: 10.0, 2: 16.0, 4: 24.0}, 512: {1: 14.0, 2: 22.0, 4: 34.0}},
    leaf_ms={64: 0.5, 512: 1.0},
)


def test_costs_interpolate_in_size_and_context_and_add_the_leaves():
    assert MADE_UP.plain(64) == 10.0 and MADE_UP.plain(288) == pytest.approx(12.0)  # halfway: linear in context
    assert MADE_UP.plain(960) == pytest.approx(18.0)  # beyond the last context: the line goes on
    assert MADE_UP.tree(3, 1, 64) == pytest.approx(20.0)  # between sizes 2 and 4
    assert MADE_UP.tree(4, 3, 64) == pytest.approx(24.0 + 2 * 0.5)  # two extra leaves
    assert MADE_UP.tree(4, 3, 512) == pytest.approx(34.0 + 2 * 1.0)
    assert MADE_UP.tree(1, 1, 512) == MADE_UP.plain(512)  # a root alone is a plain step
    assert MADE_UP.curve(64) == {1: 10.0, 2: 16.0, 4: 24.0}


def test_costs_survive_json():
    assert StepCosts.from_json(MADE_UP.to_json()) == MADE_UP


def test_break_even_acceptance_solves_the_chain_equation():
    # A 2-node chain costing 1.6 plain steps pays from p = 0.6 on (1 + p = 1.6); 1.25x needs 1 + p = 2.0.
    assert break_even_acceptance(1.6, 2) == pytest.approx(0.6)
    assert break_even_acceptance(1.6, 2, gain=1.25) == pytest.approx(1.0)
    assert break_even_acceptance(1.9, 2, gain=1.25) is None  # 2.375 tokens from a 2-token chain: never
    p = break_even_acceptance(2.5, 4)
    assert chain_tokens(p, 4) == pytest.approx(2.5) and 0 < p < 1
    assert break_even_acceptance(1.0, 3) == pytest.approx(0.0, abs=1e-9)  # a free tree pays at any acceptance
    table = format_step_costs(MADE_UP)
    row4 = next(line for line in table.splitlines() if line.startswith("| 4 |"))
    assert row4.endswith(f"| {break_even_acceptance(2.4, 4):.2f} | {break_even_acceptance(2.4, 4, 1.25):.2f} |")
    assert all(line.count("|") == table.splitlines()[0].count("|") for line in table.splitlines())


def test_leaves_of_trees():
    assert n_leaves(chain(3)) == 1 and n_leaves(fan(5)) == 4 and n_leaves(build_tree([(0,), (1,), (0, 0)])) == 2


def test_the_cache_key_changes_with_what_the_costs_depend_on(backend):
    key, parts = cost_key(backend)
    assert {"model_sha256", "system_info", "cpu", "threads", "extra_bufts", "n_ctx", "gpu_layers", "flash_attn",
            "kv_type"} <= set(parts)
    assert cost_key(backend)[0] == key  # stable
    threads, backend.n_threads = backend.n_threads, backend.n_threads + 1
    try:
        assert cost_key(backend)[0] != key
    finally:
        backend.n_threads = threads
    extra, backend.extra_bufts = backend.extra_bufts, not backend.extra_bufts  # what the load decided counts
    try:
        assert cost_key(backend)[0] != key
    finally:
        backend.extra_bufts = extra
    settings = backend.settings
    backend.settings = replace(settings, n_gpu_layers=0)
    try:
        assert cost_key(backend)[0] != key
    finally:
        backend.settings = settings


def test_a_real_measurement_times_whole_steps(backend):
    costs = measure_step_costs(backend, sizes=(1, 2, 8), contexts=(32, 256), repeats=1, progress=False)
    assert costs.contexts == (32, 256) and backend.n_past == 0  # the backend is left clean
    for c in costs.contexts:
        assert costs.plain_ms[c] > 0 and costs.chain_ms[c][8] > costs.plain_ms[c]  # 8 tokens cost more than 1
        assert costs.leaf_ms[c] >= 0
        assert costs.spread[c] >= 1.0  # slowest over fastest plain step
    assert StepCosts.from_json(costs.to_json()) == costs


def test_the_engine_measures_once_and_reads_the_cache(backend, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(E, "_MEASURED", set())
    calls = []

    def fake_measure(b, **kw):
        calls.append(kw)
        return MADE_UP

    monkeypatch.setattr(E, "measure_step_costs", fake_measure)
    first = E.step_costs(backend, backend.settings)
    second = E.step_costs(backend, backend.settings)
    assert first == second == MADE_UP and len(calls) == 1
    (cached,) = (tmp_path / "medusa-gguf" / "costs").glob("steps-*.json")
    cached.write_text("{not json")
    assert E.step_costs(backend, backend.settings) == MADE_UP and len(calls) == 2  # unreadable: measured again


def test_a_model_measured_on_a_busy_machine_is_measured_again_once(backend, monkeypatch, tmp_path):
    """A measurement under load would otherwise be cached forever (one was: a plain step of 88 ms instead of 6)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(E, "_MEASURED", set())
    busy = replace(MADE_UP, spread={64: 3.0, 512: 1.2})
    quiet = replace(MADE_UP, plain_ms={64: 9.0, 512: 13.0}, spread={64: 1.1, 512: 1.1})
    results = [busy, quiet]
    monkeypatch.setattr(E, "measure_step_costs", lambda b, **kw: results.pop(0))
    assert busy.noise == 3.0 and quiet.noise == 1.1
    assert E.step_costs(backend, backend.settings) == busy  # first start: measured, busy, cached with a warning
    assert E.step_costs(backend, backend.settings) == busy  # the same process does not measure twice
    E._MEASURED.clear()  # a new process
    assert E.step_costs(backend, backend.settings) == quiet  # the busy cache is measured again and replaced
    assert E.step_costs(backend, backend.settings) == quiet and not results  # quiet: read from the cache


def test_a_busier_second_measurement_keeps_the_first(backend, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(E, "_MEASURED", set())
    busy = replace(MADE_UP, spread={64: 2.0})
    busier = replace(MADE_UP, plain_ms={64: 30.0, 512: 40.0}, spread={64: 4.0})
    results = [busy, busier]
    monkeypatch.setattr(E, "measure_step_costs", lambda b, **kw: results.pop(0))
    assert E.step_costs(backend, backend.settings) == busy
    E._MEASURED.clear()  # a new process
    assert E.step_costs(backend, backend.settings) == busy and not results  # measured again, kept the quieter
    assert E.step_costs(backend, backend.settings) == busy  # once per process: no third measurement
