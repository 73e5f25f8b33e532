"""EAGLE-3 drafting inside the decode loop: an exported eagle3 GGUF runs in a second llama.cpp context linked to the
target (eagle3_gguf.LlamaEagle3) and grows an EAGLE-2-style dynamic tree from its own probabilities.

Index convention (as llama-server drives it, medusa_gguf/eagle3.py): committed tokens x_0..x_t, `pending` = x_{t+1}
(the base model's last choice, the tree's root). The drafter's KV cache (seq 0) holds one entry per committed
position i: (x_{i+1}, g_i = fc(f_i)), f_i the target's three tapped layer inputs at x_i. The entry at t reads
`pending`; its logits guess x_{t+2} (depth 1) and its prenorm state h_t is the g of depth-2 drafting, and so on.
A verified step commits pending and the accepted drafts, whose features the verification call tapped; their
entries are decoded at the next proposal (the drafts' own entries used the drafter's states, not the target's).

The tree (EAGLE-2): the root's top `topk` children; at each further level the `width` most probable frontier nodes
(cumulative log-probability) are decoded in one call, each in its own KV sequence (a copy of its parent's), and
each offers its top `topk` children. Expansion stops at `depth` levels or when no frontier node can still enter
the best `nodes`; the tree is the best `nodes` nodes (the root included), always closed under ancestors since a
child never scores above its parent.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .backend import EXACT_BATCH, Backend, DecodeOutput
from .eagle3_gguf import LlamaEagle3
from .tree import Tree, TreeSchedule, build_tree, by_context, plain

log = logging.getLogger(__name__)
SMALL_CATCH_UP = 16  # entries decoded with outputs in one call; longer catch-ups go in silently first


@dataclass(frozen=True)
class DynamicTreeParams:
    """Shape of the dynamic tree: at most `nodes` nodes (root included) over at most `depth` levels; `width`
    frontier nodes are expanded per level, each offering its `topk` most probable children."""

    nodes: int = 16
    depth: int = 6
    width: int = 4
    topk: int = 4

    def __post_init__(self) -> None:
        for name in ("nodes", "depth", "width", "topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"dynamic tree {name} must be >= 1, got {getattr(self, name)}")
        if self.nodes > EXACT_BATCH:
            raise ValueError(f"dynamic tree of {self.nodes} nodes: a verification call holds at most {EXACT_BATCH}")

    @classmethod
    def like(cls, tree: Tree) -> "DynamicTreeParams | None":
        """The dynamic shape of a calibrated static tree: its nodes and depth, its widest frontier, its deepest rank
        (None for the root-only tree: plain steps)."""
        if tree.depth == 0:
            return None
        return cls(nodes=tree.n_nodes, depth=tree.depth, width=max(frontier_widths(tree), default=1),
                   topk=max(tree.ranks) + 1)

    def describe(self) -> str:
        return f"<= {self.nodes} nodes, depth <= {self.depth}, width {self.width}, top-{self.topk}"


@dataclass(frozen=True)
class DynamicSchedule:
    """Dynamic tree shapes by context length, as tree.TreeSchedule: params[i] below bounds[i], the last beyond;
    None means plain steps there."""

    bounds: tuple[int, ...]
    params: tuple[DynamicTreeParams | None, ...]

    def at(self, context: int) -> DynamicTreeParams | None:
        return by_context(self.bounds, self.params, context)

    @property
    def depth(self) -> int:
        return max((p.depth for p in self.params if p is not None), default=0)

    @property
    def width(self) -> int:
        return max((p.width for p in self.params if p is not None), default=1)

    @classmethod
    def of(cls, params: DynamicTreeParams) -> "DynamicSchedule":
        return cls((), (params,))

    @classmethod
    def like(cls, schedule: TreeSchedule) -> "DynamicSchedule":
        return cls(schedule.bounds, tuple(DynamicTreeParams.like(t) for t in schedule.trees))


def frontier_widths(tree: Tree) -> list[int]:
    """Per level 1..depth-1, how many of its nodes have children: the rows of that level's drafter call."""
    widths = [set() for _ in range(tree.depth)]
    for i in range(1, tree.n_nodes):
        parent = tree.parents[i]
        if parent > 0:
            widths[tree.depths[parent]].add(parent)
    return [len(w) for w in widths[1:]]


def _log_softmax(logits: np.ndarray) -> np.ndarray:  # [n, V] -> [n, V]
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _topk(row: np.ndarray, k: int) -> np.ndarray:  # indices of the k largest, largest first
    k = min(k, len(row))
    idx = np.argpartition(-row, k - 1)[:k]
    return idx[np.argsort(-row[idx], kind="stable")]


