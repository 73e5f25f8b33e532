"""Prefill decodes every call but its last without outputs; the result must equal appending the prompt in chunks.

Prefill reads chunks of EXACT_BATCH tokens (so a prompt's cells do not depend on other texts sharing the cache,
batching.py); only the last call has outputs. It must leave the KV cache and last-token outputs that `append` of the
same chunks leaves, bit for bit, so that greedy plain and Medusa decoding (which share prefill) agree.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medusa_gguf.backend import EXACT_BATCH, Backend, ContextLengthError, DecodeOutput, prefill_spans
from medusa_gguf.bench import read_prompts
from medusa_gguf.settings import Settings

HELDOUT = Path(__file__).resolve().parents[1] / "medusa_gguf" / "prompts" / "heldout.jsonl"
N_NEW = 4  # greedy tokens decoded after the prompt


@pytest.fixture(scope="module")
def long_backend():
    with Backend(Settings(n_ctx=2048, n_threads=2)) as b:
        yield b


@pytest.fixture(scope="module")
def long_tokens(long_backend):
    """A real-text chat prompt of well over 2 * n_batch tokens (held-out questions as one user message)."""
    text = "\n".join(p["prompt"] for p in read_prompts(HELDOUT))
    tokens = long_backend.tokenize(long_backend.apply_chat_template([{"role": "user", "content": text}]))
    assert len(tokens) > 2 * long_backend.n_batch
    return tokens


def chunked_prefill(backend: Backend, tokens: list[int]) -> DecodeOutput:
    """`append` of the same chunks, every token's outputs computed and copied."""
    backend.reset()
    for start in range(0, len(tokens), EXACT_BATCH):
        out = backend.append(tokens[start : start + EXACT_BATCH])
    return DecodeOutput(logits=out.logits[-1:], hidden=out.hidden[-1:])


def greedy_after(backend: Backend, first: DecodeOutput, n: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """n greedy tokens after a prefill; their logits [n, n_vocab] and hidden states [n, n_embd]."""
    tokens, logits, hidden = [int(np.argmax(first.logits[-1]))], [], []
    for _ in range(n):
        out = backend.append([tokens[-1]])
        logits.append(out.logits[-1])
        hidden.append(out.hidden[-1])
        tokens.append(int(np.argmax(out.logits[-1])))
    return tokens, np.stack(logits), np.stack(hidden)


def assert_same(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shapes {a.shape} and {b.shape}"
    assert np.array_equal(a, b), f"{what}: max abs difference {float(np.max(np.abs(a - b)))}, expected 0"


@pytest.mark.parametrize("n", [1, 2, 62, 63, 64, 127, 128, 300, 2000])
def test_spans_are_contiguous_chunks_of_exact_batch(n):
    spans = prefill_spans(n)
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a < b == c for (a, b), (c, _) in zip(spans, spans[1:]))  # contiguous, none empty
    assert all(b - a <= EXACT_BATCH for a, b in spans)


@pytest.mark.parametrize("n", [700, 560, 1100])
def test_prefill_equals_appending_chunks(long_backend, long_tokens, n, monkeypatch):
    tokens = long_tokens[:n]
    old = chunked_prefill(long_backend, tokens)
    old_tokens, old_logits, old_hidden = greedy_after(long_backend, old, N_NEW)

    calls: list[tuple[int, str]] = []
    decode_batch = long_backend.decode_batch
    monkeypatch.setattr(long_backend, "decode_batch",
                        lambda works: (calls.append((len(works[0].tokens), works[0].outputs)), decode_batch(works))[1])
    new = long_backend.prefill(tokens)
    monkeypatch.undo()
    assert [o for _, o in calls] == ["none"] * (len(calls) - 1) + ["last"]  # only the last call had outputs
    assert sum(k for k, _ in calls) == n and long_backend.n_past == n
    new_tokens, new_logits, new_hidden = greedy_after(long_backend, new, N_NEW)

    assert_same(new.logits, old.logits, "last prompt token's logits")
    assert_same(new.hidden, old.hidden, "last prompt token's hidden state")
    assert new_tokens == old_tokens
    assert_same(new_logits, old_logits, "logits of the tokens after the prompt")
    assert_same(new_hidden, old_hidden, "hidden states of the tokens after the prompt")


def test_one_token_prompt(long_backend, long_tokens):
    old = chunked_prefill(long_backend, long_tokens[:1])
    old_tokens, old_logits, _ = greedy_after(long_backend, old, N_NEW)
    new = long_backend.prefill(long_tokens[:1])
    assert new.logits.shape == (1, long_backend.n_vocab) and new.hidden.shape == (1, long_backend.n_embd)
    new_tokens, new_logits, _ = greedy_after(long_backend, new, N_NEW)
    assert_same(new.logits, old.logits, "logits")
    assert_same(new.hidden, old.hidden, "hidden state")
    assert new_tokens == old_tokens
    assert_same(new_logits, old_logits, "logits of the tokens after the prompt")


def test_prompt_over_the_window_raises(backend, prompt_tokens):
    too_long = (prompt_tokens * (backend.n_ctx // len(prompt_tokens) + 1))[: backend.n_ctx + 1]
    with pytest.raises(ContextLengthError, match=f"{backend.n_ctx + 1} tokens exceeds .* n_ctx={backend.n_ctx}"):
        backend.prefill(too_long)
    out = backend.prefill(prompt_tokens)  # the backend is still usable, embeddings on
    assert out.hidden.shape == (1, backend.n_embd)
