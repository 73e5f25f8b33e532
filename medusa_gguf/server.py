"""The OpenAI-compatible HTTP server: `python main.py` or `medusa-gguf serve` (FastAPI on uvicorn).

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": "Hi"}]}'

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (`"stream": true` gives server-sent
events), GET /health, GET /metrics (Prometheus). A fixed pool of N_PARALLEL engines serves requests in arrival
order; at most MAX_QUEUE requests wait, the next one gets 503 with Retry-After. Generation runs in a worker
thread; a client that goes away (queued, streaming or not) cancels its generation and frees its engine.

Parameters follow OpenAI, defaults included: temperature 1.0 (send 0 for greedy decoding, the lossless Medusa
path), max_tokens 16 for /v1/completions and the rest of the context for chat. `n` (up to 16 choices, prompts x n)
generates the choices one after another on one engine; when seeded, choice i of a prompt uses seed + i.
`prompt` is a string or a list of strings (token arrays are refused). OpenAI parameters this server cannot honour
(logprobs, tools, penalties, ...) are rejected with 400 when they carry a non-default value, and so are unknown
fields: nothing is ignored silently. Extensions: `top_k` in requests; a `medusa` object (decoding statistics,
summed over the choices) in responses and on each choice's last stream chunk.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import secrets
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Literal, Sequence

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .decoding import GenerationResult, GenerationStats, SamplingParams
from .engine import Engine
from .settings import Settings

log = logging.getLogger(__name__)

MAX_CHOICES = 16  # n x prompts per request
MAX_STOP = 4
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


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


class _ClientGone(Exception):
    """The client disconnected while its request waited for an engine."""


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


class _Common(_Strict):
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


class CompletionRequest(_Common):
    prompt: str | list[str] = Field(min_length=1)
    echo: Any = None
    best_of: Any = None
    suffix: Any = None


class ChatRequest(_Common):
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


def _parse(model: type[_Common], body: bytes) -> _Common:
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


# -- the engine pool ---------------------------------------------------------------------------------------------

class QueueFull(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"queue full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class EnginePool:
    """N engines, lent one request at a time, first come first served; at most `max_queue` requests wait.

    Used from the event loop only (not thread-safe); the engine itself runs in a worker thread.
    """

    def __init__(self, engines: Sequence[Engine], max_queue: int) -> None:
        self.engines = list(engines)
        self.max_queue = max_queue
        self._free: deque[Engine] = deque(self.engines)
        self._waiters: deque[asyncio.Future] = deque()
        self._lent_at: dict[int, float] = {}
        self._hold_s = 1.0  # moving average of how long a request holds an engine, for Retry-After

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def busy(self) -> int:
        return len(self.engines) - len(self._free)

    async def acquire(self) -> Engine:
        if self._free and not self._waiters:
            return self._lend(self._free.popleft())
        if len(self._waiters) >= self.max_queue:
            raise QueueFull(self.retry_after_s())
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return self._lend(await fut)
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed an engine just as the wait was cancelled
                self.release(fut.result())
            elif fut in self._waiters:
                self._waiters.remove(fut)
            raise

    def release(self, engine: Engine) -> None:
        if (lent := self._lent_at.pop(id(engine), None)) is not None:
            self._hold_s = 0.8 * self._hold_s + 0.2 * (time.monotonic() - lent)
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(engine)
                return
        self._free.append(engine)

    def retry_after_s(self) -> int:
        return max(1, min(600, math.ceil(self._hold_s * (self.waiting + 1) / len(self.engines))))

    def _lend(self, engine: Engine) -> Engine:
        self._lent_at[id(engine)] = time.monotonic()
        return engine


# -- metrics -----------------------------------------------------------------------------------------------------

class Metrics:
    """Prometheus metrics in a registry of their own (one per app, so apps and tests never share counters)."""

    def __init__(self, pool_ref: Callable[[], EnginePool | None]) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("medusa_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram(
            "medusa_request_latency_seconds", "time from request to the end of the response", ["route"], registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
        )
        self.ttft = Histogram(
            "medusa_time_to_first_token_seconds", "time from request to the first generated text (queue included)",
            ["route"], registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
        )
        self.prompt_tokens = Counter("medusa_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("medusa_completion_tokens", "completion tokens generated", registry=r)
        self.tokens_per_step = Histogram(
            "medusa_tokens_per_step", "mean tokens per decoding step of each generation (1 = plain decoding)",
            registry=r, buckets=(1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 8),
        )
        self.guard_plain_steps = Counter(
            "medusa_guard_plain_steps", "steps a calibrated tree's acceptance guard decoded plainly (drafts not paying)",
            registry=r,
        )
        self.cancelled = Counter(
            "medusa_cancelled_generations", "generations stopped because the client left", registry=r
        )
        Gauge("medusa_queue_depth", "requests waiting for an engine", registry=r).set_function(
            lambda: pool.waiting if (pool := pool_ref()) else 0
        )
        Gauge("medusa_engines_busy", "engines serving a request", registry=r).set_function(
            lambda: pool.busy if (pool := pool_ref()) else 0
        )


class _MetricsMiddleware:
    """Counts every HTTP request by route and status and times it to the end of its response (streams included)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status, start = 500, time.perf_counter()

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


