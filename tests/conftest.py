"""Shared fixtures: the embedded default model loads in well under a second, so tests use the real thing."""
from __future__ import annotations

import pytest

from medusa_gguf.backend import Backend
from medusa_gguf.models import embedded_model_path
from medusa_gguf.settings import Settings

TEST_SETTINGS = dict(n_ctx=1024, n_threads=2)


@pytest.fixture(scope="session")
def model_path():
    return embedded_model_path()


@pytest.fixture(scope="session")
def backend():
    with Backend(Settings(**TEST_SETTINGS)) as b:
        yield b


@pytest.fixture(scope="session")
def prompt_tokens(backend):
    text = backend.apply_chat_template([{"role": "user", "content": "Explain why the sky is blue in two sentences."}])
    return backend.tokenize(text)
