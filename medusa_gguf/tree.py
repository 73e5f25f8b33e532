"""The Medusa candidate tree as plain data, and the choice of tree from head accuracies and a cost curve.

Conventions:
- Medusa head k (k = 1..K) predicts the token k positions after the tree root.
- The tree root (node 0) is the token the base model itself just produced: it is already certain.
  A node at depth d >= 1 holds a candidate from head d.
- A tree is given as "choices", Medusa-style: a list of tuples of top-k ranks. Choice (a, b) is the node whose
  parent is node (a,) and whose token is head 2's rank-b candidate. Every prefix of a choice is also a choice.
- Nodes are numbered root first, then choices sorted by (depth, ranks): a parent always comes before its
  children, and siblings are ordered by rank.

Nothing here needs a model; `tests/test_tree.py` covers it.
"""
from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

Choice = tuple[int, ...]


@dataclass(frozen=True)
class Tree:
    choices: tuple[Choice, ...]  # non-root nodes, sorted by (depth, ranks); node i >= 1 is choices[i - 1]
    parents: tuple[int, ...]  # [n_nodes]; -1 for the root, else an earlier node index
    depths: tuple[int, ...]  # [n_nodes]; 0 for the root
    ranks: tuple[int, ...]  # [n_nodes]; rank of the node's candidate in its head's top-k; 0 for the root

    @property
    def n_nodes(self) -> int:
        return len(self.parents)

    @property
    def depth(self) -> int:
        return max(self.depths)

    @property
    def max_rank_per_depth(self) -> tuple[int, ...]:
        """How many top-k candidates head d needs, for d = 1..depth (entry d - 1)."""
        need = [0] * self.depth
        for d, r in zip(self.depths[1:], self.ranks[1:]):
            need[d - 1] = max(need[d - 1], r + 1)
        return tuple(need)


@dataclass(frozen=True)
class TreeSchedule:
    """The tree to draft by context length, since a step's cost grows with the context: trees[i] serves contexts
    below bounds[i], the last tree every longer one. A root-only tree in it means plain steps there.

    `loaded`: (n, schedule) pairs, ascending n: the schedule to use while at least n requests share each decode
    call (batching.py), where a tree's tokens cost the marginal price of a bigger batch."""

    bounds: tuple[int, ...]
    trees: tuple[Tree, ...]
    loaded: tuple[tuple[int, "TreeSchedule"], ...] = ()

    def __post_init__(self) -> None:
        if len(self.trees) != len(self.bounds) + 1 or list(self.bounds) != sorted(self.bounds):
            raise ValueError(f"a schedule needs one more tree than its sorted bounds, got {len(self.trees)} trees "
                             f"and bounds {self.bounds}")

    def tree_at(self, context: int, load: int = 1) -> Tree:
        schedule = self
        for n, s in self.loaded:
            if load >= n:
                schedule = s
        return by_context(schedule.bounds, schedule.trees, context)

    @property
    def depth(self) -> int:
        return max([t.depth for t in self.trees] + [s.depth for _, s in self.loaded])


def by_context(bounds: Sequence[int], items: Sequence, context: int):
    """items[i] for contexts below bounds[i] (sorted), the last item for every longer one."""
    for bound, item in zip(bounds, items):
        if context < bound:
            return item
    return items[-1]


def _as_choice(raw: object) -> Choice:
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Iterable):
        raise ValueError(f"tree choice {raw!r} is not a sequence of ranks")
    ranks = tuple(raw)
    if not ranks:
        raise ValueError("tree choice () is empty; the root is implicit and must not be listed")
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
            raise ValueError(f"tree choice {ranks!r} holds {r!r}; ranks are non-negative integers")
    return tuple(int(r) for r in ranks)


