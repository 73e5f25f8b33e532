"""Medusa decoding on the real model: greedy output is plain greedy output, token for token; lossless
sampling keeps the base model's distribution; stops and fallbacks behave."""
from __future__ import annotations

import random

import numpy as np
import pytest

from medusa_gguf.backend import Backend
from medusa_gguf.decoding import GenerationResult, MedusaStepper, SamplingParams, generate, probabilities
from medusa_gguf.settings import Settings
from medusa_gguf.tree import DEFAULT_CHOICES, build_tree, chain, node_tokens

from .conftest import heldout_chat_prompts, plain_greedy

N_PROMPTS, N_TOKENS = 30, 128


class OracleHeads:
    """Fake heads that know the plain greedy continuation: rank 0 is right three times in four (at random), and
    when it is wrong rank 1 is right, so the verifier accepts deep paths, siblings and rejections in every pattern."""

    def __init__(self, backend: Backend, prompt_len: int, truth: list[int], seed: int) -> None:
        self.backend, self.prompt_len, self.truth, self.seed = backend, prompt_len, truth, seed

    def topk(self, hidden, k: int, n_heads: int) -> np.ndarray:
        t = self.backend.n_past - 1  # hidden is h_t of the last committed token; head j guesses token t+1+j
        rng = random.Random(t * 7 + self.seed)
        out = np.array([[rng.randrange(self.backend.n_vocab) for _ in range(k)] for _ in range(n_heads)])
        for j in range(1, n_heads + 1):
            i = t + 1 + j - self.prompt_len  # index into the completion
            if 0 <= i < len(self.truth):
                wrong = random.Random(i * 7919 + self.seed).random() < 0.25
                out[j - 1, 0] = (self.truth[i] + 1) % self.backend.n_vocab if wrong else self.truth[i]
                if wrong and k > 1:
                    out[j - 1, 1] = self.truth[i]
        return out

    def draft(self, hidden, root: int, tree) -> list[int]:
        return node_tokens(tree, root, self.topk(hidden, max(tree.max_rank_per_depth), tree.depth))


class OracleDependentHeads(OracleHeads):
    """Path-dependent fake drafts, like dependent heads': below a node whose path follows the greedy text, rank 0
    is right three times in four (else rank 1 is); below any other node the candidates are noise seeded by the
    path, so siblings' subtrees differ."""

    def draft(self, hidden, root: int, tree) -> list[int]:
        t = self.backend.n_past - 1
        tokens, paths = [root], {0: (root,)}
        for i in range(1, tree.n_nodes):
            path, d, r = paths[tree.parents[i]], tree.depths[i], tree.ranks[i]
            c = t + d - self.prompt_len  # completion index of the token above this node (the root: t+1)
            on_truth = 0 <= c < len(self.truth) and list(path) == self.truth[c - d + 1 : c + 1]
            rng = random.Random(hash((self.seed, t, path, r)))
            tok = rng.randrange(self.backend.n_vocab)
            if on_truth and c + 1 < len(self.truth):
                wrong = random.Random((c + 1) * 7919 + self.seed).random() < 0.25
                if r == 0:
                    tok = (self.truth[c + 1] + 1) % self.backend.n_vocab if wrong else self.truth[c + 1]
                elif r == 1 and wrong:
                    tok = self.truth[c + 1]
            tokens.append(tok)
            paths[i] = path + (tok,)
        return tokens


@pytest.fixture(scope="module")
def prompts(backend):
    return heldout_chat_prompts(backend, N_PROMPTS)


@pytest.fixture(scope="module")
def plain_outputs(backend, prompts):
    return plain_greedy(backend, prompts, N_TOKENS)


TREES = {
    "default": build_tree(DEFAULT_CHOICES),
    "wide": build_tree([(r,) for r in range(8)] + [(0, 0), (0, 1), (1, 0), (1, 1)]),  # 8 candidates at depth 1
    "deep_chain": chain(5),
}


def assert_oracle_drafts_give_plain_output(backend, prompts, plain_outputs, name: str, max_tokens: int) -> None:
    """Each prompt decoded with oracle drafts on tree TREES[name], alternating Medusa-style and path-dependent
    drafts, gives its plain greedy output."""
    tree = TREES[name]
    for i, (prompt, truth) in enumerate(zip(prompts, plain_outputs)):
        r = GenerationResult()
        heads = (OracleHeads if i % 2 == 0 else OracleDependentHeads)(backend, len(prompt), truth, seed=i)
        list(generate(backend, prompt, SamplingParams(max_tokens=max_tokens), r, heads=heads, tree=tree))
        assert r.tokens == truth, f"prompt {i}, tree {name}: first difference at {_first_diff(r.tokens, truth)}"
        assert r.stats.mode == "medusa"
        assert r.stats.tau > 1.5  # the oracle really drafted: deep paths were accepted and committed


@pytest.mark.parametrize("name", TREES)
def test_greedy_medusa_equals_plain_with_oracle_heads(backend, prompts, plain_outputs, name):
    """30 prompts x 128 tokens per tree."""
    assert_oracle_drafts_give_plain_output(backend, prompts, plain_outputs, name, N_TOKENS)


def test_greedy_medusa_equals_plain_with_trained_heads(backend, prompts, plain_outputs, trained_heads):
    for tree in (TREES["default"], chain(3)):
        accepted = 0
        for prompt, truth in list(zip(prompts, plain_outputs))[:4]:
            r = GenerationResult()
            list(generate(backend, prompt, SamplingParams(max_tokens=N_TOKENS), r, heads=trained_heads, tree=tree))
            assert r.tokens == truth
            accepted += sum(r.stats.accepted_per_depth)
        assert accepted > 0


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# -- sampling ----------------------------------------------------------------------------------------------------


