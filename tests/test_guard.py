"""The acceptance guard: a calibrated tree decodes plainly for a while when its drafts stop paying, and the output
stays exactly plain greedy decoding's."""
from __future__ import annotations

import numpy as np
import pytest

from medusa_gguf.bench import MethodReport, Run, summarize
from medusa_gguf.decoding import AcceptanceGuard, GenerationResult, SamplingParams, generate
from medusa_gguf.costs import StepCosts
from medusa_gguf.tree import TreeSchedule, build_tree, calibrate_tree, chain, node_tokens


PLAIN_S = 0.010  # the cost model's plain step: 100 tokens/s


def feed(guard: AcceptanceGuard, steps: list[tuple[int, float]], plain_s: float = PLAIN_S) -> list[bool]:
    """Drive the guard as the stepper does, with (tokens, seconds) per tree step and `plain_s` per plain step;
    return, per step, whether it drafted."""
    drafted = []
    for tokens, seconds in steps:
        use = guard.use_tree()
        drafted.append(use)
        if use:
            guard.record_tree(tokens, seconds, context=100)
        else:
            guard.record_plain(plain_s, context=100)
    return drafted


def guard(**kw) -> AcceptanceGuard:
    return AcceptanceGuard(lambda context: PLAIN_S, **kw)


def test_a_paying_tree_is_never_interrupted():
    assert all(feed(guard(window=4), [(2, 0.015), (1, 0.015)] * 50))  # 100 tokens in 1.5 s: 1.33x plain


def test_a_losing_window_buys_plain_steps_and_each_failure_doubles_them():
    drafted = feed(guard(window=4, cooldown=3), [(1, 0.015)] * 30)
    # 4 tree steps, 3 plain, 4 tree, 6 plain, 4 tree, 12 plain (of which 9 fit)
    assert drafted == [True] * 4 + [False] * 3 + [True] * 4 + [False] * 6 + [True] * 4 + [False] * 9


def test_a_paying_window_resets_the_cooldown():
    g = guard(window=2, cooldown=2)
    # fail (2 plain steps), pay (cooldown back to 2), fail (2 plain steps, not 4), pay
    steps = [(1, 0.02), (1, 0.02), (0, 0), (0, 0), (3, 0.02), (3, 0.02), (1, 0.02), (1, 0.02), (0, 0), (0, 0),
             (2, 0.01), (2, 0.01)]
    assert feed(g, steps) == [True, True, False, False, True, True, True, True, False, False, True, True]
    assert g.cooldown == 2 and g.plain_left == 0


def test_enough_tokens_per_step_is_not_enough_when_the_steps_are_slow():
    # 1.5 tokens per step passes a break-even of 1.4 plain steps by count, but these steps take 20 ms: 75 tokens/s
    # against plain's 100. The guard judges by the clock.
    assert not all(feed(guard(window=4), [(2, 0.02), (1, 0.02)] * 10))


def test_measured_plain_steps_correct_the_prediction():
    # The machine is twice as slow as when the costs were measured: plain steps take 20 ms, not 10. Tree steps
    # giving 1.2 tokens in 18 ms (67 tokens/s) lose against the prediction (100) but beat plain as it runs now (50).
    g = guard(window=4, cooldown=4)
    drafted = feed(g, [(1.2, 0.018)] * 40, plain_s=0.020)
    assert drafted[:8] == [True] * 4 + [False] * 4  # judged against the prediction, before any plain step
    assert all(drafted[8:])  # then against the measured plain steps
    assert g.plain_s(100) == pytest.approx(0.020)


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"cooldown": 0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="bad guard settings"):
        guard(**kwargs)


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
                  guard=AcceptanceGuard(lambda context: 1e-4, window=4, cooldown=8)))
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

    curve = {1: 10.0, 2: 13.0, 3: 16.0}
    cal = calibrate_tree([[0.9], [0.8]], curve, max_depth=2)
    calibrated = DecodingPlan(object(), TreeSchedule((), (cal.tree,)), "calibrated", calibration=cal,
                              calibrations=((64, cal),), costs=StepCosts.from_curve(curve))
    g = calibrated.guard()
    assert isinstance(g, AcceptanceGuard) and g.plain_s(64) == pytest.approx(0.010)  # the cost model's plain step
    assert calibrated.guard() is not g  # one per request
    assert DecodingPlan(object(), chain(2), "static").guard() is None  # a static tree is used as asked
    assert DecodingPlan(None, None, "plain").guard() is None
