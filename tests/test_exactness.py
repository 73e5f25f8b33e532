"""The start-up exactness check: exact on the default model, and it notices a difference when there is one."""
from __future__ import annotations

import numpy as np
import pytest

from medusa_gguf.backend import Backend, DecodeOutput
from medusa_gguf.exactness import CHECK_CHOICES, CHECK_TEXT, LONG_CONTEXT, ExactnessReport, check_exactness
from medusa_gguf.settings import Settings
from medusa_gguf.tree import build_tree


class Wrapped:
    """The real backend behind a fake that overrides a method or two."""

    def __init__(self, backend) -> None:
        self._backend = backend

    def __getattr__(self, name):
        return getattr(self._backend, name)


class PerturbedTree(Wrapped):
    """decode_tree adds `delta` to one logit of one node (its argmax unless `token` is given): what a
    batch-dependent kernel would do."""

    def __init__(self, backend, node: int, delta: float, token: int | None = None) -> None:
        super().__init__(backend)
        self.node, self.delta, self.token = node, delta, token

    def decode_tree(self, tokens, parents) -> DecodeOutput:
        out = self._backend.decode_tree(tokens, parents)
        logits = out.logits.copy()
        token = int(np.argmax(logits[self.node])) if self.token is None else self.token
        logits[self.node, token] += self.delta
        return DecodeOutput(logits=logits, hidden=out.hidden)


def test_default_model_is_exact(backend, prompt_tokens):
    """What the project claims for the CPU default (Q4_1, flash attention on): bit for bit, tree and commit."""
    assert backend.flash_attn
    assert backend.kv_type == "bf16"  # KV_TYPE=auto on the CPU
    for prompt in (None, prompt_tokens):
        report = check_exactness(backend, prompt)
        assert report.exact, report.summary
        assert report.contexts == ((len(backend.tokenize(CHECK_TEXT)), LONG_CONTEXT) if prompt is None
                                   else (len(prompt_tokens),))
        assert report.max_abs_logit_diff == 0.0 and report.max_abs_hidden_diff == 0.0
        assert report.argmax_agreement == 1.0
        assert report.n_nodes == len(CHECK_CHOICES) + 1 and report.worst_row == ""
        assert "bit-identical" in report.summary and "NOT" not in report.summary


class Counting(Wrapped):
    """Counts the decode calls and the tokens they carry."""

    def __init__(self, backend) -> None:
        super().__init__(backend)
        self.calls: list[tuple[str, int]] = []

    def prefill(self, tokens):
        self.calls.append(("prefill", len(tokens)))
        return self._backend.prefill(tokens)

    def append(self, tokens):
        self.calls.append(("append", len(tokens)))
        return self._backend.append(tokens)

    def decode_tree(self, tokens, parents):
        self.calls.append(("decode_tree", len(tokens)))
        return self._backend.decode_tree(tokens, parents)


def test_check_is_cheap(backend):
    """It runs at every start, so at each of its two contexts it decodes each node once: one prefill, one-token
    appends for the n nodes and the extra token, the tree, and the extra token after the commit. About 0.3 s on a
    quiet 2-core machine (docs/DESIGN.md), most of it the long prompt's prefill; the wall time is not asserted,
    since neighbours' load on a shared machine moves it tenfold."""
    fake = Counting(backend)
    report = check_exactness(fake)
    n = report.n_nodes
    assert fake.calls.count(("prefill", len(backend.tokenize(CHECK_TEXT)))) == 1
    assert fake.calls.count(("prefill", LONG_CONTEXT)) == 1
    assert fake.calls.count(("decode_tree", n)) == 2
    assert fake.calls.count(("append", 1)) == 2 * (n + 2)
    assert len(fake.calls) == 2 * (n + 4)


