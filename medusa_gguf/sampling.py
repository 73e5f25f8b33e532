"""Sampling and Medusa draft acceptance on numpy arrays, with no full sort of the vocabulary in the common cases.

`distribution` turns logits into the sampling distribution after temperature, top-k and top-p; `sample` draws one
token from it; `accept_lossless` and `accept_typical` decide which of a tree node's drafted children the base model
accepts. The decoder (`decoding.MedusaStepper._verify`) calls exactly these; `tests/test_sampling.py` checks them
against full-sort references and checks lossless tree sampling with a chi-square test.

Ties between equal logits go to the lower token id, as in a stable sort of the logits, most likely first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # decoding imports this module; the type is only needed for hints
    from .decoding import SamplingParams

FIRST_CANDIDATES = 64  # top-p looks for its cut among this many likeliest tokens first, then 8x as many, ...
TOP_P_SLACK = 1e-9  # a prefix whose mass is within this of top_p reaches it: float noise never decides the cut
_BLOCK = 256  # inverse-CDF draws sum blocks of this size first, then run a cumsum inside one block


@dataclass(frozen=True)
class Distribution:
    """A sampling distribution over the vocabulary: p[i] is the probability of token ids[i].

    When nothing is cut (no top-k, no top-p) `ids` is None and p is dense, indexed by token id; otherwise `ids`
    holds the kept tokens in ascending id order (not by probability) and p is aligned with it.
    """

    p: np.ndarray  # [n] float64, sums to 1
    ids: np.ndarray | None = None  # [n] int64 ascending token ids; None: every token, p[t] is token t's

    def index(self, token: int) -> int | None:
        """Position of `token` in p, or None when it was cut."""
        if self.ids is None:
            return token
        i = int(np.searchsorted(self.ids, token))
        return i if i < len(self.ids) and self.ids[i] == token else None

    def prob(self, token: int) -> float:
        i = self.index(token)
        return 0.0 if i is None else float(self.p[i])

    def draw(self, rng: np.random.Generator, weights: np.ndarray | None = None) -> int:
        """A token drawn from p, or from `weights` ([n] >= 0, aligned with p, not necessarily normalised)."""
        i = _draw(self.p if weights is None else weights, rng)
        return i if self.ids is None else int(self.ids[i])


def distribution(logits: np.ndarray, params: SamplingParams) -> Distribution:
    """The distribution after temperature, then top-k (the k most likely), then top-p (the smallest most-likely-first
    set of the top-k distribution whose mass reaches top_p; at least one token). logits: [n_vocab]; temperature > 0.

    Ranking uses the raw logits (or their weights): dividing by a positive temperature keeps their order.
    """
    x, ids = logits, None  # x: the logits of the tokens still in, ids: those tokens (None: all of them)
    if 0 < params.top_k < len(logits):
        ids = _top(logits, params.top_k)
        x = logits[ids]
    w = _weights(x, params.temperature)
    if params.top_p < 1:
        keep = _nucleus(x, w, params.top_p)
        ids, w = (keep if ids is None else ids[keep]), w[keep]
    w /= w.sum()
    return Distribution(w, ids)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token from logits [n_vocab]: the argmax when greedy, else a draw from `distribution`."""
    if params.temperature == 0:
        return int(np.argmax(logits))
    return distribution(logits, params).draw(rng)


