"""Is tree decoding on THIS machine bit-identical to plain decoding? Measured once at start, in a fraction of a second.

The project claims that Medusa's greedy output equals plain greedy decoding. That holds only where llama.cpp's
outputs do not depend on the batch (docs/DESIGN.md, "Exactness"): true for the Q4_1 default on the CPU with flash
attention on, not for an F16 copy, and unknown for other weight types and backends. `check_exactness` decodes a
small tree after a short prompt and again after a long one, commits a path that leaves discarded siblings behind
(the trash-sequence case), appends one token, and compares every output row with the same tokens decoded one at a
time. The long prompt (LONG_CONTEXT tokens, a KV view of 512 cells) is where llama.cpp's CPU attention has a
separate single-token path (backend.resolve_kv_type): a short check alone missed that it differs with f16 caches.

    report = check_exactness(backend)
    log.info(report.summary)

It uses only the backend's public API (prefill, decode_tree, commit, append, rollback, reset) and resets the
backend when it is done: run it before any text is committed.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .tree import Tree, build_tree

if TYPE_CHECKING:
    from .backend import Backend

# 8 nodes, depth 3, siblings at depths 1 and 2. Node numbering (tree.py): 0 root, 1 (0,), 2 (1,), 3 (0,0),
# 4 (0,1), 5 (1,0), 6 (0,0,0), 7 (1,0,0). Committing node 7 (path 0-2-5-7) discards nodes 1, 3, 4 and 6, whose
# cells lie before kept ones: they go to the trash sequence, the case of the flash-attention trap.
CHECK_CHOICES = ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (1, 0, 0))
CHECK_TEXT = "The sky is blue because"
CHECK_SEED = 0
LONG_CONTEXT = 300  # > 256 cells: llama.cpp pads the KV view to 256, so this one is 512 cells


@dataclass(frozen=True)
class ExactnessReport:
    """What `check_exactness` measured; `to_dict()` for the engine's stats."""

    exact: bool  # every compared row bit-identical (logits and hidden states)
    max_abs_logit_diff: float  # over every tree node and the token appended after the commit
    max_abs_hidden_diff: float
    argmax_agreement: float  # share of tree nodes whose argmax equals the sequential one
    n_nodes: int  # tree nodes compared per context (one more row is compared after the commit)
    seconds: float
    worst_row: str  # the row that differs most (logits first, then hidden): "node 3", "after commit"; "" when exact
    contexts: tuple[int, ...] = ()  # prompt lengths checked

    @property
    def summary(self) -> str:
        """One line for the log and the stats."""
        if self.exact:
            return (f"exactness: tree decoding is bit-identical to plain decoding ({self.n_nodes} nodes and a commit "
                    f"{self._where}, {self.seconds * 1000:.0f} ms): greedy output equals plain decoding")
        return (f"exactness: tree decoding is NOT bit-identical to plain decoding: max logit diff "
                f"{self.max_abs_logit_diff:.3g} ({self.worst_row}), hidden {self.max_abs_hidden_diff:.3g}, "
                f"argmax agrees on {self.argmax_agreement:.0%} of {self.n_nodes} nodes {self._where} "
                f"({self.seconds * 1000:.0f} ms): greedy output may differ from plain decoding; measure the match rate")

    @property
    def _where(self) -> str:
        if not self.contexts:
            return ""
        return "at " + " and ".join(str(c) for c in self.contexts) + " tokens of context"

    def to_dict(self) -> dict:
        return {**asdict(self), "contexts": list(self.contexts), "summary": self.summary}