def test_long_check_catches_the_f16_cache_single_token_path():
    """With an f16 KV cache, llama.cpp's CPU attention sums a single-token call over 512+ cells in per-thread chunks
    and a tree's rows cell by cell: bit-identical after 5 tokens, not after 300. The short check alone missed it;
    the bf16 cache that KV_TYPE=auto picks on the CPU takes one path for both."""
    with Backend(Settings(n_ctx=1024, n_threads=2, kv_type="f16")) as f16:
        assert f16.kv_type == "f16"
        assert check_exactness(f16, long_context=0).exact  # the old check: short prompt only
        report = check_exactness(f16)
    assert not report.exact and report.worst_row.endswith(f"at {LONG_CONTEXT} tokens"), report.summary
    assert report.max_abs_logit_diff > 1e-3


def test_backend_is_left_reset(backend, prompt_tokens):
    backend.prefill(prompt_tokens)
    check_exactness(backend)
    assert backend.n_past == 0
    # Reset means reusable: the same tree as after a fresh prefill, bit for bit.
    tree = build_tree(CHECK_CHOICES)
    tokens = list(range(100, 100 + tree.n_nodes))
    backend.prefill(prompt_tokens)
    first = backend.decode_tree(tokens, tree.parents)
    backend.reset()
    backend.prefill(prompt_tokens)
    second = backend.decode_tree(tokens, tree.parents)
    backend.reset()
    assert np.array_equal(first.logits, second.logits)


def test_backend_is_reset_when_the_check_fails(backend):
    class Broken(Wrapped):
        def append(self, tokens):
            if self._backend.n_past > 8:
                raise RuntimeError("decode failed")
            return self._backend.append(tokens)

    with pytest.raises(RuntimeError, match="decode failed"):
        check_exactness(Broken(backend))
    assert backend.n_past == 0


def test_tiny_difference_is_not_exact(backend):
    """A difference far below any tolerance still fails the check, and the argmax share says it did not matter."""
    report = check_exactness(PerturbedTree(backend, node=3, delta=1e-3))
    assert not report.exact
    assert report.max_abs_logit_diff == pytest.approx(1e-3, rel=1e-2)
    assert report.max_abs_hidden_diff == 0.0
    assert report.argmax_agreement == 1.0 and report.worst_row.startswith("node 3 at ")
    assert "NOT bit-identical" in report.summary and "node 3" in report.summary
    assert backend.n_past == 0


def test_flipped_argmax_is_counted(backend):
    """A difference that changes one node's argmax: 7 of 8 nodes agree."""
    report = check_exactness(PerturbedTree(backend, node=5, delta=1e3, token=0))
    assert not report.exact and report.worst_row.startswith("node 5 at ")
    assert report.argmax_agreement == pytest.approx(7 / 8)  # at either context
    assert "88% of 8 nodes at" in report.summary


class PerturbedAfterCommit(Wrapped):
    """The hidden state of the token appended after a commit comes out `delta` off."""

    def __init__(self, backend, delta: float) -> None:
        super().__init__(backend)
        self.delta = delta

    def commit(self, node: int) -> int:
        self.committed = True
        return self._backend.commit(node)

    def append(self, tokens) -> DecodeOutput:
        out = self._backend.append(tokens)
        if getattr(self, "committed", False):
            return DecodeOutput(logits=out.logits, hidden=out.hidden + self.delta)
        return out


def test_difference_after_commit_is_found(backend):
    report = check_exactness(PerturbedAfterCommit(backend, delta=1e-4))
    assert not report.exact and report.max_abs_logit_diff == 0.0
    assert report.max_abs_hidden_diff == pytest.approx(1e-4, rel=1e-2)
    assert report.argmax_agreement == 1.0 and report.worst_row.startswith("after commit at ")


def test_report_to_dict():
    report = ExactnessReport(exact=False, max_abs_logit_diff=0.5, max_abs_hidden_diff=0.01, argmax_agreement=0.75,
                             n_nodes=8, seconds=0.12, worst_row="after commit")
    d = report.to_dict()
    assert d["exact"] is False and d["argmax_agreement"] == 0.75 and d["worst_row"] == "after commit"
    assert d["summary"] == report.summary and "\n" not in d["summary"]
    with pytest.raises(AttributeError):
        report.exact = True  # frozen


def test_bad_commit_node(backend):
    with pytest.raises(ValueError, match="commit_node 8 is not in the tree of 8 nodes"):
        check_exactness(backend, commit_node=8)