class Eagle3Drafting:
    """One drafter per engine (the target Backend's companion): it taps the target's three layers and hands each
    request a session. `schedule` (set before the first request; the calibration measures the drafter first) gives
    the tree shape by context length. Close it before the Backend."""

    def __init__(self, backend: Backend, path: Path, schedule: DynamicSchedule | None = None, *,
                 max_width: int = 8) -> None:
        self.backend, self.path = backend, Path(path)
        self.max_width = max(max_width, schedule.width if schedule else 1)
        self.schedule = schedule
        # cells: the committed text (at most the target's window) plus the drafts of one proposal
        self.runtime = LlamaEagle3(path, backend, n_ctx=backend.n_ctx + 2 * EXACT_BATCH,
                                   n_seq_max=1 + 2 * self.max_width)
        backend.tap_layers(self.runtime.target_layers)

    @property
    def depth(self) -> int:
        return self.schedule.depth if self.schedule is not None else 0

    def session(self, prompt_tokens: Sequence[int], prefill: DecodeOutput) -> "Eagle3Session":
        if self.schedule is None:
            raise RuntimeError("Eagle3Drafting needs a schedule before its first request")
        return Eagle3Session(self, prompt_tokens, prefill)

    def measure_costs(self, *, context: int = 128, repeats: int = 7, flush_mb: int = 64) -> dict[int, float]:
        """Median milliseconds of the drafter's calls, as a step makes them: {0: a catch-up (encode and decode two
        entries), w: one level's call over w frontier rows, for w = 1..max_width}. In the loop every drafter call
        follows a target decode that evicts its weights from the caches, so each timed call follows a read of
        `flush_mb` MB. Leaves the drafter's cache empty."""
        rt, rng = self.runtime, np.random.default_rng(0)
        flush = np.ones(flush_mb * 2**20 // 8)
        feats = rng.standard_normal((context + 2, rt.n_embd_enc)).astype(np.float32)
        tokens = rng.integers(0, rt.n_vocab, context + 2).tolist()

        def timed(fn) -> float:
            fn()  # first-call work
            times = []
            for _ in range(repeats):
                flush.sum()
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return float(np.median(times) * 1e3)

        rt.clear()
        rt.decode(tokens[:context], rt.encode(feats[:context]), range(context), outputs=[False] * context)
        pre = np.zeros((self.max_width, rt.n_embd), np.float32)

        def catch_up() -> None:
            rt.seq_rm(0, context)
            rt.decode(tokens[context:], rt.encode(feats[context:]), [context, context + 1], outputs=[False, True])

        def level(w: int):
            def run() -> None:
                for s in range(1, w + 1):
                    rt.seq_rm(s)
                    rt.seq_cp(0, s)
                rt.decode(tokens[:w], pre[:w], [context + 2] * w, seq_ids=list(range(1, w + 1)))
                for s in range(1, w + 1):
                    rt.seq_rm(s)
            return run

        ms = {0: timed(catch_up)}
        ms.update({w: timed(level(w)) for w in range(1, self.max_width + 1)})
        rt.clear()
        log.info("EAGLE-3 drafter call costs (ms): catch-up %.2f; one level by frontier width %s", ms[0],
                 ", ".join(f"{w}: {ms[w]:.2f}" for w in range(1, self.max_width + 1)))
        return ms

    def close(self) -> None:
        self.runtime.close()


class Eagle3Session:
    """One request's drafting state (decoding.DraftSession)."""

    def __init__(self, drafting: Eagle3Drafting, prompt_tokens: Sequence[int], prefill: DecodeOutput) -> None:
        if prefill.features is None or len(prefill.features) != len(prompt_tokens):
            raise ValueError("the prefill carries no layer features for every prompt token; the Backend's layer "
                             "taps must be on (Eagle3Drafting turns them on)")
        self.rt, self.schedule, self.depth = drafting.runtime, drafting.schedule, drafting.depth
        self.rt.clear()
        self.tokens = list(prompt_tokens)  # committed x_0..x_t
        self.fed = 0  # entries 0..fed-1 are in the drafter's seq 0
        self.unfed = [prefill.features]  # feature rows of positions fed..t, in order

    # -- DraftSession --------------------------------------------------------------------------------------

    def propose(self, pending: int, context: int, max_depth: int, load: int = 1) -> tuple[Tree, list[int]]:
        if context != len(self.tokens):
            raise RuntimeError(f"the drafter follows {len(self.tokens)} committed tokens, the target holds {context}")
        params = self.schedule.at(context)
        depth = min(params.depth, max_depth) if params is not None else 0
        if depth <= 0:
            return plain(), [pending]
        root_logits, h_root = self._catch_up(pending)
        return self._grow(pending, root_logits, h_root, params, depth)

    def accept(self, tree: Tree, tokens: list[int], node: int, out: DecodeOutput) -> None:
        path = [node]
        while path[-1] > 0:
            path.append(tree.parents[path[-1]])
        path.reverse()  # root (pending) .. node
        self.tokens.extend(tokens[i] for i in path)
        self.unfed.append(out.features[path])

    # -- the two phases --------------------------------------------------------------------------------------

    def _catch_up(self, pending: int) -> tuple[np.ndarray, np.ndarray]:
        """Decode the entries of the positions committed since the last proposal into seq 0; return the last
        one's (logits over the draft vocabulary [V_d], prenorm [w])."""
        feats = np.concatenate(self.unfed) if len(self.unfed) > 1 else self.unfed[0]
        t = len(self.tokens) - 1
        assert len(feats) == t + 1 - self.fed, (len(feats), t, self.fed)
        nxt = self.tokens[self.fed + 1 :] + [pending]  # x_{i+1} for i = fed..t
        g = self.rt.encode(feats)
        # llama.cpp copies out every row up to the last output (LlamaEagle3.decode): a long catch-up (a prompt) goes
        # in silently, its last entry alone; a step's few entries in one call
        n, bulk = len(feats), (len(feats) - 1 if len(feats) > SMALL_CATCH_UP else 0)
        for a in range(0, bulk, self.rt.n_batch):
            b = min(a + self.rt.n_batch, bulk)
            self.rt.decode(nxt[a:b], g[a:b], range(self.fed + a, self.fed + b), outputs=[False] * (b - a))
        logits, pre = self.rt.decode(nxt[bulk:], g[bulk:], range(self.fed + bulk, self.fed + n),
                                     outputs=[i == n - 1 for i in range(bulk, n)])
        self.fed = t + 1
        self.unfed = []
        return logits[0], pre[0]

    def _grow(self, pending: int, root_logits: np.ndarray, h_root: np.ndarray, p: DynamicTreeParams,
              depth: int) -> tuple[Tree, list[int]]:
        rt = self.rt
        t = len(self.tokens) - 1
        # node arrays: draft id, parent node, depth, cumulative log-probability; node 0 is the root
        ids, parents, depths, scores = [-1], [-1], [0], [0.0]

        def offer(parent: int, logp: np.ndarray) -> list[int]:
            born = []
            for j in _topk(logp, p.topk):
                ids.append(int(j)); parents.append(parent); depths.append(depths[parent] + 1)
                scores.append(scores[parent] + float(logp[j]))
                born.append(len(ids) - 1)
            return born

        children = offer(0, _log_softmax(root_logits[None])[0])
        slot_of = {0: 0}  # node -> KV sequence holding its path (the root's: the committed text)
        state = {0: h_root}  # node -> prenorm state its children's entries read
        banks = (list(range(1, 1 + p.width)), list(range(1 + p.width, 1 + 2 * p.width)))
        for level in range(1, depth):
            frontier = sorted(children, key=lambda n: -scores[n])[: p.width]
            if len(scores) >= p.nodes:  # prune: a frontier below the current best `nodes` cannot get in
                cutoff = sorted(scores, reverse=True)[p.nodes - 1]
                frontier = [n for n in frontier if scores[n] > cutoff]
            if not frontier:
                break
            bank = banks[level % 2]
            for s in bank:
                rt.seq_rm(s)
            for f, s in zip(frontier, bank):
                rt.seq_cp(slot_of[parents[f]], s)
                slot_of[f] = s
            logits, pre = rt.decode([int(rt.d2t[ids[f]]) for f in frontier],
                                    np.stack([state[parents[f]] for f in frontier]),
                                    [t + level] * len(frontier), seq_ids=[slot_of[f] for f in frontier])
            logp = _log_softmax(logits)
            children = []
            for i, f in enumerate(frontier):
                state[f] = pre[i]
                children += offer(f, logp[i])
        for s in banks[0] + banks[1]:
            rt.seq_rm(s)
        return self._select(pending, ids, parents, depths, scores, p.nodes)

    def _select(self, pending: int, ids: list[int], parents: list[int], depths: list[int], scores: list[float],
                nodes: int) -> tuple[Tree, list[int]]:
        """The best `nodes` nodes as a Tree (ranks: order among kept siblings by score) and their target ids."""
        keep = sorted(range(1, len(ids)), key=lambda n: (-scores[n], depths[n]))[: nodes - 1]
        kept = set(keep)
        rank_of, taken = {}, {}
        for n in keep:  # best first, so a node's rank is its place among its kept siblings
            assert parents[n] == 0 or parents[n] in kept
            rank_of[n] = taken.get(parents[n], 0)
            taken[parents[n]] = rank_of[n] + 1
        choice = {0: ()}
        for n in sorted(keep, key=lambda n: depths[n]):
            choice[n] = choice[parents[n]] + (rank_of[n],)
        tree = build_tree(choice[n] for n in keep)
        index = {c: i + 1 for i, c in enumerate(tree.choices)}
        tokens = [pending] + [0] * len(keep)
        for n in keep:
            tokens[index[choice[n]]] = int(self.rt.d2t[ids[n]])
        return tree, tokens