def check_exactness(
    backend: Backend,
    prompt_tokens: Sequence[int] | None = None,
    *,
    tree: Tree | None = None,
    commit_node: int | None = None,
    seed: int = CHECK_SEED,
    long_context: int = LONG_CONTEXT,
) -> ExactnessReport:
    """Compare a decoded tree (and a commit inside it) with token-by-token decoding; the backend ends reset.

    Without `prompt_tokens` it checks after a short prompt and after one of `long_context` tokens (where n_ctx
    allows; 0 skips it); with them, after those only. `tree` defaults to CHECK_CHOICES and `commit_node` to its
    last node; node tokens are drawn from the vocabulary with `seed`, so every run checks the same tokens.
    Destroys any committed text.
    """
    t0 = time.perf_counter()
    tree = tree or build_tree(CHECK_CHOICES)
    node = tree.n_nodes - 1 if commit_node is None else commit_node
    if not 0 <= node < tree.n_nodes:
        raise ValueError(f"commit_node {node} is not in the tree of {tree.n_nodes} nodes")
    if prompt_tokens is not None:
        prompts = [list(prompt_tokens)]
    else:
        short = backend.tokenize(CHECK_TEXT)
        prompts = [short]
        if long_context and long_context + max(tree.depths) + 8 <= backend.n_ctx:
            prompts.append((short * (long_context // len(short) + 1))[:long_context])
    if not all(prompts):
        raise ValueError("check_exactness needs a non-empty prompt")
    rng = np.random.default_rng(seed)
    tokens = [int(t) for t in rng.integers(0, backend.n_vocab, size=tree.n_nodes + 1)]
    tokens, extra = tokens[:-1], tokens[-1]  # extra: appended after the commit
    logit_rows, hidden_rows, agree, labels = [], [], [], []
    try:
        for prompt in prompts:
            backend.reset()
            backend.prefill(prompt)
            n_prompt = backend.n_past
            seq_logits, seq_hidden, seq_after = _sequential(backend, n_prompt, tokens, tree.parents, node, extra)
            backend.rollback(n_prompt)  # frees the tail only: the tree lands where it would after a fresh prefill
            tree_logits, tree_hidden, after = _tree_then_commit(backend, tokens, tree.parents, node, extra)
            # Rows 0..n_nodes-1 are the tree nodes, the last row the token appended after the commit.
            logit_rows.append(np.abs(np.vstack([tree_logits, after[0]]) - np.vstack([seq_logits, seq_after[0]])).max(axis=1))
            hidden_rows.append(np.abs(np.vstack([tree_hidden, after[1]]) - np.vstack([seq_hidden, seq_after[1]])).max(axis=1))
            agree.extend(tree_logits.argmax(axis=1) == seq_logits.argmax(axis=1))
            at = f" at {len(prompt)} tokens" if len(prompts) > 1 else ""
            labels += [f"node {i}{at}" for i in range(tree.n_nodes)] + [f"after commit{at}"]
    finally:
        backend.reset()
    logit_diff, hidden_diff = np.concatenate(logit_rows), np.concatenate(hidden_rows)
    max_logit, max_hidden = float(logit_diff.max()), float(hidden_diff.max())
    exact = max_logit == 0.0 and max_hidden == 0.0  # NaN compares unequal: not exact
    row = max(range(len(logit_diff)), key=lambda r: (logit_diff[r], hidden_diff[r]))
    return ExactnessReport(
        exact=exact, max_abs_logit_diff=max_logit, max_abs_hidden_diff=max_hidden,
        argmax_agreement=float(np.mean(agree)), n_nodes=tree.n_nodes, seconds=time.perf_counter() - t0,
        worst_row="" if exact else labels[row], contexts=tuple(len(p) for p in prompts),
    )


def _tree_then_commit(backend: Backend, tokens, parents, node, extra):
    """The Medusa loop's way: one tree call, commit a path, append a token. Rows: [n_nodes, ...] and the extra's."""
    out = backend.decode_tree(tokens, parents)
    backend.commit(node)
    after = backend.append([extra])
    return out.logits, out.hidden, (after.logits[0], after.hidden[0])


def _sequential(backend: Backend, n_prompt, tokens, parents, node, extra):
    """Plain decoding's way: every root-to-node path one token at a time after the prompt, depth first, rolling
    back between paths. Rollback only ever removes the tail of seq 0, so its cells stay in position order."""
    children: list[list[int]] = [[] for _ in parents]
    for i, p in enumerate(parents):
        if p >= 0:
            children[p].append(i)
    depth = [0] * len(parents)
    logits: list[np.ndarray | None] = [None] * len(parents)
    hidden: list[np.ndarray | None] = [None] * len(parents)
    after = None
    stack = [i for i, p in enumerate(parents) if p < 0][::-1]
    while stack:
        i = stack.pop()
        depth[i] = 0 if parents[i] < 0 else depth[parents[i]] + 1
        backend.rollback(n_prompt + depth[i])  # keep the prompt and i's ancestors
        out = backend.append([tokens[i]])
        logits[i], hidden[i] = out.logits[0], out.hidden[0]
        if i == node:
            cont = backend.append([extra])
            after = (cont.logits[0], cont.hidden[0])
        stack.extend(children[i][::-1])
    return np.stack(logits), np.stack(hidden), after
