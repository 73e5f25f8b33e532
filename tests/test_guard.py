"""The acceptance guard: a calibrated tree decodes plainly for a while when its drafts stop paying, and the output
stays exactly plain greedy decoding's."""
from __future__ import annotations

import numpy as np
import pytest

from medusa_gguf.bench import MethodReport, Run, summarize
from medusa_gguf.decoding import AcceptanceGuard, GenerationResult, SamplingParams, generate
from medusa_gguf.tree import build_tree, calibrate_tree, chain, node_tokens


def feed(guard: AcceptanceGuard, tokens_per_step: list[int]) -> list[bool]:
    """Drive the guard as the stepper does; return, per step, whether it drafted."""
    drafted = []
    for t in tokens_per_step:
        use = guard.use_tree()
        drafted.append(use)
        if use:
            guard.record(t)
    return drafted


def test_a_paying_tree_is_never_interrupted():
    assert all(feed(AcceptanceGuard(1.4, window=4), [2, 1, 2, 1] * 50))  # 1.5 tokens/step against 1.4


def test_a_losing_window_buys_plain_steps_and_each_failure_doubles_them():
    drafted = feed(AcceptanceGuard(1.4, window=4, cooldown=3), [1] * 30)
    # 4 tree steps, 3 plain, 4 tree, 6 plain, 4 tree, 12 plain (of which 9 fit)
    assert drafted == [True] * 4 + [False] * 3 + [True] * 4 + [False] * 6 + [True] * 4 + [False] * 9


def test_a_paying_window_resets_the_cooldown():
    guard = AcceptanceGuard(1.4, window=2, cooldown=2)
    # fail (2 plain steps), pay (cooldown back to 2), fail (2 plain steps, not 4), pay
    drafted = feed(guard, [1, 1, 0, 0, 3, 3, 1, 1, 0, 0, 2, 2])
    assert drafted == [True, True, False, False, True, True, True, True, False, False, True, True]
    assert guard.cooldown == 2 and guard.plain_left == 0


@pytest.mark.parametrize("kwargs", [{"break_even": 0}, {"break_even": 1.2, "window": 0}, {"break_even": 1.2, "cooldown": 0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="bad guard settings"):
        AcceptanceGuard(**kwargs)


def test_break_even_is_the_calibrated_step_cost_in_plain_steps():
    curve = {1: 10.0, 2: 13.0, 3: 16.0, 4: 19.0}
    cal = calibrate_tree([[0.9], [0.8]], curve, max_depth=2, head_cost_ms=[1.0, 2.0])
    assert cal.tree.depth > 0
    assert cal.break_even_tokens == pytest.approx(cal.step_cost_ms / 10.0)


class WrongHeads:
    """Drafts that are never right: every tree step emits one token, so a guard must turn drafting off."""

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab, self.calls = n_vocab, 0

    def draft(self, hidden, root: int, tree) -> list[int]:
        self.calls += 1
        wrong = np.full((tree.depth, max(tree.max_rank_per_depth)), (root + 7) % self.n_vocab)
        return node_tokens(tree, root, wrong)


def test_generate_with_a_guard_decodes_plainly_and_exactly(backend):
    prompt = backend.tokenize(backend.apply_chat_template([{"role": "user", "content": "Name three rivers."}]))
    params = SamplingParams(max_tokens=48)
    plain = GenerationResult()
    list(generate(backend, prompt, params, plain))
    heads, tree = WrongHeads(backend.n_vocab), build_tree([(0,), (1,), (0, 0)])
    guarded = GenerationResult()
    list(generate(backend, prompt, params, guarded, heads=heads, tree=tree,
                  guard=AcceptanceGuard(1.3, window=4, cooldown=8)))
    assert guarded.tokens == plain.tokens
    assert guarded.stats.guard_plain_steps > 0 and guarded.stats.to_dict()["guard_plain_steps"] > 0
    assert heads.calls == guarded.stats.steps - 1 - guarded.stats.guard_plain_steps  # the first step needs no draft
    unguarded = GenerationResult()
    list(generate(backend, prompt, params, unguarded, heads=WrongHeads(backend.n_vocab), tree=tree))
    assert unguarded.tokens == plain.tokens and unguarded.stats.guard_plain_steps == 0


def test_the_bench_ceiling_counts_guarded_plain_steps_at_one_plain_step():
    curve = {1: 10.0, 2: 15.0}
    plain = MethodReport("plain", runs=[Run("a", [1] * 8, 1.0, 8, produced=8)])
    guarded = MethodReport("medusa_calibrated", tree_nodes=2, runs=[
        Run("a", [1] * 8, 1.0, 6, produced=8, guard_plain_steps=2)])  # 4 tree steps (6 tokens) + 2 plain steps
    m = summarize({"plain": plain, "medusa_calibrated": guarded}, curve, [{}], 8)["methods"]["medusa_calibrated"]
    assert m["guard_plain_steps_share"] == pytest.approx(2 / 6)
    assert m["ceiling_speedup"] == pytest.approx(8 / (4 * 1.5 + 2))


def test_only_a_calibrated_tree_gets_a_guard():
    from medusa_gguf.engine import DecodingPlan

    cal = calibrate_tree([[0.9], [0.8]], {1: 10.0, 2: 13.0, 3: 16.0}, max_depth=2)
    guard = DecodingPlan(object(), cal.tree, "calibrated", calibration=cal).guard()
    assert isinstance(guard, AcceptanceGuard) and guard.break_even == pytest.approx(cal.break_even_tokens)
    assert DecodingPlan(object(), chain(2), "static").guard() is None  # a static tree is used as asked
    assert DecodingPlan(None, None, "plain").guard() is None
