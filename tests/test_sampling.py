"""Sampling without sorting the vocabulary equals a full-sort reference, and lossless tree sampling is lossless.

The last tests drive the decoder's own verification (`MedusaStepper._verify`) over a fake 16-token model and check
the joint distribution of the first two emitted tokens with a chi-square test; the same test fails two subtly
wrong acceptance rules, so it has the power to catch one. No model is loaded: this file runs in seconds.
"""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from medusa_gguf import decoding
from medusa_gguf.decoding import MedusaStepper, SamplingParams
from medusa_gguf.sampling import (
    FIRST_CANDIDATES,
    Distribution,
    accept_lossless,
    accept_typical,
    distribution,
    probabilities,
    sample,
)
from medusa_gguf.tree import build_tree


def reference(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The distribution by a full stable sort, most likely first (ties: lower id first)."""
    z = logits.astype(np.float64) / params.temperature
    order = np.argsort(-z, kind="stable")
    if params.top_k:
        order = order[: params.top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if params.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(p), params.top_p - 1e-9)) + 1  # the mass reaches top_p (float slack)
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return order, p


def assert_matches_reference(logits: np.ndarray, params: SamplingParams) -> None:
    ref_ids, ref_p = reference(logits, params)
    ids, p = probabilities(logits, params)
    assert ids.tolist() == ref_ids.tolist()
    np.testing.assert_allclose(p, ref_p, rtol=1e-9, atol=1e-300)
    d = distribution(logits, params)  # the representation the decoder uses: ascending ids, or dense
    dense = np.zeros(len(logits))
    dense[ref_ids] = ref_p
    if d.ids is None:
        np.testing.assert_allclose(d.p, dense, rtol=1e-9, atol=1e-300)
    else:
        assert d.ids.tolist() == sorted(ref_ids.tolist())
        np.testing.assert_allclose(d.p, dense[d.ids], rtol=1e-9, atol=1e-300)


# -- the distribution ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [1, 2, 17, 300, 5000, 49152])
def test_distribution_equals_full_sort_reference(vocab):
    rng = np.random.default_rng(vocab)
    for trial in range(60 if vocab < 49152 else 12):
        scale = [0.3, 1.0, 3.0, 10.0][trial % 4]  # flat to peaked: top-p cuts from the first round to the last
        logits = (rng.standard_normal(vocab) * scale).astype(np.float32)
        params = SamplingParams(
            temperature=float(rng.choice([0.2, 0.7, 1.0, 1.5])),
            top_k=int(rng.choice([0, 1, 3, 8, 40, 1000, vocab, vocab + 5])),
            top_p=float(rng.choice([1.0, 0.999, 0.95, 0.9, 0.5, 0.1, 1e-6])),
        )
        assert_matches_reference(logits, params)


def test_top_p_needing_many_candidates_grows_past_the_first_rounds():
    logits = np.zeros(20_000, dtype=np.float32)  # uniform: top-p 0.9 keeps 18,000 tokens, beyond n / 8
    logits[::7] = 0.5
    for top_p in (0.9, 0.3, 0.05, 1 / 20_000):
        assert_matches_reference(logits, SamplingParams(temperature=1.0, top_p=top_p))
    assert len(distribution(logits, SamplingParams(temperature=1.0, top_p=0.9)).p) > 8 * FIRST_CANDIDATES


def test_ties_go_to_the_lower_token_id():
    rng = np.random.default_rng(3)
    for trial in range(200):
        logits = rng.integers(-3, 3, size=int(rng.integers(2, 3000))).astype(np.float32)  # many exact ties
        params = SamplingParams(temperature=1.0, top_k=int(rng.choice([0, 1, 2, 5, 70])),
                                top_p=float(rng.choice([1.0, 0.9, 0.5, 0.2])))
        assert_matches_reference(logits, params)
    logits = np.array([1, 3, 3, 3, 0], dtype=np.float32)
    assert probabilities(logits, SamplingParams(temperature=1.0, top_k=2))[0].tolist() == [1, 2]
    assert probabilities(logits, SamplingParams(temperature=1.0, top_k=1))[0].tolist() == [1]
    uniform = np.zeros(4, dtype=np.float32)
    assert probabilities(uniform, SamplingParams(temperature=1.0, top_p=0.5))[0].tolist() == [0, 1]


def test_top_p_edges():
    logits = np.log([0.125, 0.5, 0.125, 0.25])  # float64, so the masses are exact to 1e-16: ranked 1, 3, 0, 2
    kept = {top_p: probabilities(logits, SamplingParams(temperature=1.0, top_p=top_p))[0].tolist()
            for top_p in (1e-9, 0.5, 0.5 + 1e-6, 0.75, 0.75 + 1e-6, 0.875, 0.9, 1.0)}
    assert kept == {1e-9: [1], 0.5: [1], 0.5 + 1e-6: [1, 3], 0.75: [1, 3], 0.75 + 1e-6: [1, 3, 0],
                    0.875: [1, 3, 0], 0.9: [1, 3, 0, 2], 1.0: [1, 3, 0, 2]}
    ids, p = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.75))
    np.testing.assert_allclose(p, [2 / 3, 1 / 3])  # renormalised over the kept set
    ids, p = probabilities(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.8))  # top-p of the top-3 mass
    assert ids.tolist() == [1, 3] and np.isclose(p[0], 2 / 3)


def test_greedy_sample_is_the_argmax_and_ties_take_the_lower_id():
    rng = np.random.default_rng(0)
    logits = np.array([0.5, 2.0, 2.0, -1.0], dtype=np.float32)
    assert sample(logits, SamplingParams(), rng) == 1
    assert sample(logits, SamplingParams(temperature=1.0, top_k=1), rng) == 1


def test_distribution_lookups():
    d = distribution(np.array([0.0, 5.0, 4.0, -9.0, 3.0], dtype=np.float32), SamplingParams(temperature=1.0, top_k=3))
    assert d.ids.tolist() == [1, 2, 4]
    assert d.index(3) is None and d.prob(3) == 0.0 and d.index(0) is None and d.index(99) is None
    assert d.index(2) == 1 and d.prob(2) == pytest.approx(float(d.p[1]))
    dense = distribution(np.zeros(3, dtype=np.float32), SamplingParams(temperature=1.0))
    assert dense.ids is None and dense.index(2) == 2 and dense.prob(1) == pytest.approx(1 / 3)


# -- drawing -------------------------------------------------------------------------------------------------------


def chi2_sf(x: float, df: int) -> float:
    """P(chi-square with df degrees of freedom > x): the regularised lower incomplete gamma function by its series."""
    a, h = df / 2, x / 2
    if h <= 0:
        return 1.0
    term = total = 1.0 / a
    k = 0
    while term > 1e-17 * total:
        k += 1
        term *= h / (a + k)
        total += term
    return max(0.0, 1.0 - math.exp(math.log(total) - h + a * math.log(h) - math.lgamma(a)))


def chi2_quantile(q: float, df: int) -> float:
    lo, hi = 0.0, 10.0 * df + 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1 - chi2_sf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def test_chi2_quantile_matches_the_tables():
    for df, value in ((1, 10.828), (10, 29.588), (30, 59.703), (57, 95.751)):
        assert chi2_quantile(0.999, df) == pytest.approx(value, abs=2e-3)


def chi_square(counts: dict, expected: dict, n: int) -> tuple[float, int]:
    """(statistic, degrees of freedom) of observed counts against expected probabilities; cells expecting fewer
    than 5 draws are pooled into one. A draw of a zero-probability outcome fails outright."""
    impossible = {k: c for k, c in counts.items() if expected.get(k, 0.0) <= 0}
    assert not impossible, f"outcomes the distribution forbids: {impossible}"
    stat, cells, pooled_obs, pooled_exp = 0.0, 0, 0, 0.0
    for k, p in expected.items():
        if n * p >= 5:
            stat += (counts.get(k, 0) - n * p) ** 2 / (n * p)
            cells += 1
        else:
            pooled_obs, pooled_exp = pooled_obs + counts.get(k, 0), pooled_exp + n * p
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    return stat, cells - 1


def test_sample_draws_from_the_distribution_over_a_large_vocabulary():
    """The two-level inverse CDF (vocab > 1024): mass spread over several blocks, and cut tokens never drawn."""
    vocab, n = 3000, 20_000
    logits = np.full(vocab, -4.0, dtype=np.float32)
    heavy = [5, 255, 256, 1023, 1800, 2999]  # block edges and the ragged last block
    logits[heavy] = [2.0, 1.0, 1.5, 0.5, 2.5, 1.0]
    rng = np.random.default_rng(11)
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_p=0.95)):
        ids, p = reference(logits, params)
        expected = dict(zip(ids.tolist(), p.tolist()))
        counts: dict[int, int] = {}
        for _ in range(n):
            t = sample(logits, params, rng)
            counts[t] = counts.get(t, 0) + 1
        stat, df = chi_square(counts, expected, n)
        assert stat < chi2_quantile(0.999, df), (params, stat, df)


def test_draw_skips_zero_weights():
    d = Distribution(np.full(2000, 1 / 2000))
    weights = np.zeros(2000)
    weights[[0, 1999]] = 1.0
    rng = np.random.default_rng(0)
    assert {d.draw(rng, weights) for _ in range(300)} == {0, 1999}


# -- acceptance ----------------------------------------------------------------------------------------------------


def test_typical_acceptance_equals_the_dictionary_version():
    """The array version against Medusa's rule written over a dict of the sorted distribution."""
    rng = np.random.default_rng(5)
    for _ in range(300):
        logits = (rng.standard_normal(50) * 2).astype(np.float32)
        params = SamplingParams(temperature=1.0, top_k=int(rng.choice([0, 10])), acceptance="typical",
                                typical_epsilon=float(rng.choice([0.05, 0.3])), typical_alpha=float(rng.choice([0.1, 0.9])))
        drafts = rng.integers(0, 50, size=4).tolist()
        ids, p = reference(logits, params)
        entropy = float(-(p * np.log(np.clip(p, 1e-12, None))).sum())
        threshold = min(params.typical_epsilon, params.typical_alpha * np.exp(-entropy))
        prob = dict(zip(ids.tolist(), p.tolist()))
        expected = next((k for k, x in enumerate(drafts) if prob.get(x, 0.0) > threshold), None)
        assert accept_typical(distribution(logits, params), drafts, params) == expected


def test_lossless_acceptance_of_one_node_covers_the_support_and_skips_cut_drafts():
    d = distribution(np.array([3.0, 2.0, 1.0, -5.0], dtype=np.float32), SamplingParams(temperature=1.0, top_k=3))
    rng = np.random.default_rng(2)
    for _ in range(200):
        k, token = accept_lossless(d, [3, 0, 0, 1, 2], rng)  # a cut token, a repeat, then the whole kept set
        assert k is not None and token == [3, 0, 0, 1, 2][k] and k != 0 and k != 2
        k, token = accept_lossless(d, [3, 3], rng)  # only cut drafts: a draw from the distribution itself
        assert k is None and token in (0, 1, 2)


# -- lossless tree sampling: the joint law of two emitted tokens ----------------------------------------------------

VOCAB = 16
TABLE = np.random.default_rng(2024).standard_normal((VOCAB, VOCAB, VOCAB)).astype(np.float32) * 1.6
# The fake model: TABLE[a, b] are the logits of the token after ... a, b: a trigram table, so a node's logits
# depend on its parent's token as well as its own, and a verifier that read a sibling's row would be caught.
PREV, ROOT = 3, 7  # the committed token before the root, and the root (pending) token
TREE = build_tree([(0,), (1,), (2,), (3,), (0, 0), (0, 1), (1, 0), (2, 0), (0, 0, 0), (0, 1, 0)])
PARAMS = SamplingParams(temperature=1.0, top_k=8, top_p=0.9)
N_DRAWS = 12_000


def drafts_for(context: tuple[int, int], n: int) -> list[int]:
    """Deterministic drafts for the children of a node (a function of its context only, as a head's are): picked
    from the three likeliest tokens and the least likely one (cut by top_k), so repeats and cut drafts occur."""
    ranked = np.argsort(-TABLE[context], kind="stable")
    picks = [int(ranked[0]), int(ranked[1]), int(ranked[2]), int(ranked[-1])]
    r = random.Random(context[0] * VOCAB + context[1])
    return [picks[r.randrange(4)] for _ in range(n)]


def tree_step(stepper: MedusaStepper, prev: int, root: int) -> list[int]:
    """One Medusa step on the fake model through the decoder's own `_verify`: the accepted drafts and the bonus."""
    tokens, contexts = [root], [(prev, root)]
    children: dict[int, list[int]] = {}
    for i in range(1, TREE.n_nodes):
        children.setdefault(TREE.parents[i], []).append(i)
    for i in range(1, TREE.n_nodes):  # parents come first, siblings in rank order
        parent = TREE.parents[i]
        tokens.append(drafts_for(contexts[parent], len(children[parent]))[TREE.ranks[i]])
        contexts.append((tokens[parent], tokens[i]))
    node, bonus = stepper._verify(TREE, tokens, np.stack([TABLE[c] for c in contexts]))
    path = []
    while node > 0:
        path.append(tokens[node])
        node = TREE.parents[node]
    return path[::-1] + [bonus]


def joint_counts(seed: int) -> tuple[dict[tuple[int, int], int], list[int]]:
    """Counts of the first two tokens over N_DRAWS generations from (PREV, ROOT), and how many accepted drafts
    the first step emitted, by number."""
    stepper = MedusaStepper.__new__(MedusaStepper)  # _verify needs only the parameters and the generator
    stepper.params, stepper.rng = PARAMS, np.random.default_rng(seed)
    counts: dict[tuple[int, int], int] = {}
    accepted = [0] * (TREE.depth + 1)
    for _ in range(N_DRAWS):
        out = tree_step(stepper, PREV, ROOT)
        accepted[len(out) - 1] += 1
        if len(out) == 1:  # only the bonus: the second token is the next step's first
            out += tree_step(stepper, ROOT, out[0])
        key = (out[0], out[1])
        counts[key] = counts.get(key, 0) + 1
    return counts, accepted


def joint_expected() -> dict[tuple[int, int], float]:
    """p(x1 | PREV, ROOT) * p(x2 | ROOT, x1), from the full-sort reference."""
    ids1, p1 = reference(TABLE[PREV, ROOT], PARAMS)
    out = {}
    for x1, q1 in zip(ids1.tolist(), p1.tolist()):
        ids2, p2 = reference(TABLE[ROOT, x1], PARAMS)
        out.update({(x1, x2): q1 * q2 for x2, q2 in zip(ids2.tolist(), p2.tolist())})
    return out


def accept_without_residual(dist: Distribution, drafts, rng):
    """Wrong: accepts draft x with probability p(x), not residual(x) / residual mass."""
    residual = dist.p.copy()
    for k, x in enumerate(drafts):
        i = dist.index(x)
        if i is None or residual[i] <= 0:
            continue
        if rng.random() < dist.p[i]:
            return k, x
        residual[i] = 0.0
    return None, dist.draw(rng, residual)


def accept_without_renormalising(dist: Distribution, drafts, rng):
    """Wrong: the acceptance is right, but after rejecting every draft the token comes from p, not the residual."""
    k, token = accept_lossless(dist, drafts, rng)
    return (k, token) if k is not None else (None, dist.draw(rng))


def test_lossless_tree_sampling_has_the_base_models_joint_distribution():
    counts, accepted = joint_counts(seed=1)
    stat, df = chi_square(counts, joint_expected(), N_DRAWS)
    bound = chi2_quantile(0.999, df)
    assert df >= 20 and all(a > 0.05 * N_DRAWS for a in accepted[:3])  # many cells; 0, 1 and 2 drafts accepted
    assert stat < bound, f"chi-square {stat:.1f} >= {bound:.1f} ({df} degrees of freedom)"


@pytest.mark.parametrize("wrong", [accept_without_residual, accept_without_renormalising])
def test_the_chi_square_bound_catches_a_wrong_acceptance_rule(monkeypatch, wrong):
    monkeypatch.setattr(decoding, "accept_lossless", wrong)  # the name MedusaStepper._verify calls
    counts, _ = joint_counts(seed=1)
    stat, df = chi_square(counts, joint_expected(), N_DRAWS)
    assert stat > chi2_quantile(0.999, df), f"{wrong.__name__}: chi-square {stat:.1f} ({df} degrees of freedom)"
