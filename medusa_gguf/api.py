"""The OpenAI API's shapes: request schemas (strict: unknown fields and wrong types are 400s, and OpenAI parameters
this server cannot honour are refused unless they carry their default), errors in OpenAI's shape, and the pieces
of responses (the `medusa` statistics object, server-sent events)."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal, Sequence

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .decoding import GenerationStats

MAX_CHOICES = 16  # n x prompts per request
MAX_STOP = 4


# -- errors ------------------------------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        type: str = "invalid_request_error", headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# -- request schemas ---------------------------------------------------------------------------------------------

class _Strict(BaseModel):
    # strict: "16" is not an integer and true is not a number, as with OpenAI.
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class RequestBase(_Strict):
    model: str | None = None  # None: the served model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # None: 1.0, as with OpenAI
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # extension; 0 = whole vocabulary
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted as OpenAI does: an end-user id, used for nothing here
    # Known OpenAI parameters this server cannot honour: accepted only with their default values (_UNSUPPORTED).
    logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None


class CompletionRequest(RequestBase):
    prompt: str | list[str] = Field(min_length=1)
    echo: Any = None
    best_of: Any = None
    suffix: Any = None


class ChatRequest(RequestBase):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    parallel_tool_calls: Any = None


# parameter -> the values that mean "off" (type-checked, so True never passes for 1).
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (False,), "top_logprobs": (0,), "logit_bias": ({},), "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0), "echo": (False,), "best_of": (1,), "suffix": ("",), "tools": ([],),
    "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},), "parallel_tool_calls": (True,),
}
_FIELD_NAMES = {
    name for m in (CompletionRequest, ChatRequest, ChatMessage, TextPart, StreamOptions) for name in m.model_fields
}


def parse_request(model: type[RequestBase], body: bytes) -> RequestBase:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    for name, off in _UNSUPPORTED.items():
        value = getattr(req, name, None)
        if value is not None and not any(type(value) is type(o) and value == o for o in off):
            raise APIError(400, f"'{name}' is not supported by this server (got {value!r}); leave it out", param=name)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "'stream_options' is only allowed with \"stream\": true", param="stream_options")
    return req


def _validation_error(exc: ValidationError) -> APIError:
    errors = exc.errors()
    extra = [e for e in errors if e["type"] == "extra_forbidden"]
    if extra:
        *path, name = extra[0]["loc"]
        param = f"{_param(path)}.{name}" if path else str(name)
        return APIError(400, f"unknown parameter '{param}'", param=param, code="unknown_parameter")
    param = _param(errors[0]["loc"])
    if errors[0]["type"] == "missing":
        return APIError(400, f"'{param}' is required", param=param)
    msgs = list(dict.fromkeys(e["msg"] for e in errors if _param(e["loc"]) == param))
    return APIError(400, f"invalid '{param}': {' or '.join(msgs)}", param=param)


def _param(loc: Sequence[str | int]) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'; union member tags such as 'list[str]' are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _FIELD_NAMES:
            out += f".{part}" if out else part
    return out


# -- responses -------------------------------------------------------------------------------------------------

def medusa_info(stats: Sequence[GenerationStats]) -> dict:
    """The `medusa` extension object: the decoding statistics (summed over the choices) and whether heads ran."""
    total = stats[0]
    if len(stats) > 1:
        total = dataclasses.replace(stats[0])
        for f in dataclasses.fields(total):
            values = [getattr(s, f.name) for s in stats]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                setattr(total, f.name, sum(values))
            elif all(isinstance(v, list) for v in values):
                width = max(len(v) for v in values)
                setattr(total, f.name, [sum(v[i] for v in values if i < len(v)) for i in range(width)])
    return {**total.to_dict(), "heads_used": total.mode == "medusa"}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def sse_comment(text: str) -> str:
    """A server-sent-events comment line: clients ignore it; proxies see traffic (keep-alive)."""
    return f": {text}\n\n"


def max_tokens_of(req: RequestBase) -> int | None:
    """The request's completion limit, None when it gives none (chat: max_completion_tokens, OpenAI's newer name)."""
    if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
        if req.max_tokens is not None and req.max_tokens != req.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens disagree; give one", param="max_tokens")
        return req.max_completion_tokens
    return req.max_tokens
