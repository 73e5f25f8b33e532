"""The Medusa tree as data: numbering, validation, tokens, expected gain, and the cost-aware choice of tree."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from medusa_gguf.tree import (
    DEFAULT_CHOICES,
    WIDE_CHOICES,
    Tree,
    build_tree,
    calibrate_tree,
    chain,
    expected_tokens_per_step,
    greedy_trees,
    interpolate_cost,
    load_choices,
    node_tokens,
    plain,
    save_choices,
)

# Hand example, given out of order: sorted it is (0,) (1,) (0,0) (0,1) (1,0) (0,0,0).
HAND = [(1,), (0, 0, 0), (0,), (0, 1), (1, 0), (0, 0)]
CPU_CURVE = {1: 10.8, 2: 17.3, 4: 27.0, 8: 51.8, 16: 97.2}  # docs/DESIGN.md, Q4_1 default model
CPU_ACCURACY = [[0.6, 0.1, 0.05], [0.4, 0.08], [0.3], [0.2]]


def test_build_tree_numbers_a_hand_example():
    t = build_tree(HAND)
    assert t.choices == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    assert t.parents == (-1, 0, 0, 1, 1, 2, 3)
    assert t.depths == (0, 1, 1, 2, 2, 2, 3)
    assert t.ranks == (0, 0, 1, 0, 1, 0, 0)
    assert (t.n_nodes, t.depth, t.max_rank_per_depth) == (7, 3, (2, 2, 1))


def test_build_tree_allows_sparse_ranks():
    t = build_tree([[2], [2, 3]])  # (2,) without (0,) is fine: only prefixes are required
    assert t.parents == (-1, 0, 1) and t.ranks == (0, 2, 3) and t.max_rank_per_depth == (3, 4)


@pytest.mark.parametrize(
    "choices, message",
    [
        ([(0,), (0, 1, 2)], r"\(0, 1, 2\) lacks its prefix \(0, 1\)"),
        ([(1, 0)], r"\(1, 0\) lacks its prefix \(1,\)"),
        ([(0,), (0,)], r"\(0,\) is listed twice"),
        ([()], "empty"),
        ([(0,), (0, -1)], "non-negative"),
        ([(0,), "01"], "not a sequence"),
        ([(0.0,)], "non-negative integers"),
    ],
)
def test_build_tree_rejects_bad_choices(choices, message):
    with pytest.raises(ValueError, match=message):
        build_tree(choices)


def random_closed_choices(rng: random.Random, n: int) -> list[tuple[int, ...]]:
    chosen: list[tuple[int, ...]] = []
    while len(chosen) < n:
        parent = rng.choice([()] + chosen)
        child = parent + (rng.randrange(4),)
        if child not in chosen and len(child) <= 5:
            chosen.append(child)
    rng.shuffle(chosen)
    return chosen


@pytest.mark.parametrize("seed", range(30))
def test_random_trees_are_topological_and_consistent(seed):
    rng = random.Random(seed)
    choices = random_closed_choices(rng, rng.randrange(0, 40))
    t = build_tree(choices)
    assert sorted(t.choices) == sorted(choices)
    assert t.parents[0] == -1 and t.depths[0] == 0
    for i in range(1, t.n_nodes):
        c, p = t.choices[i - 1], t.parents[i]
        assert p < i
        assert (t.depths[i], t.ranks[i]) == (len(c), c[-1])
        assert (p == 0 and len(c) == 1) or t.choices[p - 1] == c[:-1]
    for i in range(2, t.n_nodes):  # siblings in rank order
        same_parent = [j for j in range(1, i) if t.parents[j] == t.parents[i]]
        assert all(t.ranks[j] < t.ranks[i] for j in same_parent)


def test_chain_and_plain():
    assert chain(3).choices == ((0,), (0, 0), (0, 0, 0))
    assert chain(3).parents == (-1, 0, 1, 2)
    assert plain() == chain(0)
    assert (plain().n_nodes, plain().depth, plain().parents, plain().max_rank_per_depth) == (1, 0, (-1,), ())
    with pytest.raises(ValueError, match="depth"):
        chain(-1)


def test_named_trees_build():
    default, wide = build_tree(DEFAULT_CHOICES), build_tree(WIDE_CHOICES)
    assert 8 <= default.n_nodes <= 12 and default.depth == 4
    assert 30 <= wide.n_nodes <= 60 and wide.depth in (3, 4)
    assert wide.max_rank_per_depth[0] > default.max_rank_per_depth[0]
    assert wide.n_nodes <= 63  # the backend's exact batch limit


def test_save_load_round_trip(tmp_path):
    for tree in (build_tree(HAND), build_tree(WIDE_CHOICES), plain()):
        path = tmp_path / "tree.json"
        save_choices(tree, path)
        assert load_choices(path) == tree
        assert json.loads(path.read_text()) == [list(c) for c in tree.choices]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("[[0], [1]", "not valid JSON"),
        ('{"choices": [[0]]}', "list of lists of ints"),
        ("[0, 1]", "list of lists of ints"),
        ("[[0.5]]", "list of lists of ints"),
        ("[[true]]", "list of lists of ints"),
        ("[[0], [0, 0, 1]]", r"lacks its prefix \(0, 0\)"),
    ],
)
def test_load_choices_errors_name_file_and_problem(tmp_path, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_choices(path)
    assert str(path) in str(info.value)


def test_node_tokens_reads_each_heads_ranked_candidates():
    t = build_tree(HAND)
    topk = np.array([[10, 11, 12], [20, 21, 22], [30, 31, 32]])  # [heads, k]
    # nodes: root, (0,), (1,), (0,0), (0,1), (1,0), (0,0,0): the token depends on (depth, rank) only
    assert node_tokens(t, 7, topk) == [7, 10, 11, 20, 21, 20, 30]
    assert node_tokens(t, 7, topk[:, :2].tolist()) == [7, 10, 11, 20, 21, 20, 30]
    assert node_tokens(plain(), 5, np.zeros((0, 4), dtype=int)) == [5]


def test_node_tokens_errors():
    t = build_tree(HAND)
    with pytest.raises(ValueError, match="depth 3 but topk_ids holds only 2 heads"):
        node_tokens(t, 7, np.zeros((2, 3), dtype=int))
    with pytest.raises(ValueError, match="head 1's top-2 but topk_ids holds only top-1"):
        node_tokens(t, 7, np.zeros((3, 1), dtype=int))
    with pytest.raises(ValueError, match="shape"):
        node_tokens(t, 7, np.zeros(3, dtype=int))


def test_expected_tokens_per_step_by_hand():
    assert expected_tokens_per_step(chain(2), [[0.5], [0.4]]) == pytest.approx(1 + 0.5 + 0.2)
    # (0,) 0.5, (1,) 0.2, (0,0) 0.5*0.4, (1,0) 0.2*0.4: the rank-0 accuracy of head 2 serves both parents
    t = build_tree([(0,), (1,), (0, 0), (1, 0)])
    assert expected_tokens_per_step(t, [[0.5, 0.2], [0.4]]) == pytest.approx(1 + 0.5 + 0.2 + 0.2 + 0.08)
    assert expected_tokens_per_step(plain(), []) == 1.0


def test_expected_tokens_per_step_errors():
    with pytest.raises(ValueError, match="depth 2 but accuracy covers only 1 heads"):
        expected_tokens_per_step(chain(2), [[0.5]])
    with pytest.raises(ValueError, match="head 1's rank 1"):
        expected_tokens_per_step(build_tree([(0,), (1,)]), [[0.5]])
    with pytest.raises(ValueError, match="not a probability"):
        expected_tokens_per_step(chain(1), [[1.5]])


def test_interpolate_cost():
    curve = {1: 10.0, 2: 16.0, 4: 25.0, 8: 50.0, 16: 100.0}
    for n, ms in curve.items():
        assert interpolate_cost(curve, n) == ms
    assert interpolate_cost(curve, 3) == pytest.approx(20.5)
    assert interpolate_cost(curve, 6) == pytest.approx(37.5)
    assert interpolate_cost(curve, 12) == pytest.approx(75.0)
    assert interpolate_cost(curve, 32) == pytest.approx(200.0)  # slope of 8..16 continued
    assert interpolate_cost({16: 40.0, 1: 10.0, 4: 16.0}, 10) == pytest.approx(28.0)  # key order does not matter


def test_interpolate_cost_never_below_one_token():
    assert interpolate_cost({1: 10.0, 2: 9.0}, 2) == 10.0
    assert interpolate_cost({1: 10.0, 2: 12.0, 4: 11.0}, 10) == 10.0  # noisy tail extrapolates downwards


def test_interpolate_cost_errors():
    with pytest.raises(ValueError, match="n=1"):
        interpolate_cost({2: 5.0, 4: 6.0}, 3)
    with pytest.raises(ValueError, match="n=1"):
        interpolate_cost({1: 5.0}, 1)
    with pytest.raises(ValueError, match="at least 1 token"):
        interpolate_cost({1: 5.0, 2: 6.0}, 0)


def test_greedy_trees_add_nodes_by_path_probability():
    trees = list(greedy_trees([[0.5, 0.3], [0.4]], max_depth=2, max_nodes=10))
    assert [t.n_nodes for t in trees] == [1, 2, 3, 4, 5]  # stops when the frontier is empty
    # (0,) 0.5, then (1,) 0.3 before (0,0) 0.2, then (1,0) 0.12
    added = [next(c for c in b.choices if c not in a.choices) for a, b in zip(trees, trees[1:])]
    assert added == [(0,), (1,), (0, 0), (1, 0)]


def test_calibrate_flat_curve_picks_a_large_tree():
    flat = {n: 10.0 for n in (1, 2, 4, 8, 16, 32, 64)}
    acc = [[0.5, 0.1, 0.05, 0.03, 0.02, 0.01, 0.01, 0.01]] * 4
    cal = calibrate_tree(acc, flat, max_depth=4)
    assert cal.tree.n_nodes == 63 and cal.tree.depth == 4
    assert cal.predicted_speedup == pytest.approx(cal.expected_tokens_per_step)  # cost is the same as plain
    assert cal.predicted_speedup > 1.5
    assert cal.reason.startswith("best tree: 63 nodes, depth 4")
    assert [row[0] for row in cal.table] == list(range(1, 64))


def test_calibrate_linear_curve_returns_plain():
    linear = {n: 10.0 * n for n in (1, 2, 4, 8, 16, 32, 64)}
    cal = calibrate_tree(CPU_ACCURACY, linear, max_depth=4)
    assert cal.tree == plain()
    assert (cal.predicted_speedup, cal.expected_tokens_per_step, cal.step_cost_ms) == (1.0, 1.0, 10.0)
    assert "no tree beats plain decoding" in cal.reason
    assert max(row[3] for row in cal.table[1:]) < 1.0


def test_calibrate_measured_cpu_curve_stays_small():
    # n=2 costs 1.6x one token, so head-1 top-1 at 0.6 only breaks even (0.999x): plain wins by the margin.
    cal = calibrate_tree(CPU_ACCURACY, CPU_CURVE, max_depth=4)
    assert cal.tree.n_nodes <= 8
    assert cal.tree == plain() and "best: 2 nodes, 1.00x" in cal.reason
    # Stronger heads: a small chain wins; bigger trees cost more than they bring.
    strong = [[0.8, 0.1], [0.7, 0.1], [0.6], [0.5]]
    cal = calibrate_tree(strong, CPU_CURVE, max_depth=4)
    assert 2 <= cal.tree.n_nodes <= 8 and cal.predicted_speedup > 1.1
    assert cal.tree == chain(2)


def test_calibrate_respects_max_depth_and_max_nodes():
    flat = {1: 10.0, 64: 10.0}
    acc = [[0.6, 0.2, 0.1]] * 5
    cal = calibrate_tree(acc, flat, max_depth=2, max_nodes=9)
    assert cal.tree.depth <= 2 and cal.tree.n_nodes <= 9
    assert len(cal.table) == 9
    for t in greedy_trees(acc, max_depth=2, max_nodes=9):
        assert t.depth <= 2
    # max_depth is capped by the number of heads with accuracies
    cal = calibrate_tree(acc[:2], flat, max_depth=10)
    assert cal.tree.depth == 2 and cal.tree.n_nodes == 1 + 3 + 9
    # no head at all: plain decoding
    cal = calibrate_tree(acc, flat, max_depth=0)
    assert cal.tree == plain() and len(cal.table) == 1 and "no tree to try" in cal.reason


def test_calibrate_prediction_matches_recomputation():
    head_ms = 2.5
    strong = [[0.8, 0.1, 0.05], [0.7, 0.1], [0.6, 0.1], [0.5]]
    cal = calibrate_tree(strong, CPU_CURVE, max_depth=4, head_cost_ms=head_ms)
    assert cal.tree != plain()
    cost = interpolate_cost(CPU_CURVE, cal.tree.n_nodes) + head_ms
    expected = expected_tokens_per_step(cal.tree, strong)
    assert cal.step_cost_ms == pytest.approx(cost)
    assert cal.expected_tokens_per_step == pytest.approx(expected)
    assert cal.predicted_speedup == pytest.approx(expected * CPU_CURVE[1] / cost)
    assert (cal.tree.n_nodes, expected, cost, cal.predicted_speedup) in cal.table
    assert cal.predicted_speedup == max(row[3] for row in cal.table)
    # head cost counts: enough of it and plain wins
    assert calibrate_tree(strong, CPU_CURVE, max_depth=4, head_cost_ms=10.0).tree == plain()


def test_tree_is_hashable_data():
    assert isinstance(build_tree(HAND), Tree)
    assert len({build_tree(HAND), build_tree(sorted(HAND))}) == 1


def test_calibrate_needs_the_margin():
    curve = {1: 10.0, 2: 15.0}
    acc = [[0.51]]  # chain(1): 1.51 tokens at 1.5x the cost: 1.0067x
    assert calibrate_tree(acc, curve, max_depth=1).tree == plain()
    assert "1.02x margin" in calibrate_tree(acc, curve, max_depth=1).reason
    cal = calibrate_tree(acc, curve, max_depth=1, margin=1.0)
    assert cal.tree == chain(1) and cal.predicted_speedup == pytest.approx(1.51 / 1.5)


def test_calibrate_charges_head_cost_per_depth():
    """Dependent heads run once per level: a cost per depth makes deep trees dearer than shallow ones."""
    strong = [[0.9, 0.05], [0.9, 0.05], [0.9, 0.05], [0.9]]
    flat = {1: 10.0, 64: 10.0}
    deep = calibrate_tree(strong, flat, max_depth=4, head_cost_ms=[1.0, 1.0, 1.0, 1.0])
    assert deep.tree.depth == 4
    steep = calibrate_tree(strong, flat, max_depth=4, head_cost_ms=[1.0, 30.0, 60.0, 90.0])
    assert steep.tree.depth == 1
    assert steep.step_cost_ms == pytest.approx(10.0 + 1.0)
    with pytest.raises(ValueError, match="head_cost_ms covers 2 depths; the tree may be 4 deep"):
        calibrate_tree(strong, flat, max_depth=4, head_cost_ms=[1.0, 2.0])
