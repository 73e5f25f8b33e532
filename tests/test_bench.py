"""The benchmark's arithmetic, on made-up runs (the end-to-end run is in test_cli)."""
from __future__ import annotations

import pytest

from medusa_gguf.bench import MethodReport, Run, format_report, summarize

CURVE = {1: 10.0, 2: 15.0, 10: 50.0}


def test_summarize_counts_the_eos_step_and_takes_per_prompt_ratios():
    plain = MethodReport("plain", runs=[Run("a", [1, 2, 3], 1.0, 4, produced=4), Run("b", [4] * 6, 1.0, 6, produced=6)])
    medusa = MethodReport("medusa_static", tree_nodes=10, runs=[
        Run("a", [1, 2, 3], 0.5, 2, heads_s=0.002, produced=4,  # twice as fast as plain on prompt a
            predicted_s=1.25, predicted_speedup=1.5, tree_steps=2, tree_tokens=4, predicted_tree_tokens=5.0,
            accepted_per_depth=[1, 0]),
        Run("b", [4] * 5 + [9], 2.0, 2, heads_s=0.002, produced=6,  # half as fast, and a different output
            predicted_s=2.5, predicted_speedup=0.5, tree_steps=2, tree_tokens=6, predicted_tree_tokens=5.0,
            accepted_per_depth=[2, 1]),
    ])
    result = summarize({"plain": plain, "medusa_static": medusa}, CURVE, [{}, {}], 8)
    p, m = result["methods"]["plain"], result["methods"]["medusa_static"]
    assert p["tau"] == 1.0  # 10 tokens produced (EOS included) in 10 steps
    assert m["tau"] == pytest.approx(10 / 4)
    assert m["speedup_vs_plain"] == pytest.approx(statistics_median([2.0, 0.5]))
    assert m["outputs_match_plain"] is False and m["match_rate"] == 0.5
    assert m["tree_cost_in_plain_steps"] == pytest.approx(5.0) and m["ceiling_speedup"] == pytest.approx(0.5)
    assert result["plain_step_ms"] == pytest.approx(2.0 / 10 * 1e3)  # plain's own steps, not the cost curve's
    assert m["head_ms_per_step"] == pytest.approx(0.004 / 4 * 1e3)
    assert m["head_overhead_vs_plain_step"] == pytest.approx(1.0 / 200.0)
    assert m["per_category"]["a"]["tau"] == 2.0 and m["per_category"]["a"]["speedup_vs_plain"] == pytest.approx(2.0)
    # predicted against measured: speedup (median of the runs'), tree steps' tau, the cost model's time for the
    # runs' own steps over their wall time
    assert m["predicted_speedup"] == pytest.approx(1.0) and m["cost_model_time_ratio"] == pytest.approx(3.75 / 2.5)
    assert m["tree_steps_tau"] == pytest.approx(2.5) and m["predicted_tree_steps_tau"] == pytest.approx(2.5)
    assert m["per_category"]["b"]["predicted_speedup"] == pytest.approx(0.5)
    assert m["per_category"]["b"]["cost_model_time_ratio"] == pytest.approx(2.5 / 2.0)
    assert m["acceptance_per_depth"] == pytest.approx([3 / 4, 1 / 4])  # per tree step, over both runs
    row = ("| medusa_static | 3.6 | 2.50 | 1.25x | 1.00x | 2.50 / 2.50 | 1.50 | 0.50x | 0.5% | 0.75 / 0.25 "
           "| no: 50% of prompts match |")
    assert row in format_report(result)


def statistics_median(values):
    values = sorted(values)
    return (values[0] + values[-1]) / 2 if len(values) == 2 else values[len(values) // 2]


@pytest.mark.parametrize("n", [1, 2, 4, 5, 6])
def test_balanced_orders_place_and_precede_every_method_equally(n):
    from collections import Counter

    from medusa_gguf.bench import balanced_orders

    orders = balanced_orders(n)
    assert len(orders) == (n if n % 2 == 0 else 2 * n) and all(sorted(o) == list(range(n)) for o in orders)
    for place in range(n):  # every method in every place equally often
        assert len(set(Counter(o[place] for o in orders).values())) == 1
    pairs = Counter((o[j], o[j + 1]) for o in orders for j in range(n - 1))
    assert len(pairs) == n * (n - 1) and len(set(pairs.values())) <= 1  # each ordered pair of neighbours alike


def test_tree_steps_the_cost_model_cannot_price_carry_no_prediction():
    """A dynamic EAGLE-3 tree has no static tree for the cost model to price: the report leaves its predictions blank
    instead of showing plain's 1.00x, the measured tau as the predicted one, or a step time without the drafter's."""
    from medusa_gguf.bench import Predictor

    class Costs:  # the step cost model's one method a plan without drafts asks for
        def tree(self, nodes, leaves, context):
            return 10.0 * nodes

    plain = MethodReport("plain", runs=[Run("a", [1, 2, 3, 4], 1.0, 5, produced=5)])
    run = Run("a", [1, 2, 3, 4], 1.0, 2, produced=5)
    Predictor(None, Costs(), 64).fill(run, [(10, 16, 4, 3, 0.0), (13, 1, 1, 1, 0.0)])  # a tree step, a plain step
    assert not run.predicted and run.tree_steps == 1 and run.tree_tokens == 3
    result = summarize({"plain": plain, "eagle3_static": MethodReport("eagle3_static", tree_nodes=16, runs=[run])},
                       CURVE, [{}], 8)
    m = result["methods"]["eagle3_static"]
    assert m["predicted_speedup"] is None and m["predicted_tree_steps_tau"] is None
    assert m["cost_model_time_ratio"] is None and m["per_category"]["a"]["predicted_speedup"] is None
    assert m["tree_steps_tau"] == 3.0
    row = next(line for line in format_report(result).splitlines() if line.startswith("| eagle3_static |"))
    assert row.split(" | ")[4:7] == ["", "3.00 / -", ""], row  # predicted speedup, tree-step tau, step-time ratio
