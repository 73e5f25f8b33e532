"""The llama.cpp backend on the real embedded model: trees, commits, hidden states, bad input."""
from __future__ import annotations

import random
import time

import numpy as np
import pytest

from medusa_gguf.backend import Backend, ContextLengthError, path_to, tree_depths
from medusa_gguf.models import ModelFileError, output_matrix
from medusa_gguf.settings import Settings

from .conftest import TEST_SETTINGS

# The project claims bit-identical outputs on the default model (Q4_1, CPU, flash attention on; docs/DESIGN.md,
# "Exactness rules"): a node decoded inside a tree, a token after commits, rollbacks or a compaction, and extracted
# hidden states give the same numbers as the same tokens decoded one by one. So every such comparison is exact.


def random_tree(rng: random.Random, n_nodes: int, max_children: int) -> list[int]:
    """Parents of a random tree in topological order (parents[0] = -1)."""
    parents = [-1]
    while len(parents) < n_nodes:
        p = rng.randrange(len(parents))
        if sum(1 for q in parents if q == p) < max_children:
            parents.append(p)
    return parents


def fixed_shapes(rng: random.Random) -> list[list[int]]:
    deep_wide = [-1, 0, 0, 0, 1, 1, 2, 4, 4, 7, 9]  # depth 5 (nodes 0-4-7-9-... ) and 3 children at the root
    assert max(tree_depths(deep_wide)) >= 4 and deep_wide.count(0) >= 3
    return [deep_wide, random_tree(rng, 12, 3), random_tree(rng, 20, 4), [-1, 0, 1, 2, 3, 4]]


def sequential(backend: Backend, tokens: list[int]):
    """Outputs of decoding `tokens` one token at a time from an empty context."""
    backend.reset()
    rows = [backend.append([t]) for t in tokens]
    return np.concatenate([r.logits for r in rows]), np.concatenate([r.hidden for r in rows])


def assert_same(a: np.ndarray, b: np.ndarray, what: str) -> None:
    """Bit for bit; the message gives the size of any difference."""
    assert a.shape == b.shape, f"{what}: shapes {a.shape} and {b.shape}"
    assert np.array_equal(a, b), f"{what}: max abs difference {float(np.max(np.abs(a - b)))}, expected 0"


@pytest.fixture
def rng(request):
    seed = time.time_ns() % 2**32  # fresh tokens every run; the seed is printed on failure
    print(f"random seed {seed} for {request.node.name}")
    return random.Random(seed)


def test_tree_nodes_equal_sequential_decoding(backend, prompt_tokens, rng):
    for parents in fixed_shapes(rng):
        tokens = [rng.randrange(backend.n_vocab) for _ in parents]
        backend.prefill(prompt_tokens)
        tree = backend.decode_tree(tokens, parents)
        backend.commit(-1)
        for node in range(len(parents)):
            path = [tokens[i] for i in path_to(parents, node)]
            ref = backend.prefill(prompt_tokens + path)  # its one output row is the node's
            assert_same(tree.logits[node], ref.logits[0], f"logits of node {node} in tree {parents}")
            assert_same(tree.hidden[node], ref.hidden[0], f"hidden state of node {node} in tree {parents}")
            assert int(np.argmax(tree.logits[node])) == int(np.argmax(ref.logits[0]))


def test_tree_node_equals_token_by_token_decoding(backend, prompt_tokens, rng):
    parents = fixed_shapes(rng)[0]
    tokens = [rng.randrange(backend.n_vocab) for _ in parents]
    backend.prefill(prompt_tokens)
    tree = backend.decode_tree(tokens, parents)
    backend.commit(-1)
    deepest = max(range(len(parents)), key=lambda i: tree_depths(parents)[i])
    path = path_to(parents, deepest)
    logits, hidden = sequential(backend, prompt_tokens + [tokens[i] for i in path])
    for row, node in enumerate(path, start=len(prompt_tokens)):
        assert_same(tree.logits[node], logits[row], f"logits of node {node}")
        assert_same(tree.hidden[node], hidden[row], f"hidden of node {node}")


# Node 5's path (0, 2, 5) skips nodes 1, 3 and 4: discarded siblings sit between kept cells.
MIXED_TREE, MIXED_NODES = [-1, 0, 0, 1, 2, 2, 3, 5, 5], [7, 5, 8, 6, -1, 0]


def run_commit_steps(backend: Backend, prompt: list[int], rng: random.Random, steps: int = 6,
                     parents: list[int] = MIXED_TREE, nodes: list[int] = MIXED_NODES):
    """Alternate trees and commits the way the Medusa loop does; return the committed token sequence and the
    outputs of three tokens appended at the end."""
    backend.prefill(prompt)
    committed = list(prompt)
    for step in range(steps):
        tokens = [rng.randrange(backend.n_vocab) for _ in parents]
        backend.decode_tree(tokens, parents)
        node = nodes[step % len(nodes)]
        n = backend.commit(node)
        path = path_to(parents, node) if node >= 0 else []
        assert n == len(path)
        committed += [tokens[i] for i in path]
        assert backend.n_past == len(committed)
    extra = [rng.randrange(backend.n_vocab) for _ in range(3)]
    return committed, extra, backend.append(extra)


def test_commit_then_continue_equals_sequential(backend, prompt_tokens, rng):
    committed, extra, out = run_commit_steps(backend, prompt_tokens, rng)
    logits, hidden = sequential(backend, committed + extra)
    assert_same(out.logits, logits[-3:], "logits after commits")
    assert_same(out.hidden, hidden[-3:], "hidden after commits")


