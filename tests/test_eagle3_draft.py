"""EAGLE-3 drafting in the decode loop: the dynamic tree's shape rules, the drafter's bookkeeping against a fresh
reading of the same text, greedy output equal to plain decoding, sampling, and the engine's choice of drafter."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from medusa_gguf import engine as E
from medusa_gguf.decoding import GenerationResult, SamplingParams, generate
from medusa_gguf.eagle3_draft import DynamicSchedule, DynamicTreeParams, Eagle3Drafting, frontier_widths
from medusa_gguf.eagle3_gguf import drafter_for_target, drafter_info, export_eagle3_gguf, is_eagle3_gguf, read_gguf_header
from medusa_gguf.settings import Settings, SettingsError
from medusa_gguf.tree import DEFAULT_CHOICES, build_tree, chain

from .conftest import TEST_SETTINGS, heldout_chat_prompts, plain_greedy

SHAPES = {"default": DynamicTreeParams(), "chain": DynamicTreeParams(nodes=6, depth=5, width=1, topk=1),
          "wide": DynamicTreeParams(nodes=40, depth=5, width=8, topk=6)}


def test_frontier_widths_and_dynamic_shapes_of_static_trees():
    tree = build_tree(DEFAULT_CHOICES)
    widths = frontier_widths(tree)
    assert len(widths) == tree.depth - 1
    parents_at = [{tree.parents[i] for i in range(1, tree.n_nodes) if tree.depths[i] == d + 2} for d in range(len(widths))]
    assert widths == [len(p) for p in parents_at]
    assert frontier_widths(chain(4)) == [1, 1, 1]
    p = DynamicTreeParams.like(tree)
    assert (p.nodes, p.depth, p.width, p.topk) == (tree.n_nodes, tree.depth, max(widths), max(tree.ranks) + 1)
    assert DynamicTreeParams.like(build_tree([])) is None
    sched = DynamicSchedule((100,), (p, None))
    assert sched.at(99) == p and sched.at(100) is None and sched.depth == p.depth
    with pytest.raises(ValueError, match="at most 63"):
        DynamicTreeParams(nodes=64)
    with pytest.raises(ValueError, match="width must be >= 1"):
        DynamicTreeParams(width=0)


@pytest.fixture(scope="module")
def untrained(model_path, tmp_path_factory):
    """A drafter as training starts it: fc passes the highest layer through, the head is the target's lm_head."""
    drafter = drafter_for_target(model_path, torch.arange(4096))
    w = drafter.config.target_width
    with torch.no_grad():
        drafter.fc.weight.zero_()
        drafter.fc.weight[:, 2 * w : 3 * w] = torch.eye(w)
    path = tmp_path_factory.mktemp("eagle3") / "untrained.gguf"
    export_eagle3_gguf(drafter, path, target_gguf=model_path, weight_type="f16")
    return path


@pytest.fixture(scope="module")
def drafter_file(untrained):
    """The shipped drafter (trained: deep paths get accepted), else the untrained one."""
    return E.SHIPPED_EAGLE3 if E.SHIPPED_EAGLE3.is_file() else untrained


@pytest.fixture(scope="module")
def prompts(backend):
    return heldout_chat_prompts(backend, 6)


@pytest.fixture(scope="module")
def plain_outputs(backend, prompts):
    return plain_greedy(backend, prompts, 64)


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_eagle3_equals_plain(backend, drafter_file, prompts, plain_outputs, shape):
    drafting = Eagle3Drafting(backend, drafter_file, DynamicSchedule.of(SHAPES[shape]))
    try:
        accepted = [0] * SHAPES[shape].depth
        for i, (prompt, truth) in enumerate(zip(prompts, plain_outputs)):
            r = GenerationResult()
            list(generate(backend, prompt, SamplingParams(max_tokens=64), r, drafter=drafting))
            assert r.tokens == truth, f"prompt {i}, {shape} trees: outputs differ from plain decoding"
            assert r.stats.mode == "medusa"
            accepted = [a + b for a, b in zip(accepted, r.stats.accepted_per_depth)]
            for s in range(1, drafting.runtime.n_seq_max):  # no draft is left in the drafter's cache
                assert drafting.runtime.pos_max(s) == -1
        print(f"\n{shape} ({drafter_file.name}): accepted drafts per depth {accepted}")
        assert accepted[0] > 0
        if drafter_file == E.SHIPPED_EAGLE3:
            assert accepted[1] > 0  # a trained drafter gets paths below depth 1 accepted: the whole path logic ran
    finally:
        drafting.close()