def build_tree(choices: Iterable[Sequence[int]]) -> Tree:
    """Validate Medusa choices (every prefix present, no duplicates) and number the nodes."""
    cs = [_as_choice(c) for c in choices]
    seen = set()
    for c in cs:
        if c in seen:
            raise ValueError(f"tree choice {c} is listed twice")
        seen.add(c)
    for c in cs:
        for n in range(1, len(c)):
            if c[:n] not in seen:
                raise ValueError(f"tree choice {c} lacks its prefix {c[:n]}; every prefix of a choice must be a choice")
    ordered = sorted(cs, key=lambda c: (len(c), c))
    index = {c: i + 1 for i, c in enumerate(ordered)}
    parents = [-1] + [index[c[:-1]] if len(c) > 1 else 0 for c in ordered]
    return Tree(
        choices=tuple(ordered),
        parents=tuple(parents),
        depths=(0,) + tuple(len(c) for c in ordered),
        ranks=(0,) + tuple(c[-1] for c in ordered),
    )


def chain(depth: int) -> Tree:
    """Top-1 candidate of each of the first `depth` heads: choices (0,), (0, 0), ..."""
    if depth < 0:
        raise ValueError(f"chain depth must be >= 0, got {depth}")
    return build_tree((0,) * d for d in range(1, depth + 1))


def plain() -> Tree:
    """The root alone: plain decoding, one token per step."""
    return build_tree([])


# A small sparse tree for a CPU, where every extra node costs nearly its own decode time: 10 nodes, depth 4.
DEFAULT_CHOICES: tuple[Choice, ...] = (
    (0,), (1,), (2,),
    (0, 0), (0, 1), (1, 0),
    (0, 0, 0), (0, 0, 1),
    (0, 0, 0, 0),
)

# A wide tree for flat cost curves (GPU, or models bigger than the CPU cache): 41 nodes, depth 4.
WIDE_CHOICES: tuple[Choice, ...] = (
    (0,), (1,), (2,), (3,), (4,), (5,), (6,), (7,),
    (0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5),
    (1, 0), (1, 1), (1, 2), (1, 3),
    (2, 0), (2, 1), (2, 2),
    (3, 0), (3, 1),
    (4, 0), (5, 0),
    (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3),
    (0, 1, 0), (0, 1, 1), (0, 2, 0),
    (1, 0, 0), (1, 0, 1), (1, 1, 0),
    (2, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 1, 0, 0),
)


def load_choices(path: str | Path) -> Tree:
    """Read a tree from a JSON file holding a list of lists of ints, e.g. [[0], [1], [0, 0]]."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"tree choices file {path} does not exist") from None
    except OSError as exc:
        raise ValueError(f"tree choices file {path} cannot be read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"tree choices file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, list) or not all(
        isinstance(c, list) and all(isinstance(r, int) and not isinstance(r, bool) for r in c) for c in data
    ):
        raise ValueError(f"tree choices file {path} must hold a list of lists of ints, e.g. [[0], [1], [0, 0]]")
    try:
        return build_tree(data)
    except ValueError as exc:
        raise ValueError(f"tree choices file {path}: {exc}") from None


def save_choices(tree: Tree, path: str | Path) -> None:
    """Write the tree's choices as JSON, one choice per line; `load_choices` reads it back."""
    lines = ",\n".join("  " + json.dumps(list(c)) for c in tree.choices)
    Path(path).write_text(f"[\n{lines}\n]\n" if lines else "[]\n")


def node_tokens(tree: Tree, root_token: int, topk_ids: np.ndarray | Sequence[Sequence[int]]) -> list[int]:
    """The token of every node, root first, from each head's ranked candidates."""
    ids = np.asarray(topk_ids)  # [K_heads, k]
    if ids.ndim != 2:
        raise ValueError(f"topk_ids must be [heads, k], got shape {ids.shape}")
    n_heads, k = ids.shape
    if tree.depth > n_heads:
        raise ValueError(f"the tree has depth {tree.depth} but topk_ids holds only {n_heads} heads")
    for d, need in enumerate(tree.max_rank_per_depth, start=1):
        if need > k:
            raise ValueError(f"the tree needs head {d}'s top-{need} but topk_ids holds only top-{k}")
    return [int(root_token)] + [int(ids[d - 1, r]) for d, r in zip(tree.depths[1:], tree.ranks[1:])]