# -- generation in a worker thread ---------------------------------------------------------------------------------

@dataclasses.dataclass
class _Choice:
    index: int
    prompt: list[int]
    params: SamplingParams


_END = object()


def _run_choices(
    engine: Engine, choices: Sequence[_Choice], emit: Callable[[tuple], None], cancel: threading.Event,
    record: Callable[[GenerationResult], None],
) -> None:
    """Worker thread: generate the choices in turn; emit ("piece", index, text) and ("done", index, result).
    `record` sees every result, cancelled ones included."""
    for choice in choices:
        if cancel.is_set():
            return
        result = GenerationResult()
        pieces = engine.generate(choice.prompt, choice.params, result)
        try:
            for piece in pieces:
                emit(("piece", choice.index, piece))
                if cancel.is_set():
                    return
        finally:
            pieces.close()  # stops decoding at once when the client has gone
            record(result)
        emit(("done", choice.index, result))


class _Run:
    """One request's generation on a lent engine. The engine goes back to the pool when the thread ends,
    whatever happens to the response that reads the events."""

    def __init__(self, server: "_Server", engine: Engine, choices: Sequence[_Choice]) -> None:
        loop = asyncio.get_running_loop()
        self.cancel = threading.Event()
        self.events: asyncio.Queue = asyncio.Queue()

        def emit(event: object) -> None:
            loop.call_soon_threadsafe(self.events.put_nowait, event)

        def work() -> None:
            try:
                _run_choices(engine, choices, emit, self.cancel, server.record)
            finally:
                emit(_END)

        def finish(future: asyncio.Future) -> None:  # in the event loop, once the thread is done
            server.pool.release(engine)
            server.runs.discard(self)
            if not future.cancelled() and (exc := future.exception()) is not None and self.cancel.is_set():
                log.warning("a generation failed after its client left: %r", exc)  # nobody else will see it

        server.runs.add(self)
        self.future = loop.run_in_executor(server.executor, work)
        self.future.add_done_callback(finish)

    async def __aiter__(self) -> AsyncIterator[tuple]:
        while (event := await self.events.get()) is not _END:
            yield event
        await self.future  # re-raises the worker's exception, if any

    def stop(self) -> bool:
        """Ask the worker to stop; True when it was still running."""
        if self.future.done():
            return False
        self.cancel.set()
        return True


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client disconnects. Only for use after the body was read and before streaming."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- responses ---------------------------------------------------------------------------------------------------

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


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


class _SSEResponse(StreamingResponse):
    """A streaming response that always closes its event generator, so a lost client cancels the generation."""

    media_type = "text/event-stream"

    async def stream_response(self, send: Callable) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