def probabilities(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, probabilities) of `distribution`, most likely first. It sorts the kept set, the whole vocabulary
    when nothing is cut: for callers that want the ranking; the decoder itself never needs it."""
    d = distribution(logits, params)
    ids = np.arange(len(d.p)) if d.ids is None else d.ids
    order = np.argsort(-d.p, kind="stable")  # ids ascend, so equal probabilities keep the lower id first
    return ids[order], d.p[order]


def accept_lossless(dist: Distribution, drafts: Sequence[int], rng: np.random.Generator) -> tuple[int | None, int]:
    """Speculative sampling over one node's drafted children: (index of the accepted draft or None, emitted token).

    Drafts are tried in order; draft x is accepted with probability residual(x) / residual mass, and a rejected x
    leaves the residual (its probability set to 0). Cut tokens and repeats of a rejected draft are skipped. When
    every draft is rejected the token is drawn from the renormalised residual. Whatever the drafts, the emitted
    token has exactly the distribution `dist`, so tree sampling is lossless.
    """
    residual = None  # dist.p until the first rejection, then a copy with the rejected drafts zeroed
    total = 1.0  # the residual's mass
    for k, x in enumerate(drafts):
        i = dist.index(x)
        if i is None:
            continue
        q = float(dist.p[i] if residual is None else residual[i])
        if q <= 0:
            continue
        if q >= total or rng.random() * total < q:  # q >= total: the last token with mass left (float noise aside)
            return k, x
        if residual is None:
            residual = dist.p.copy()
        residual[i] = 0.0
        total -= q
    return None, dist.draw(rng, residual)


def accept_typical(dist: Distribution, drafts: Sequence[int], params: SamplingParams) -> int | None:
    """Medusa's typical acceptance (not lossless): the index of the first draft whose probability clears
    min(typical_epsilon, typical_alpha * exp(-entropy)), or None."""
    logp = np.clip(dist.p, 1e-12, None)
    np.log(logp, out=logp)
    entropy = -float(np.dot(dist.p, logp))
    threshold = min(params.typical_epsilon, params.typical_alpha * np.exp(-entropy))
    return next((k for k, x in enumerate(drafts) if dist.prob(x) > threshold), None)


def _weights(logits: np.ndarray, temperature: float) -> np.ndarray:
    """exp((logits - max) / temperature) as a fresh float64 array; in place, so one buffer is allocated."""
    w = logits.astype(np.float64)
    w -= w.max()
    w /= temperature
    return np.exp(w, out=w)


def _top(x: np.ndarray, k: int) -> np.ndarray:
    """Ascending indices of the k largest entries of x [n] (ties to the lower index): no sort, one partition."""
    n = len(x)
    return np.arange(n) if k >= n else _at_least(x, np.partition(x, n - k)[n - k], k)


def _at_least(x: np.ndarray, kth: float, k: int) -> np.ndarray:
    """Ascending indices of the k largest entries of x, given kth, the k-th largest value: every entry above it and
    the lowest-index entries equal to it."""
    keep = x > kth
    ties = np.flatnonzero(x == kth)[: k - int(np.count_nonzero(keep))]
    keep[ties] = True
    return np.flatnonzero(keep)


def _nucleus(x: np.ndarray, w: np.ndarray, top_p: float) -> np.ndarray:
    """Ascending indices of the smallest set of the largest entries of w [n] (weights >= 0, in the order of x, the
    logits they came from) whose share of the total reaches top_p; at least one.

    The cut is looked for among the FIRST_CANDIDATES likeliest tokens, then 8x as many, and so on: each round
    partitions a copy of x in place and sorts only the candidates' weights; the whole vector is sorted only when
    the cut lies beyond the last count below n (32,768 of a 49k vocabulary).
    """
    n, total = len(w), float(w.sum())
    scratch = x.copy()  # the logits, not the float64 weights: half the bytes where x is float32
    m = min(FIRST_CANDIDATES, n)
    while True:
        if m < n:
            scratch.partition(n - m)
        candidates = _at_least(x, scratch[n - m], m) if m < n else slice(None)
        top = np.sort(w[candidates])[::-1]
        cdf = np.cumsum(top) / total
        if m == n or cdf[-1] >= top_p - TOP_P_SLACK:
            keep = min(int(np.searchsorted(cdf, top_p - TOP_P_SLACK)) + 1, m)
            return _at_least(w, top[keep - 1], keep)
        m = min(8 * m, n)


def _draw(w: np.ndarray, rng: np.random.Generator) -> int:
    """An index i drawn with probability w[i] / sum(w) (w [n] >= 0, some > 0) by inverse CDF with one uniform.

    Two levels: the CDF over block sums, then a cumsum inside the chosen block, since numpy's cumsum costs about 20x
    its sum per element and a cumsum over a 49k vocabulary would dominate a sampling step.
    """
    u = rng.random()
    if len(w) <= 4 * _BLOCK:
        return _search(np.cumsum(w), u)
    block_cdf = np.cumsum(np.add.reduceat(w, np.arange(0, len(w), _BLOCK)))
    b = _search(block_cdf, u)
    inside = np.cumsum(w[b * _BLOCK : (b + 1) * _BLOCK])
    low = block_cdf[b - 1] if b else 0.0
    u_inside = (u * block_cdf[-1] - low) / (block_cdf[b] - low)  # where u falls inside block b, in [0, 1)
    return b * _BLOCK + _search(inside, min(max(u_inside, 0.0), 1.0))


def _search(cdf: np.ndarray, u: float) -> int:
    """The index whose CDF step contains u * cdf[-1] (u in [0, 1]); never an entry of zero mass."""
    i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    if i < len(cdf):
        return i
    return int(np.flatnonzero(np.diff(cdf, prepend=0.0) > 0)[-1])  # u * total rounded up to the total