def _check_accuracy(accuracy: Sequence[Sequence[float]]) -> None:
    for d, row in enumerate(accuracy, start=1):
        for r, p in enumerate(row):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"accuracy[{d - 1}][{r}] = {p} (head {d}, rank {r}) is not a probability")


def path_probabilities(tree: Tree, accuracy: Sequence[Sequence[float]]) -> list[float]:
    """P(every token on the root-to-node path is correct) for each node, under Medusa's independence assumption."""
    _check_accuracy(accuracy)
    if tree.depth > len(accuracy):
        raise ValueError(f"the tree has depth {tree.depth} but accuracy covers only {len(accuracy)} heads")
    prob = [1.0] * tree.n_nodes
    for i in range(1, tree.n_nodes):
        d, r = tree.depths[i], tree.ranks[i]
        if r >= len(accuracy[d - 1]):
            n_ranks = len(accuracy[d - 1])
            raise ValueError(f"the tree uses head {d}'s rank {r} but accuracy[{d - 1}] covers only {n_ranks} ranks")
        prob[i] = prob[tree.parents[i]] * accuracy[d - 1][r]
    return prob


def expected_tokens_per_step(tree: Tree, accuracy: Sequence[Sequence[float]]) -> float:
    """1 (the base model's own token) + the sum of every non-root node's path probability.

    accuracy[d-1][r] is the probability that head d's rank-r candidate is the correct token (not cumulative),
    given the earlier tokens were right.
    """
    return 1.0 + sum(path_probabilities(tree, accuracy)[1:])


def interpolate_cost(curve_ms: dict[int, float], n: int) -> float:
    """Milliseconds of one decode call with n tokens, piecewise-linear on a measured curve (n -> ms).

    Beyond the largest measured size, extrapolates from the last two points; never below the n=1 cost.
    """
    if 1 not in curve_ms or len(curve_ms) < 2:
        raise ValueError(f"a cost curve needs n=1 and at least one other size, got sizes {sorted(curve_ms)}")
    if n < 1:
        raise ValueError(f"a decode call holds at least 1 token, got n={n}")
    xs = sorted(curve_ms)
    if n in curve_ms:
        cost = curve_ms[n]
    else:
        hi = next((i for i, x in enumerate(xs) if x > n), len(xs) - 1)  # right end of the segment used
        (x0, y0), (x1, y1) = (xs[hi - 1], curve_ms[xs[hi - 1]]), (xs[hi], curve_ms[xs[hi]])
        cost = y0 + (y1 - y0) * (n - x0) / (x1 - x0)
    return max(cost, curve_ms[1])


@dataclass(frozen=True)
class Calibration:
    tree: Tree
    expected_tokens_per_step: float
    predicted_speedup: float  # tokens per second relative to plain decoding; 1.0 for plain
    step_cost_ms: float
    reason: str  # one line, for logs and the benchmark
    table: list[tuple[int, float, float, float]]  # (n_nodes, expected_tokens, cost_ms, predicted_speedup) per size

    @property
    def break_even_tokens(self) -> float:
        """Tokens per step the tree must average to match plain decoding: its step cost in plain steps."""
        return self.expected_tokens_per_step / self.predicted_speedup


def greedy_trees(accuracy: Sequence[Sequence[float]], max_depth: int, max_nodes: int) -> Iterable[Tree]:
    """Trees of 1, 2, ... max_nodes nodes, each adding the frontier node of highest path probability.

    This is Medusa's "optimal sparse tree" construction: a child's path probability never exceeds its
    parent's, so the tree stays prefix-closed. Stops early when no frontier node is left.
    """
    _check_accuracy(accuracy)
    max_depth = min(max_depth, len(accuracy))
    chosen: list[Choice] = []
    frontier: list[tuple[float, tuple[int, ...]]] = []  # heap of (-path probability, (depth, *ranks)): ties go shallow

    def push_children(parent: Choice, p: float) -> None:
        d = len(parent) + 1
        if d <= max_depth:
            for r, acc in enumerate(accuracy[d - 1]):
                heapq.heappush(frontier, (-p * acc, (d,) + parent + (r,)))

    push_children((), 1.0)
    yield plain()
    while len(chosen) + 1 < max_nodes and frontier:
        neg_p, key = heapq.heappop(frontier)
        choice = key[1:]
        chosen.append(choice)
        push_children(choice, -neg_p)
        yield build_tree(chosen)