# -- the app -----------------------------------------------------------------------------------------------------

class _Server:
    """Everything one app instance owns: its settings, engine pool, worker threads and metrics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool: EnginePool | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.model_names: list[str] = []
        self.runs: set[_Run] = set()
        self.metrics = Metrics(lambda: self.pool)

    def start(self, engines: Sequence[Engine]) -> None:
        self.pool = EnginePool(engines, self.settings.max_queue)
        self.executor = ThreadPoolExecutor(max_workers=len(engines), thread_name_prefix="engine")
        name = engines[0].model_name
        self.model_names = list(dict.fromkeys([name, name.removesuffix(".gguf")]))

    def stop(self) -> None:
        for run in list(self.runs):
            run.stop()
        if self.executor is not None:
            self.executor.shutdown(wait=True)

    # -- routes --

    def check_key(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
            what = "no API key was given" if not given else "the API key is incorrect"
            raise APIError(
                401, f"{what}; send the header 'Authorization: Bearer <API_KEY>'", code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def models(self) -> dict:
        created = int(time.time())
        data = [{"id": n, "object": "model", "created": created, "owned_by": "medusa-gguf"} for n in self.model_names]
        return {"object": "list", "data": data}

    async def complete(self, request: Request, chat: bool) -> Response:
        start = time.perf_counter()
        route = request.url.path
        req = _parse(ChatRequest if chat else CompletionRequest, await request.body())
        if self.pool is None:
            raise APIError(503, "the model is still loading; retry shortly", type="server_error", code="loading")
        if req.model is not None and req.model not in self.model_names:
            raise APIError(
                404, f"the model '{req.model}' does not exist; this server serves {', '.join(self.model_names)}",
                param="model", code="model_not_found",
            )
        base = self._sampling(req)  # every check that needs no tokens, before queueing for an engine
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            engine = await self._acquire(gone)
            try:
                choices = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self._prepare, engine, req, base
                )
            except BaseException:
                self.pool.release(engine)
                raise
            run = _Run(self, engine, choices)  # from here on the run gives the engine back
            prompt_tokens = sum(len(c.prompt) for c in choices if c.index % (req.n or 1) == 0)
            self.metrics.prompt_tokens.inc(prompt_tokens)
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            head = {"id": rid, "created": int(time.time()), "model": req.model or self.model_names[0]}
            if req.stream:
                events = self._stream(run, chat, head, prompt_tokens, req, route, start)
                return _SSEResponse(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            gone.add_done_callback(lambda t: t.cancelled() or (run.stop() and self.metrics.cancelled.inc()))
            return JSONResponse(await self._collect(run, chat, head, len(choices), prompt_tokens, route, start))
        except _ClientGone:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        finally:
            gone.cancel()

    async def _acquire(self, gone: asyncio.Future) -> Engine:
        """Wait for an engine (FIFO); give up if the client disconnects first."""
        acquiring = asyncio.ensure_future(self.pool.acquire())
        await asyncio.wait({acquiring, gone}, return_when=asyncio.FIRST_COMPLETED)
        if acquiring.done():
            try:
                return acquiring.result()
            except QueueFull as exc:
                raise APIError(
                    503, f"the server is busy: {self.pool.waiting} requests are waiting (MAX_QUEUE); retry later",
                    type="server_error", code="queue_full", headers={"Retry-After": str(exc.retry_after_s)},
                ) from None
        acquiring.cancel()
        (outcome,) = await asyncio.gather(acquiring, return_exceptions=True)
        if isinstance(outcome, Engine):
            self.pool.release(outcome)
        raise _ClientGone()

    def _sampling(self, req: _Common) -> SamplingParams:
        """The request's sampling parameters, checked; max_tokens is final only when the request gives it."""
        n_ctx = self.pool.engines[0].n_ctx
        max_tokens = _max_tokens(req)
        if max_tokens is not None and max_tokens > n_ctx:
            raise APIError(400, f"max_tokens={max_tokens} exceeds the context window n_ctx={n_ctx}", param="max_tokens")
        n_prompts = 1 if isinstance(req, ChatRequest) or isinstance(req.prompt, str) else len(req.prompt)
        if n_prompts * (req.n or 1) > MAX_CHOICES:
            raise APIError(400, f"{n_prompts} prompts x n={req.n} exceed {MAX_CHOICES} choices per request", param="n")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stop) > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop strings are allowed, got {len(stop)}", param="stop")
        try:
            return SamplingParams(
                max_tokens=max_tokens or 1, temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                seed=None if req.seed is None else req.seed % 2**64,  # OpenAI takes any int64; numpy wants >= 0
                stop=stop,
            )
        except ValueError as exc:
            raise APIError(400, str(exc), param="stop" if "stop" in str(exc) else None) from None

    def _prepare(self, engine: Engine, req: _Common, base: SamplingParams) -> list[_Choice]:
        """Worker thread, engine held: tokenize the prompts, check them against the context, make the choices."""
        chat = isinstance(req, ChatRequest)
        if chat:
            prompts = [engine.chat_prompt([{"role": m.role, "content": m.text()} for m in req.messages])]
        else:
            prompts = [engine.tokenize(p) for p in ([req.prompt] if isinstance(req.prompt, str) else req.prompt)]
        param = "messages" if chat else "prompt"
        for tokens in prompts:
            if not tokens:
                raise APIError(400, "the prompt is empty", param=param)
            if len(tokens) > engine.n_ctx:
                raise APIError(
                    400, f"the prompt has {len(tokens)} tokens, more than the context window of {engine.n_ctx} tokens "
                    "(shorten it or raise N_CTX)", param=param, code="context_length_exceeded",
                )
        choices, n = [], req.n or 1
        for p, tokens in enumerate(prompts):
            max_tokens = _max_tokens(req) or (
                max(1, engine.n_ctx - len(tokens)) if chat else COMPLETIONS_DEFAULT_MAX_TOKENS
            )
            for j in range(n):  # choice j of a prompt samples with seed + j
                seed = None if base.seed is None else (base.seed + j) % 2**64
                choices.append(_Choice(p * n + j, tokens, dataclasses.replace(base, max_tokens=max_tokens, seed=seed)))
        return choices

    def record(self, result: GenerationResult) -> None:
        """Count a generation's tokens and steps (from the worker thread; prometheus_client is thread-safe)."""
        self.metrics.completion_tokens.inc(len(result.tokens))
        if result.stats.steps:
            self.metrics.tokens_per_step.observe(result.stats.tau)
        self.metrics.guard_plain_steps.inc(result.stats.guard_plain_steps)

    async def _collect(
        self, run: _Run, chat: bool, head: dict, n_choices: int, prompt_tokens: int, route: str, start: float
    ) -> dict:
        texts, results = [""] * n_choices, [GenerationResult() for _ in range(n_choices)]
        first = True
        try:
            async for kind, index, value in run:
                if first:
                    self.metrics.ttft.labels(route).observe(time.perf_counter() - start)
                    first = False
                if kind == "piece":
                    texts[index] += value
                else:
                    results[index] = value
        finally:
            if run.stop():
                self.metrics.cancelled.inc()
        choices = []
        for i, (text, result) in enumerate(zip(texts, results)):
            choice: dict[str, Any] = {"index": i}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append({**choice, "logprobs": None, "finish_reason": result.finish_reason})
        completion_tokens = sum(len(r.tokens) for r in results)
        return {
            **head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "medusa": medusa_info([r.stats for r in results]),
        }

    async def _stream(
        self, run: _Run, chat: bool, head: dict, prompt_tokens: int, req: _Common, route: str, start: float
    ) -> AsyncIterator[str]:
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(index: int, text: str | None, finish: str | None = None, role: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                body: dict[str, Any] = {"index": index, "delta": delta}
            else:
                body = {"index": index, "text": text or ""}
            return {**head, "choices": [{**body, "logprobs": None, "finish_reason": finish}]}

        completion_tokens, started, first = 0, set(), True
        try:
            async for kind, index, value in run:
                if first:
                    self.metrics.ttft.labels(route).observe(time.perf_counter() - start)
                    first = False
                if chat and index not in started:
                    started.add(index)
                    yield _sse(chunk(index, None, role=True))
                if kind == "piece":
                    yield _sse(chunk(index, value))
                else:
                    completion_tokens += len(value.tokens)
                    yield _sse({**chunk(index, None, value.finish_reason), "medusa": medusa_info([value.stats])})
            if req.stream_options is not None and req.stream_options.include_usage:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}
                yield _sse({**head, "choices": [], "usage": usage})
            yield _sse("[DONE]")
        except Exception as exc:  # the status line has gone out: report in the stream, as OpenAI does
            log.exception("generation failed mid-stream")
            yield _sse({"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None,
                                  "code": None}})
        finally:
            if run.stop():
                self.metrics.cancelled.inc()


