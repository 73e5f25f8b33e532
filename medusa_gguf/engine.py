"""The engine: one backend (model + context) plus, when available, Medusa heads and the tree they use.

Callers (CLI, server, benchmark) build an Engine from Settings and call `generate`. An Engine is not
thread-safe; the server keeps one per parallel slot.
"""
from __future__ import annotations

import logging
from typing import Iterator, Sequence

from .backend import Backend
from .decoding import GenerationResult, SamplingParams, generate
from .settings import Settings

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.backend = Backend(settings)
        self.model_name = self.backend.model_path.name
        # Why decoding is plain, when it is; None once Medusa heads are in use.
        self.plain_reason: str | None = "Medusa decoding is not implemented yet"

    @property
    def n_ctx(self) -> int:
        return self.backend.n_ctx

    def tokenize(self, text: str) -> list[int]:
        return self.backend.tokenize(text)

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Tokens of chat messages rendered with the model's own template, ready for the assistant's reply."""
        return self.backend.tokenize(self.backend.apply_chat_template(messages))

    def generate(
        self, prompt_tokens: Sequence[int], params: SamplingParams, result: GenerationResult | None = None
    ) -> Iterator[str]:
        """Stream the completion's text pieces; `result` receives tokens, finish_reason and stats."""
        result = result if result is not None else GenerationResult()
        result.stats.reason = self.plain_reason
        return generate(self.backend, prompt_tokens, params, result)

    def close(self) -> None:
        self.backend.close()