def test_the_drafters_state_is_what_a_fresh_reading_of_the_text_gives(backend, untrained):
    """After tree steps, the entries the session fed (from the verification calls' features) give the drafter the
    same root distribution as entries built from a prefill of the whole committed text."""
    drafting = Eagle3Drafting(backend, untrained, DynamicSchedule.of(SHAPES["default"]))
    sessions = []
    original = drafting.session
    drafting.session = lambda tokens, prefill: sessions.append(original(tokens, prefill)) or sessions[-1]
    prompt_tokens = backend.tokenize(backend.apply_chat_template(
        [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]))
    try:
        r = GenerationResult()
        list(generate(backend, prompt_tokens, SamplingParams(max_tokens=40), r, drafter=drafting))
        assert r.finish_reason == "length"  # so the last token is the pending one, not an end of turn
        committed = list(prompt_tokens) + r.tokens[:-1]  # the last token is the pending one
        live = sessions[0]
        assert backend.n_past == len(committed) and live.tokens == committed
        assert sum(r.stats.accepted_per_depth) > 0  # some steps committed drafts
        logits, pre = live._catch_up(r.tokens[-1])
        fresh = original(committed, backend.prefill(committed))  # clears the drafter's cache
        fresh_logits, fresh_pre = fresh._catch_up(r.tokens[-1])
        assert int(np.argmax(logits)) == int(np.argmax(fresh_logits))
        assert np.abs(logits - fresh_logits).max() < 1e-2 and np.abs(pre - fresh_pre).max() < 1e-2
    finally:
        drafting.close()


def test_sampling_with_eagle3_is_seeded_and_stops(backend, untrained, prompt_tokens):
    drafting = Eagle3Drafting(backend, untrained, DynamicSchedule.of(SHAPES["default"]))
    try:
        outs = []
        for _ in range(2):
            r = GenerationResult()
            list(generate(backend, prompt_tokens, SamplingParams(temperature=0.8, seed=3, max_tokens=30), r,
                          drafter=drafting))
            assert len(r.tokens) <= 30 and all(0 <= t < backend.n_vocab for t in r.tokens)
            outs.append(r.tokens)
        assert outs[0] == outs[1]
    finally:
        drafting.close()


def test_a_session_refuses_a_prefill_without_features(backend, untrained, prompt_tokens):
    drafting = Eagle3Drafting(backend, untrained, DynamicSchedule.of(SHAPES["chain"]))
    try:
        backend.tap_layers(())
        with pytest.raises(ValueError, match="layer taps must be on"):
            drafting.session(prompt_tokens, backend.prefill(prompt_tokens))
    finally:
        backend.tap_layers(drafting.runtime.target_layers)
        drafting.close()


# -- the engine ---------------------------------------------------------------------------------------------------


def test_the_engine_serves_an_exported_drafter(backend, untrained, prompt_tokens, tmp_path):
    plan = E.plan_decoding(backend, Settings(**TEST_SETTINGS, medusa_weights_path=untrained, tree="default"))
    try:
        assert plan.eagle3 is not None and plan.heads is None and plan.drafting
        assert "EAGLE-3 drafter untrained.gguf with default dynamic trees" in plan.reason
        r = GenerationResult()
        list(plan.generate(backend, prompt_tokens, SamplingParams(max_tokens=24), r))
        assert r.stats.mode == "medusa" and 0 < len(r.tokens) <= 24
    finally:
        plan.close()
    with pytest.raises(ValueError, match="grows its own trees"):
        E.plan_decoding(backend, Settings(**TEST_SETTINGS, medusa_weights_path=untrained,
                                          tree=str(tmp_path / "tree.json")))
    assert is_eagle3_gguf(untrained) and not is_eagle3_gguf(E.SHIPPED_MEDUSA_HEADS) and not is_eagle3_gguf(tmp_path / "none")
    assert not is_eagle3_gguf(backend.model_path)  # a GGUF, of another architecture


def test_drafter_setting_is_checked():
    assert Settings.from_env({"DRAFTER": "EAGLE3"}).drafter == "eagle3"
    with pytest.raises(SettingsError, match="DRAFTER='medusa' is not a drafter kind; accepted values: auto, heads"):
        Settings.from_env({"DRAFTER": "medusa"})


def test_export_command_writes_the_hash_and_accuracies(model_path, tmp_path):
    import subprocess
    import sys

    from medusa_gguf.eagle3 import save_drafter
    from medusa_gguf.models import file_sha256

    drafter = drafter_for_target(model_path, torch.arange(1024))
    from dataclasses import replace

    acc = ((0.6, 0.1, 0.05), (0.5, 0.1, 0.04))
    drafter.config = replace(drafter.config, base_model_sha256=file_sha256(model_path), accuracy=acc)
    save_drafter(drafter, tmp_path / "d.pth")
    proc = subprocess.run([sys.executable, "-m", "medusa_gguf", "export-eagle3", str(tmp_path / "d.pth"),
                           str(tmp_path / "d.gguf"), "--weight-type", "q8_0"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "given the earlier steps right: 0.600 0.500" in proc.stdout
    sha, accuracy = drafter_info(read_gguf_header(tmp_path / "d.gguf").meta)
    assert sha == file_sha256(model_path) and np.allclose(accuracy, acc)
    proc = subprocess.run([sys.executable, "-m", "medusa_gguf", "export-eagle3", str(tmp_path / "none.pth"),
                           str(tmp_path / "x.gguf")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "EAGLE-3 weights file not found" in proc.stderr