def _max_tokens(req: _Common) -> int | None:
    if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
        if req.max_tokens is not None and req.max_tokens != req.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens disagree; give one", param="max_tokens")
        return req.max_completion_tokens
    return req.max_tokens


def create_app(settings: Settings | None = None, engines: Sequence[Engine] | None = None) -> FastAPI:
    """The app. Given `engines`, it serves those at once (the caller closes them); else it loads N_PARALLEL
    engines at startup and closes them at shutdown. No settings: from the environment, so that
    `uvicorn --factory medusa_gguf.server:create_app` works too."""
    settings = Settings.from_env() if settings is None else settings
    server = _Server(settings)
    if engines is not None:
        server.start(engines)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned: list[Engine] = []
        if server.pool is None:
            owned = await asyncio.get_running_loop().run_in_executor(None, load_engines, settings)
            log.info("%s", describe(owned, settings))
            server.start(owned)
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, server.stop)
            for engine in owned:
                engine.close()

    app = FastAPI(title="medusa-gguf", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_MetricsMiddleware, metrics=server.metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:  # logged by Starlette too
        return APIError(500, f"internal error: {exc}", type="server_error").response()

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(server.check_key)])

    @v1.get("/models")
    async def models() -> dict:
        return server.models()

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await server.complete(request, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.complete(request, chat=True)

    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        if server.pool is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def load_engines(settings: Settings) -> list[Engine]:
    """N_PARALLEL engines, each with its own llama.cpp context; all closed again if one fails to load."""
    engines: list[Engine] = []
    try:
        for _ in range(settings.n_parallel):
            engines.append(Engine(settings))
    except BaseException:
        for engine in engines:
            engine.close()
        raise
    return engines


def describe(engines: Sequence[Engine], settings: Settings) -> str:
    """One log line saying what is served and how."""
    e = engines[0]
    path = e.backend.model_path
    mode = "plain" if e.plain_reason else "medusa"
    return (
        f"serving {path} ({path.stat().st_size / 1e6:.1f} MB) as '{e.model_name}': {len(engines)} engine(s), "
        f"n_ctx={e.n_ctx}, threads={settings.n_threads or 'auto'} each, gpu_layers={settings.n_gpu_layers}, "
        f"decoding={mode}{f' ({e.plain_reason})' if e.plain_reason else ''}, max_queue={settings.max_queue}, "
        f"api_key={'required' if settings.api_key else 'off'}"
    )


def serve(settings: Settings) -> None:
    """Load the engines, then serve on HOST:PORT until interrupted."""
    import uvicorn

    engines = load_engines(settings)
    try:
        log.info("%s", describe(engines, settings))
        app = create_app(settings, engines)
        uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, timeout_graceful_shutdown=5)
    finally:
        for engine in engines:
            engine.close()
