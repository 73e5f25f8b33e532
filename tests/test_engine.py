"""How the engine chooses to decode: weights file, shipped heads bound to one model file, tree, fallbacks."""
from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from medusa_gguf import engine as E
from medusa_gguf.costs import StepCosts
from medusa_gguf.heads import HeadsConfig, HeadsError, MedusaHeads, save_heads
from medusa_gguf.settings import Settings

from .conftest import TEST_SETTINGS

LINEAR = {1: 10.0, 2: 20.0, 4: 40.0, 8: 80.0, 16: 160.0, 32: 320.0, 64: 640.0}  # n tokens cost n steps
FLAT = {1: 10.0, 2: 10.0, 4: 10.0, 8: 10.0, 16: 10.5, 32: 11.0, 64: 12.0}  # a GPU-like curve


@pytest.fixture(params=["medusa", "dependent"])
def tiny_weights(request, tiny_run) -> Path:
    """Trained heads of each type: every planning rule holds for both."""
    if request.param == "medusa":
        return tiny_run[0] / "weights" / "medusa_heads_latest.pth"
    return request.getfixturevalue("tiny_dependent_run") / "medusa_heads_latest.pth"


@pytest.fixture
def no_shipped(monkeypatch, tmp_path):
    monkeypatch.setattr(E, "SHIPPED_HEADS", tmp_path / "absent.pth")
    monkeypatch.setattr(E, "SHIPPED_EAGLE3", tmp_path / "absent.gguf")


def settings(**kw) -> Settings:
    return Settings(**TEST_SETTINGS, **kw)


def fixed_curve(monkeypatch, ms: dict[int, float]) -> None:
    monkeypatch.setattr(E, "step_costs", lambda backend, s: StepCosts.from_curve(ms))


def test_absent_weights_mean_plain_decoding_with_the_reason(backend, no_shipped, tmp_path):
    plan = E.plan_decoding(backend, settings(medusa_weights_path=tmp_path / "none.pth"))
    assert plan.heads is None and f"no drafter weights at {tmp_path / 'none.pth'}" in plan.reason


def test_tree_plain_disables_heads(backend, tiny_weights):
    plan = E.plan_decoding(backend, settings(medusa_weights_path=tiny_weights, tree="plain"))
    assert plan.heads is None and "TREE=plain" in plan.reason


def test_weights_for_another_model_are_an_error(backend, tmp_path):
    cfg = HeadsConfig(k_heads=5, n_embd=32, n_vocab=100, hidden_dim=8, base_model_name="other.gguf")
    path = tmp_path / "other.pth"
    save_heads(MedusaHeads(cfg, torch.zeros(100, 32)), path)
    with pytest.raises(HeadsError, match=r"width 32 \(other.gguf\); this model has width 576"):
        E.plan_decoding(backend, settings(medusa_weights_path=path))


def test_shipped_heads_are_used_only_for_their_model_file(backend, monkeypatch, tmp_path, tiny_run):
    from medusa_gguf.heads import read_heads_file

    tiny_weights = tiny_run[0] / "weights" / "medusa_heads_latest.pth"
    config, state = read_heads_file(tiny_weights)
    foreign = tmp_path / "shipped.pth"
    heads = MedusaHeads(replace(config, base_model_sha256="0" * 64, base_model_name="someone-else.gguf"),
                        torch.zeros(49152, 576), state["draft_ids"])
    save_heads(heads, foreign)
    monkeypatch.setattr(E, "SHIPPED_HEADS", foreign)
    monkeypatch.setattr(E, "SHIPPED_EAGLE3", tmp_path / "absent.gguf")  # the heads alone are under test
    plan = E.plan_decoding(backend, settings(medusa_weights_path=tmp_path / "none.pth"))
    assert plan.heads is None and "trained for someone-else.gguf, not this model file" in plan.reason
    monkeypatch.setattr(E, "SHIPPED_HEADS", tiny_weights)  # trained on this very file: its hash matches
    fixed_curve(monkeypatch, FLAT)
    plan = E.plan_decoding(backend, settings(medusa_weights_path=tmp_path / "none.pth"))
    assert plan.heads is not None and plan.weights_path == tiny_weights


def test_calibration_falls_back_when_no_tree_pays(backend, tiny_weights, monkeypatch):
    fixed_curve(monkeypatch, LINEAR)
    plan = E.plan_decoding(backend, settings(medusa_weights_path=tiny_weights))
    assert plan.heads is None and plan.calibration is not None
    assert "plain decoding" in plan.reason and "no tree beats plain decoding" in plan.reason


def test_calibration_picks_a_tree_on_a_flat_curve(backend, tiny_weights, monkeypatch):
    fixed_curve(monkeypatch, FLAT)
    plan = E.plan_decoding(backend, settings(medusa_weights_path=tiny_weights, max_tokens_per_step=4))
    assert plan.heads is not None and plan.tree.depth <= 3 and plan.calibration.tree.n_nodes > 2
    assert plan.calibration.predicted_speedup > 1


@pytest.mark.parametrize("tree, depth", [("chain", 3), ("default", 3), ("wide", 3)])
def test_static_trees_are_cut_to_max_tokens_per_step(backend, tiny_weights, tree, depth):
    plan = E.plan_decoding(backend, settings(medusa_weights_path=tiny_weights, tree=tree, max_tokens_per_step=4))
    assert plan.heads is not None and plan.tree.depth == depth


def test_tree_file_deeper_than_the_heads_is_an_error(backend, tiny_weights, tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]")
    with pytest.raises(ValueError, match="is 6 deep but .* has 5 heads"):
        E.plan_decoding(backend, settings(medusa_weights_path=tiny_weights, tree=str(path)))


def test_head_cost_is_measured_per_depth_for_both_types(backend, tiny_run, tiny_dependent_run):
    medusa = E.load_heads_for(backend, tiny_run[0] / "weights" / "medusa_heads_latest.pth")
    dependent = E.load_heads_for(backend, tiny_dependent_run / "medusa_heads_latest.pth")
    assert dependent.config.head_type == "dependent" and medusa.config.head_type == "medusa"
    m, d = E.head_cost_ms(medusa, backend.n_embd, 4), E.head_cost_ms(dependent, backend.n_embd, 4)
    assert len(m) == len(d) == 4 and all(x > 0 for x in m + d)  # one cost per draft depth, for calibration


def test_setup_work_runs_in_a_thread_that_ends_and_its_result_or_error_comes_back():
    seen = []

    def work(x):
        seen.append(threading.current_thread())
        return x * 2

    assert E.in_passing_thread(work, 21) == 42
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()

    def fail():
        raise ValueError("bad heads file")

    with pytest.raises(ValueError, match="bad heads file"):
        E.in_passing_thread(fail)
