"""Continuous batching: many requests' steps, trees and prompt chunks share each llama.cpp call of one context, and
every request's greedy output is token for token what it is alone."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from .conftest import heldout_chat_prompts
from medusa_gguf.backend import EXACT_BATCH, Backend, ContextLengthError, Work
from medusa_gguf.costs import StepCosts
from medusa_gguf.decoding import GenerationResult, SamplingParams
from medusa_gguf.engine import Engine, _loaded_step_ms
from medusa_gguf.settings import Settings
from medusa_gguf.tree import DEFAULT_CHOICES, TreeSchedule, build_tree, calibrate_tree, plain

N_CTX = 512
GREEDY = SamplingParams(max_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def prompts(backend):
    """Five held-out chat prompts and one of over three prompt chunks, read a chunk per round next to the others."""
    short = heldout_chat_prompts(backend, 5)
    long = [t for p in short for t in p[1:]][: 3 * EXACT_BATCH + 7]
    return short + [short[0][:1] + long]


@pytest.fixture(scope="module")
def alone(prompts):
    """Each prompt generated alone, by an engine of its own, with the shipped heads drafting a static tree."""
    engine = Engine(Settings(n_ctx=N_CTX, n_threads=2, tree="default"))
    try:
        outs = []
        for p in prompts:
            r = GenerationResult()
            list(engine.generate(p, GREEDY, r))
            assert r.stats.mode == "medusa"
            outs.append(r.tokens)
        return outs
    finally:
        engine.close()


def run_together(engine: Engine, prompts, params=GREEDY) -> list[GenerationResult]:
    views = engine.views()
    results = [GenerationResult() for _ in prompts]
    errors = []

    def work(i):
        try:
            list(views[i].generate(prompts[i], params, results[i]))
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


@pytest.mark.parametrize("tree", ["default", "plain"])
def test_concurrent_requests_give_what_they_give_alone(prompts, alone, tree):
    engine = Engine(Settings(n_ctx=N_CTX, n_threads=2, tree=tree), slots=len(prompts))
    try:
        results = run_together(engine, prompts)
        stats = engine.batcher.stats
        assert [r.tokens for r in results] == alone
        assert {r.stats.mode for r in results} == {"medusa" if tree == "default" else "plain"}
        assert stats.step_rows / stats.calls > 2, f"the calls did not batch: {stats}"
        assert engine.batcher.active == 0 and all(st.tree is None for st in engine.backend.states)
    finally:
        engine.close()


@pytest.mark.parametrize("slots", [1, 3])
def test_every_call_is_led_by_one_thread(prompts, slots):
    """OpenMP keeps a worker pool per thread that led its work; more pools than cores throttle every barrier. So
    with several slots the rounds run on the batcher's own thread, and with one slot on the request's."""
    engine = Engine(Settings(n_ctx=N_CTX, n_threads=2, tree="plain"), slots=slots)
    try:
        leaders = []
        decode_batch = engine.backend.decode_batch

        def recording(works):
            leaders.append(threading.current_thread().name)
            return decode_batch(works)

        engine.backend.decode_batch = recording
        run_together(engine, prompts[:slots])
        assert len(leaders) > slots and len(set(leaders)) == 1, leaders
        assert leaders[0].startswith("rounds") == (slots > 1), leaders[0]
    finally:
        engine.close()


def test_trash_compaction_under_load_keeps_outputs_exact(backend):
    """Per-slot windows of 128 leave 128 slack cells for 10 texts' discarded tree nodes: compactions must happen,
    and with 10 trees of 10 nodes a round takes two calls, so the room for both is made before the first."""
    short = [p[:40] for p in heldout_chat_prompts(backend, 10)]
    params = SamplingParams(max_tokens=60, temperature=0)
    engine = Engine(Settings(n_ctx=128, n_threads=2, tree="default"), slots=len(short))
    try:
        ref = []
        for p in short:
            r = GenerationResult()
            list(engine.generate(p, params, r))
            ref.append(r.tokens)
        results = run_together(engine, short, params)
        assert engine.backend.compactions > 0, "the test did not reach a compaction"
        assert engine.batcher.stats.calls > engine.batcher.stats.rounds, "no round took two calls"
        assert [r.tokens for r in results] == ref
    finally:
        engine.close()


def test_decode_batch_rows_do_not_depend_on_their_neighbours(backend, prompts):
    """Two texts in one cache, their cells interleaved, their steps in one call: logits equal each text alone."""
    a, b = prompts[0], prompts[1]
    expected = []
    for p in (a, b):
        out = backend.prefill(p)
        tok, rows = int(np.argmax(out.logits[-1])), []
        for _ in range(4):
            row = backend.append([tok]).logits[-1]
            rows.append(row)
            tok = int(np.argmax(row))
        expected.append(np.stack(rows))
    with Backend(Settings(n_ctx=N_CTX, n_threads=2), slots=2) as shared:
        sa, sb = shared.states
        # the prompts go in as alternating chunks, so their cells interleave
        for i in range(0, max(len(a), len(b)), 16):
            works = [Work(st, p[i : i + 16], outputs="last") for st, p in ((sa, a), (sb, b)) if p[i : i + 16]]
            last = shared.decode_batch(works)
        toks = [int(np.argmax(o.logits[-1])) for o in last]
        got = [[], []]
        for _ in range(4):
            outs = shared.decode_batch([Work(sa, [toks[0]]), Work(sb, [toks[1]])])
            for k, o in enumerate(outs):
                got[k].append(o.logits[-1])
            toks = [int(np.argmax(o.logits[-1])) for o in outs]
    for k in range(2):
        assert np.array_equal(np.stack(got[k]), expected[k]), f"text {k}: max difference " \
            f"{float(np.max(np.abs(np.stack(got[k]) - expected[k])))}"


def test_a_cancelled_request_stops_while_its_prompt_is_read(prompts):
    engine = Engine(Settings(n_ctx=N_CTX, n_threads=2, tree="plain"), slots=2)
    try:
        view = engine.views()[0]
        checks = []
        result = GenerationResult()
        list(view.generate(prompts[-1], GREEDY, result, cancelled=lambda: checks.append(1) or len(checks) > 1))
        assert result.tokens == [] and result.finish_reason is None
        assert engine.batcher.stats.calls == 1, "the prompt kept being read after the cancel"
        assert engine.backend.states[0].n_past <= EXACT_BATCH  # what was read stays, as a prompt cache
        r = GenerationResult()  # the slot serves the next request
        list(view.generate(prompts[0], GREEDY, r))
        assert len(r.tokens) == GREEDY.max_tokens
    finally:
        engine.close()


def test_a_prompt_over_the_window_fails_alone(prompts):
    engine = Engine(Settings(n_ctx=64, n_threads=2, tree="plain"), slots=2)
    try:
        view = engine.views()[0]
        with pytest.raises(ContextLengthError, match="exceeds the context window n_ctx=64"):
            list(view.generate(prompts[-1], GREEDY, GenerationResult()))
        r = GenerationResult()
        list(view.generate(prompts[0][:30], SamplingParams(max_tokens=8, temperature=0), r))
        assert len(r.tokens) == 8
    finally:
        engine.close()


def test_a_slot_serves_one_request_at_a_time(prompts):
    engine = Engine(Settings(n_ctx=N_CTX, n_threads=2, tree="plain"), slots=1)
    try:
        view = engine.views()[0]
        first = view.generate(prompts[0], GREEDY, GenerationResult())
        next(first)
        with pytest.raises(RuntimeError, match="already serving"):
            next(view.generate(prompts[1], GREEDY, GenerationResult()))
        first.close()
        assert engine.batcher.active == 0
    finally:
        engine.close()


def test_calibrated_trees_shrink_with_load_where_a_bigger_call_costs_more():
    accuracy = [[0.6, 0.1, 0.05]] * 3
    tree = build_tree(c for c in DEFAULT_CHOICES if len(c) <= 3)
    free = lambda t: 0.0  # noqa: E731 (drafting costs nothing here)
    linear = StepCosts.from_curve({n: 10.0 * n for n in (1, 2, 4, 8, 16, 32, 64, 128)})
    flat = StepCosts.from_curve({n: 10.0 + 0.05 * n for n in (1, 2, 4, 8, 16, 32, 64, 128)})

    def best(costs, load):
        return calibrate_tree(accuracy, _loaded_step_ms(costs, 64, load, free), max_depth=3).tree

    assert best(flat, 1).n_nodes > 1 and best(flat, 16).n_nodes > 1  # a GPU-like curve: drafts stay
    assert best(linear, 16) == plain()  # compute-bound: at load, every drafted token costs a full token
    schedule = TreeSchedule((), (tree,), loaded=((4, TreeSchedule((), (plain(),))),))
    assert schedule.tree_at(100, load=1) == tree and schedule.tree_at(100, load=3) == tree
    assert schedule.tree_at(100, load=4) == plain() and schedule.depth == tree.depth


def test_a_prompt_starts_from_the_prefix_the_cache_holds(backend):
    """A system prompt is shared by every request, and a second turn starts with the whole first conversation: those cells are reused (from another slot's text or the slot's own), and outputs stay exact."""
    engine = Engine(Settings(n_ctx=N_CTX, n_threads=2, tree="default"), slots=2)
    single = Engine(Settings(n_ctx=N_CTX, n_threads=2, tree="default"))
    try:
        a, b = engine.views()
        system = {"role": "system", "content": "You are a helpful assistant. You answer in one short sentence."}
        turn = [system, {"role": "user", "content": "Name a fruit."}]
        first = GenerationResult()
        list(a.generate(a.chat_prompt(turn), GREEDY, first))
        stats = engine.batcher.stats
        other = b.chat_prompt([system, {"role": "user", "content": "Name a colour."}])
        r = GenerationResult()
        list(b.generate(other, GREEDY, r))  # the system prompt comes from slot a's text
        assert stats.reused_tokens >= len(a.chat_prompt([system])) - 4, stats
        alone = GenerationResult()
        list(single.generate(other, GREEDY, alone))
        assert r.tokens == alone.tokens
        reused = stats.reused_tokens
        second = a.chat_prompt(turn + [{"role": "assistant", "content": first.text},
                                       {"role": "user", "content": "And a vegetable?"}])
        r2, alone2 = GenerationResult(), GenerationResult()
        list(a.generate(second, GREEDY, r2))
        assert stats.reused_tokens - reused >= len(a.chat_prompt(turn)), "the first turn was decoded again"
        list(single.generate(second, GREEDY, alone2))
        assert r2.tokens == alone2.tokens
    finally:
        engine.close()
        single.close()