def emitted_first_token_distribution(backend, prompt, params, draws):
    """Decode a tree whose drafts are the root's likeliest tokens, then run the verifier `draws` times with fresh
    randomness; return the counts of the first token each step emits and the base model's exact distribution."""
    tree = TREES["default"]
    root = int(np.argmax(backend.prefill(prompt).logits[-1]))
    probe = backend.decode_tree([root] * tree.n_nodes, tree.parents)  # the root's logits ignore its children
    backend.commit(-1)
    ids, p = probabilities(probe.logits[0], params)
    likely = ids[:3].tolist()
    tokens = [root] + [likely[tree.ranks[i]] if tree.depths[i] == 1 else int(ids[i % 10]) for i in range(1, tree.n_nodes)]
    out = backend.decode_tree(tokens, tree.parents)
    backend.commit(-1)
    exact = dict(zip(ids.tolist(), p.tolist()))
    stepper = MedusaStepper.__new__(MedusaStepper)
    stepper.params = params
    counts: dict[int, int] = {}
    for seed in range(draws):
        stepper.rng = np.random.default_rng(seed)
        node, bonus = stepper._verify(tree, tokens, out.logits)
        first = tokens[_depth1_ancestor(tree, node)] if node else bonus
        counts[first] = counts.get(first, 0) + 1
    assert sum(exact.get(t, 0) for t in likely) > 0.3  # the drafts carry real probability: the verifier matters
    return counts, exact


def _depth1_ancestor(tree, node: int) -> int:
    while tree.parents[node] != 0:
        node = tree.parents[node]
    return node


def total_variation(counts: dict[int, int], exact: dict[int, float]) -> float:
    n = sum(counts.values())
    keys = set(counts) | set(exact)
    return 0.5 * sum(abs(counts.get(k, 0) / n - exact.get(k, 0.0)) for k in keys)


@pytest.fixture(scope="module")
def sampling_prompt(backend):
    return backend.tokenize(backend.apply_chat_template([{"role": "user", "content": "Name a colour."}]))


def test_lossless_sampling_keeps_the_base_distribution(backend, sampling_prompt):
    params = SamplingParams(temperature=1.0, top_k=20, acceptance="lossless")
    counts, exact = emitted_first_token_distribution(backend, sampling_prompt, params, draws=6000)
    tv = total_variation(counts, exact)
    assert tv < 0.03, f"total variation {tv:.4f} from the base model's distribution"


def test_typical_acceptance_is_not_lossless_and_the_bound_detects_it(backend, sampling_prompt):
    """The same bound fails for a verifier that does not preserve the distribution: the test can fail."""
    params = SamplingParams(temperature=1.0, top_k=20, acceptance="typical", typical_epsilon=0.3, typical_alpha=0.9)
    counts, exact = emitted_first_token_distribution(backend, sampling_prompt, params, draws=3000)
    assert total_variation(counts, exact) > 0.03


def test_fixed_seed_reproduces_sampled_output(backend, trained_heads, sampling_prompt):
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=7)
    runs = []
    for _ in range(2):
        r = GenerationResult()
        list(generate(backend, sampling_prompt, params, r, heads=trained_heads, tree=TREES["default"]))
        runs.append(r.tokens)
    assert runs[0] == runs[1] and len(runs[0]) > 0


# -- stopping ----------------------------------------------------------------------------------------------------


def test_stop_string_spanning_steps_is_never_emitted(backend, prompts, plain_outputs):
    prompt, truth = prompts[0], plain_outputs[0]
    full = backend.detokenize(truth)
    stop = full[40:47]  # a stop string somewhere inside the greedy text
    assert stop and stop in full
    for heads in (None, OracleHeads(backend, len(prompt), truth, seed=1)):
        r = GenerationResult()
        pieces = list(generate(backend, prompt, SamplingParams(max_tokens=N_TOKENS, stop=(stop,)), r,
                               heads=heads, tree=TREES["deep_chain"] if heads else None))
        text = "".join(pieces)
        assert text == full[: full.index(stop)] == r.text
        assert r.finish_reason == "stop" and stop not in text


def test_max_tokens_and_context_end(backend, prompts, plain_outputs):
    prompt, truth = prompts[1], plain_outputs[1]
    heads = OracleHeads(backend, len(prompt), truth, seed=2)
    r = GenerationResult()
    list(generate(backend, prompt, SamplingParams(max_tokens=10), r, heads=heads, tree=TREES["deep_chain"]))
    assert r.tokens == truth[:10] and r.finish_reason == "length"
    with Backend(Settings(n_ctx=len(prompt) + 12, n_threads=2)) as small:
        r = GenerationResult()
        list(generate(small, prompt, SamplingParams(max_tokens=100), r,
                      heads=OracleHeads(small, len(prompt), truth, seed=3), tree=TREES["deep_chain"]))
        assert r.finish_reason == "length" and r.tokens == truth[: len(r.tokens)]
        assert small.n_past <= small.n_ctx


def test_utf8_pieces_are_whole_characters(backend):
    prompt = backend.tokenize(backend.apply_chat_template([{"role": "user", "content": "Write 東京 and café five times."}]))
    pieces = list(generate(backend, prompt, SamplingParams(max_tokens=40)))
    # Every piece but the last is whole characters; the last may be a character that max_tokens cut in half
    # (flushed as U+FFFD, since its remaining bytes never come): with the bf16 KV cache the 40th token is one.
    assert len(pieces) > 5 and all("\ufffd" not in p for p in pieces[:-1])
