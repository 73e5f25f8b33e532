"""The second model family, Gemma 3 270M (base model, Q4_K_M): what the default model's tests establish for trees,
commits and batching, on a file that differs in every way that tends to break them: a 262k vocabulary, K-quant
weights (ggml's tiled and repacked K-quant kernels sum batched rows differently, see backend.py), sliding-window
attention (a 512-token window on most layers: trees past it are new ground) and no chat template.

Installed by `bash scripts/setup.sh --models gemma3-270m` (the README's test command); skipped, saying why, without it.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from medusa_gguf.backend import Backend, NoChatTemplate
from medusa_gguf.decoding import SamplingParams
from medusa_gguf.engine import Engine
from medusa_gguf.exactness import check_exactness
from medusa_gguf.models import KNOWN_MODELS, ModelFileError, known_model_path
from medusa_gguf.settings import Settings

from .conftest import HELDOUT, plain_greedy
from .test_batching import run_together
from .test_decoding import assert_oracle_drafts_give_plain_output

N_CTX = 1536
N_TOKENS = 48


@pytest.fixture(scope="module")
def gemma_path():
    try:
        return known_model_path("gemma3-270m")
    except ModelFileError as exc:
        pytest.skip(f"Gemma 3 270M is not installed ({exc})")


@pytest.fixture(scope="module")
def gemma(gemma_path):
    with Backend(Settings(base_model_path=gemma_path, n_ctx=N_CTX, n_threads=2)) as b:
        yield b


@pytest.fixture(scope="module")
def prompts(gemma):
    """Plain-text prompts (a base model continues text): four held-out prompts, and one of ~700 tokens, past the
    sliding window, so the window moves inside trees and commits."""
    rows = [json.loads(line)["prompt"] for line in HELDOUT.read_text().splitlines()]
    short = [gemma.tokenize(r) for r in rows[:: len(rows) // 4][:4]]
    long_text = " ".join(rows)
    long = gemma.tokenize(long_text)[:700]
    assert len(long) == 700 > gemma.n_swa
    return short + [long]


@pytest.fixture(scope="module")
def plain_outputs(gemma, prompts):
    return plain_greedy(gemma, prompts, N_TOKENS)


def test_the_file_is_what_this_suite_means_to_test(gemma):
    assert gemma.info.architecture == "gemma3" and gemma.n_vocab == 262144
    assert gemma.n_swa == 512  # sliding-window layers
    assert not gemma.has_chat_template
    # Q4_K weights: loaded without repacking (auto), and batched calls equal single-token decoding
    assert "CPU_REPACK" not in gemma.weight_buffers and not gemma.extra_bufts
    assert gemma.batch_invariant()
    assert KNOWN_MODELS["gemma3-270m"].chat is False


def test_tree_decoding_and_commits_are_bit_identical_inside_and_past_the_window(gemma, prompts):
    for prompt in (None, prompts[-1]):
        report = check_exactness(gemma, prompt)
        assert report.exact, report.summary
        assert report.max_abs_logit_diff == 0.0 and report.max_abs_hidden_diff == 0.0
    assert report.contexts == (700,)


@pytest.mark.parametrize("name", ["default", "deep_chain"])
def test_greedy_medusa_equals_plain_with_oracle_heads(gemma, prompts, plain_outputs, name):
    assert_oracle_drafts_give_plain_output(gemma, prompts, plain_outputs, name, N_TOKENS)


def test_concurrent_requests_give_what_they_give_alone(gemma_path, prompts, plain_outputs):
    """Batched slots: every call holds several texts' rows, the long prompt's chunks among them."""
    engine = Engine(Settings(base_model_path=gemma_path, n_ctx=N_CTX, n_threads=2, tree="plain"), slots=len(prompts))
    try:
        results = run_together(engine, prompts, SamplingParams(max_tokens=N_TOKENS, temperature=0))
        assert [r.tokens for r in results] == plain_outputs
        assert engine.batcher.stats.step_rows / engine.batcher.stats.calls > 2
    finally:
        engine.close()


def test_a_chat_is_refused_with_a_reason_and_training_reads_plain_text(gemma):
    with pytest.raises(NoChatTemplate, match="has no chat template .*base model"):
        gemma.apply_chat_template([{"role": "user", "content": "hi"}])
    messages = [{"role": "user", "content": "The sea is"}, {"role": "assistant", "content": " wide."}]
    assert gemma.render(messages, add_generation_prompt=False) == "The sea is wide."
    logits = gemma.prefill(gemma.tokenize("The sea is")).logits[-1]
    assert np.isfinite(logits).all() and logits.shape == (262144,)


def test_the_server_serves_completions_and_refuses_chats_with_the_reason(gemma_path):
    import asyncio

    import httpx

    from medusa_gguf.server import create_app

    settings = Settings(base_model_path=gemma_path, n_ctx=N_CTX, n_threads=2, tree="plain")
    engine = Engine(settings, slots=2)
    app = create_app(settings, slots=engine.views())

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            chat = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                              "max_tokens": 4})
            assert chat.status_code == 400, chat.text
            err = chat.json()["error"]
            assert err["param"] == "messages" and "no chat template" in err["message"] and "/v1/completions" in err["message"]
            done = await c.post("/v1/completions", json={"prompt": "The sea is", "max_tokens": 6, "temperature": 0})
            assert done.status_code == 200, done.text
            assert done.json()["usage"]["completion_tokens"] == 6

    try:
        asyncio.run(main())
    finally:
        engine.close()


def test_corpus_answers_in_independent_streams_are_plain_decoding(gemma_path, gemma, prompts, plain_outputs):
    """The corpus and self-distillation answer many prompts per call (Backend.greedy_batch, a context of streams);
    on a K-quant model too that must give plain decoding's answers, token for token."""
    with Backend(Settings(base_model_path=gemma_path, n_ctx=4 * 1024, n_threads=2), streams=4) as streams:
        assert not streams.extra_bufts  # the repack decision reached the streams context
        answers = streams.greedy_batch(prompts[:4], N_TOKENS)
    assert answers == plain_outputs[:4]