def test_trees_always_run_with_flash_attention(backend):
    """Without flash attention this CPU build is not batch-invariant (docs/DESIGN.md, "The flash-attention trap"),
    so the backend's default is on, and a backend built with it off refuses to decode a tree."""
    assert backend.flash_attn
    with Backend(Settings(**TEST_SETTINGS), flash_attn=False) as no_fa:
        no_fa.prefill([1, 2, 3])
        with pytest.raises(RuntimeError, match="tree decoding needs flash attention"):
            no_fa.decode_tree([4, 5], [-1, 0])


def test_trash_compaction_keeps_outputs_exact(rng):
    """Many commits that skip siblings fill the slack cells with trash; compaction must not change any output."""
    with Backend(Settings(n_ctx=128, n_threads=2)) as small:
        prompt = [rng.randrange(small.n_vocab) for _ in range(10)]
        wide = [-1] + [0] * 15 + [15, 16]  # committing node 17 (path 0, 15, 16, 17) leaves 14 cells of trash
        committed, extra, out = run_commit_steps(small, prompt, rng, steps=20, parents=wide, nodes=[17])
        assert small.n_past == len(committed) + len(extra)
        assert small.compactions > 0, "the test did not reach a compaction"
        logits, hidden = sequential(small, committed + extra)
        assert_same(out.logits, logits[-3:], "logits after compaction")
        assert_same(out.hidden, hidden[-3:], "hidden after compaction")


def test_rollback_then_decode_equals_sequential(backend, prompt_tokens, rng):
    extra = [rng.randrange(backend.n_vocab) for _ in range(5)]
    backend.prefill(prompt_tokens + extra)
    backend.rollback(len(prompt_tokens) + 2)
    other = [rng.randrange(backend.n_vocab) for _ in range(2)]
    out = backend.append(other)
    logits, _ = sequential(backend, prompt_tokens + extra[:2] + other)
    assert_same(out.logits, logits[-2:], "logits after rollback")


def test_hidden_states_are_what_the_lm_head_consumes(backend, model_path, prompt_tokens):
    # Not an identity: llama.cpp multiplies by the Q8_0 matrix with Q8-quantized activations, we in float32.
    w_out = output_matrix(model_path)  # [n_vocab, n_embd], tied embeddings on the default model
    assert w_out.shape == (backend.n_vocab, backend.n_embd)
    out = backend.prefill(prompt_tokens)
    rebuilt = out.hidden @ w_out.T
    scale = float(np.max(np.abs(out.logits)))
    diff = float(np.max(np.abs(rebuilt - out.logits)))
    assert diff < 0.02 * scale, f"hidden @ W_out^T differs from the logits by {diff} (scale {scale})"
    assert int(np.argmax(rebuilt)) == int(np.argmax(out.logits))


def test_extract_hidden_matches_per_sequence_decoding(backend, rng):
    seqs = [[rng.randrange(backend.n_vocab) for _ in range(n)] for n in (5, 17, 1, 40, 0, 9)]
    states = backend.extract_hidden(seqs)
    for seq, h in zip(seqs, states):
        assert h.shape == (len(seq), backend.n_embd)
        if seq:
            _, hidden = sequential(backend, seq)
            assert_same(h, hidden, f"hidden states of a {len(seq)}-token sequence")


def test_extract_hidden_long_sequence_spans_batches(rng):
    with Backend(Settings(**TEST_SETTINGS)) as small:
        seq = [rng.randrange(small.n_vocab) for _ in range(150)]
        (h,) = small.extract_hidden([seq])
        _, hidden = sequential(small, seq)
        assert_same(h, hidden, "chunked extraction")


def test_chat_template_and_tokens_round_trip(backend):
    text = backend.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    sentence = "Medusa heads guess tokens: naïve café, 東京."
    assert backend.detokenize(backend.tokenize(sentence, add_special=False)) == sentence


# -- bad input ---------------------------------------------------------------------------------------------------


def load(path) -> Backend:
    return Backend(Settings(base_model_path=path, **TEST_SETTINGS))


def test_missing_model_path(tmp_path):
    with pytest.raises(ModelFileError, match="model file not found: .*nope.gguf"):
        load(tmp_path / "nope.gguf")


def test_directory_as_model(tmp_path):
    with pytest.raises(ModelFileError, match="is a directory"):
        load(tmp_path)


def test_text_file_renamed_gguf(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_text("this is not a model\n")
    with pytest.raises(ModelFileError, match="not a GGUF file .*fake.gguf"):
        load(fake)


@pytest.mark.parametrize("keep_bytes", [2_000, 2_000_000])
def test_truncated_gguf(tmp_path, model_path, keep_bytes):
    cut = tmp_path / "cut.gguf"
    with open(model_path, "rb") as src:
        cut.write_bytes(src.read(keep_bytes))
    with pytest.raises(ModelFileError, match="truncated"):
        load(cut)


def test_prompt_longer_than_context(backend):
    with pytest.raises(ContextLengthError, match=r"prompt of 1100 tokens exceeds the context window n_ctx=1024"):
        backend.prefill([1] * 1100)


def test_tree_past_end_of_context(backend):
    backend.prefill([1] * 1020)
    with pytest.raises(ContextLengthError, match="exceeds n_ctx=1024"):
        backend.decode_tree([1] * 6, [-1, 0, 1, 2, 3, 4])
    assert backend.n_past == 1020
    backend.decode_tree([1, 2], [-1, 0])  # still usable
    backend.commit(1)
    assert backend.n_past == 1022


def test_tied_embeddings_are_read_once(model_path):
    """The default model ties its embeddings: the input table is the output matrix, reused when it is passed."""
    from medusa_gguf.models import embedding_matrix

    w_out = output_matrix(model_path)
    fresh = embedding_matrix(model_path)  # dequantized from token_embd.weight
    assert np.array_equal(fresh, w_out)
    assert embedding_matrix(model_path, w_out) is w_out