def n_leaves(tree: Tree) -> int:
    return tree.n_nodes - len(set(p for p in tree.parents if p >= 0))


def calibrate_tree(
    accuracy: Sequence[Sequence[float]],
    curve_ms: dict[int, float] | Callable[[Tree], float],
    *,
    max_depth: int,
    max_nodes: int = 63,
    head_cost_ms: float | Sequence[float] = 0.0,
    margin: float = 1.02,
) -> Calibration:
    """The tree that maximises expected tokens per second on this machine, or `plain()` if none beats it by `margin`.

    `curve_ms` is either a cost curve (n tokens -> ms of one decode call) or the measured cost model itself: a
    function giving the milliseconds of a whole step with a given tree, drafting included, and of a plain step for
    the root-only tree (`costs.StepCosts` plus the heads' measured drafting cost; `head_cost_ms` is then unused).
    With a curve, a Medusa step costs interpolate_cost(curve, n_nodes) + the heads' cost; a plain step costs
    interpolate_cost(curve, 1) and yields one token. The root-only tree runs no heads, so it is plain decoding
    (table row n_nodes=1). `head_cost_ms` is one number, or one per tree depth (entry d - 1 for depth d:
    dependent heads run once per level).
    """
    if callable(curve_ms):
        step_ms = curve_ms
    else:
        step_ms = _curve_step_cost(curve_ms, head_cost_ms, min(max_depth, len(accuracy)))
    if max_nodes < 1:
        raise ValueError(f"max_nodes must be >= 1, got {max_nodes}")
    plain_ms = step_ms(plain())
    best: tuple[float, Tree, float, float] | None = None  # (speedup, tree, expected tokens, cost)
    table = []
    for tree in greedy_trees(accuracy, max_depth, max_nodes):
        expected = expected_tokens_per_step(tree, accuracy)
        cost = plain_ms if tree.n_nodes == 1 else step_ms(tree)
        speedup = expected * plain_ms / cost
        table.append((tree.n_nodes, expected, cost, speedup))
        if tree.n_nodes > 1 and (best is None or speedup > best[0]):
            best = (speedup, tree, expected, cost)
    return _calibration(best, plain_ms, margin, table)


def _curve_step_cost(curve_ms: dict[int, float], head_cost_ms: float | Sequence[float], depth: int) -> Callable[[Tree], float]:
    costs = [float(head_cost_ms)] * depth if isinstance(head_cost_ms, (int, float)) else list(head_cost_ms)
    if len(costs) < depth:
        raise ValueError(f"head_cost_ms covers {len(costs)} depths; the tree may be {depth} deep")

    def step_ms(tree: Tree) -> float:
        if tree.n_nodes == 1:
            return interpolate_cost(curve_ms, 1)
        return interpolate_cost(curve_ms, tree.n_nodes) + costs[tree.depth - 1]

    return step_ms


def _calibration(best, plain_ms: float, margin: float, table: list) -> Calibration:
    if best is None:
        reason = "no tree to try (max_depth is 0 or there are no head accuracies): plain decoding"
    elif best[0] < margin:
        reason = (
            f"no tree beats plain decoding by the {margin:.2f}x margin on this cost curve "
            f"(best: {best[1].n_nodes} nodes, {best[0]:.2f}x)"
        )
    else:
        speedup, tree, expected, cost = best
        reason = (
            f"best tree: {tree.n_nodes} nodes, depth {tree.depth}, {expected:.2f} tokens/step "
            f"at {cost / plain_ms:.2f}x the cost of one plain step: predicted {speedup:.2f}x"
        )
        return Calibration(tree, expected, speedup, cost, reason, table)
    return Calibration(plain(), 1.0, 1.0, plain_ms, reason, table)
