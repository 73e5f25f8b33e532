"""The OpenAI-compatible HTTP server: `python main.py` or `medusa-gguf serve` (FastAPI on uvicorn).

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": "Hi"}]}'

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (`"stream": true` gives server-sent
events), GET /health, GET /metrics (Prometheus). One model per process: N_PARALLEL slots of one llama.cpp context
serve requests in arrival order, and every active request's next work (a plain step, a verification tree, a chunk
of a new prompt) goes into the same llama.cpp calls (batching.py). At most MAX_QUEUE requests wait for a slot, the
next one gets 503 with Retry-After. Each generation runs in a worker thread; a client that goes away (queued,
streaming or not) cancels its generation before its next step and frees its slot. Streams send a keep-alive comment
every SSE_KEEPALIVE_S seconds while nothing else goes out (waiting for a slot, reading the prompt).

Parameters follow OpenAI, defaults included: temperature 1.0 (send 0 for greedy decoding, the lossless Medusa
path), max_tokens 16 for /v1/completions and the rest of the context for chat. `n` (up to 16 choices, prompts x n)
generates the choices one after another on one slot; when seeded, choice i of a prompt uses seed + i.
`prompt` is a string or a list of strings (token arrays are refused). OpenAI parameters this server cannot honour
(logprobs, tools, penalties, ...) are rejected with 400 when they carry a non-default value, and so are unknown
fields: nothing is ignored silently. Extensions: `top_k` in requests; a `medusa` object (decoding statistics,
summed over the choices) in responses and on each choice's last stream chunk.

Modules: api.py (schemas, errors, response pieces), pool.py (the slot pool), metrics.py, this one (the app).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Sequence

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api import (MAX_CHOICES, MAX_STOP, APIError, ChatRequest, CompletionRequest, RequestBase, max_tokens_of,
                  medusa_info, parse_request, sse, sse_comment)
from .backend import NoChatTemplate
from .decoding import GenerationResult, SamplingParams
from .engine import Engine
from .metrics import Metrics, MetricsMiddleware
from .pool import QueueFull, SlotPool
from .settings import Settings

log = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


class _ClientGone(Exception):
    """The client disconnected while its request waited for a slot."""


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
    """Worker thread: generate the choices in turn on a lent slot (engine.EngineSlot); emit ("piece", index, text)
    and ("done", index, result). `record` sees every result, cancelled ones included."""
    for choice in choices:
        if cancel.is_set():
            return
        result = GenerationResult()
        # the cancel check also runs before every decoding step and between prompt chunks: a stop string's held
        # text or a long prompt emits nothing for a while
        pieces = engine.generate(choice.prompt, choice.params, result, cancelled=cancel.is_set)
        try:
            for piece in pieces:
                emit(("piece", choice.index, piece))
                if cancel.is_set():
                    return
        finally:
            pieces.close()  # stops decoding at once when the client has gone
            record(result)
        if cancel.is_set():
            return
        emit(("done", choice.index, result))


class _Run:
    """One request's generation on a lent slot. The slot goes back to the pool when the thread ends,
    whatever happens to the response that reads the events."""

    def __init__(self, server: "_Server", engine: Any, choices: Sequence[_Choice]) -> None:
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


_KEEPALIVE = object()


async def _ticking(events: AsyncIterator, interval: float | None) -> AsyncIterator:
    """The items of `events`, and _KEEPALIVE whenever `interval` seconds pass without one (None: never)."""
    it = events.__aiter__()
    nxt: asyncio.Future | None = None
    try:
        while True:
            nxt = nxt or asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({nxt}, timeout=interval)
            if not done:
                yield _KEEPALIVE
                continue
            try:
                item = nxt.result()
            except StopAsyncIteration:
                return
            nxt = None
            yield item
    finally:
        if nxt is not None and not nxt.done():
            nxt.cancel()


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
    """Everything one app instance owns: its settings, slot pool, worker threads and metrics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool: SlotPool | None = None
        self.executor: ThreadPoolExecutor | None = None  # generations, one thread per slot
        self.preparing: ThreadPoolExecutor | None = None  # tokenization, which holds no slot
        self.model_names: list[str] = []
        self.runs: set[_Run] = set()
        self.batch_stats: Callable[[], Any] = lambda: None
        self.metrics = Metrics(lambda: self.pool, lambda: self.batch_stats())

    def start(self, slots: Sequence[Any]) -> None:
        self.pool = SlotPool(slots, self.settings.max_queue)
        self.executor = ThreadPoolExecutor(max_workers=len(slots), thread_name_prefix="slot")
        self.preparing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prepare")
        batcher = getattr(getattr(slots[0], "engine", None), "batcher", None)
        if batcher is not None:
            self.batch_stats = lambda: batcher.stats
        name = slots[0].model_name
        self.model_names = list(dict.fromkeys([name, name.removesuffix(".gguf")]))

    def stop(self) -> None:
        for run in list(self.runs):
            run.stop()
        for executor in (self.executor, self.preparing):
            if executor is not None:
                executor.shutdown(wait=True)

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
        req = parse_request(ChatRequest if chat else CompletionRequest, await request.body())
        if self.pool is None:
            raise APIError(503, "the model is still loading; retry shortly", type="server_error", code="loading")
        if req.model is not None and req.model not in self.model_names:
            raise APIError(
                404, f"the model '{req.model}' does not exist; this server serves {', '.join(self.model_names)}",
                param="model", code="model_not_found",
            )
        base = self._sampling(req)
        # every check, tokenization included, before queueing: it needs the model's vocabulary, not a slot
        choices = await asyncio.get_running_loop().run_in_executor(self.preparing, self._prepare, req, base)
        prompt_tokens = sum(len(c.prompt) for c in choices if c.index % (req.n or 1) == 0)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "created": int(time.time()), "model": req.model or self.model_names[0]}
        if req.stream:
            try:
                self.pool.check_room()
            except QueueFull as exc:
                raise self._busy(exc) from None
            events = self._stream(choices, chat, head, prompt_tokens, req, route, start)
            return _SSEResponse(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            slot = await self._acquire(gone)
            run = _Run(self, slot, choices)  # from here on the run gives the slot back
            self.metrics.prompt_tokens.inc(prompt_tokens)
            gone.add_done_callback(lambda t: t.cancelled() or (run.stop() and self.metrics.cancelled.inc()))
            return JSONResponse(await self._collect(run, chat, head, len(choices), prompt_tokens, route, start))
        except _ClientGone:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        finally:
            gone.cancel()

    def _busy(self, exc: QueueFull) -> APIError:
        return APIError(
            503, f"the server is busy: {self.pool.waiting} requests are waiting (MAX_QUEUE); retry later",
            type="server_error", code="queue_full", headers={"Retry-After": str(exc.retry_after_s)},
        )

    async def _acquire(self, gone: asyncio.Future) -> Any:
        """Wait for a slot (FIFO); give up if the client disconnects first."""
        acquiring = asyncio.ensure_future(self.pool.acquire())
        await asyncio.wait({acquiring, gone}, return_when=asyncio.FIRST_COMPLETED)
        if acquiring.done():
            try:
                return acquiring.result()
            except QueueFull as exc:
                raise self._busy(exc) from None
        acquiring.cancel()
        (outcome,) = await asyncio.gather(acquiring, return_exceptions=True)
        if not isinstance(outcome, BaseException):
            self.pool.release(outcome)
        raise _ClientGone()

    def _sampling(self, req: RequestBase) -> SamplingParams:
        """The request's sampling parameters, checked; max_tokens is final only when the request gives it."""
        n_ctx = self.pool.slots[0].n_ctx
        max_tokens = max_tokens_of(req)
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

    def _prepare(self, req: RequestBase, base: SamplingParams) -> list[_Choice]:
        """Worker thread, no slot held: tokenize the prompts, check them against the context, make the choices."""
        model = self.pool.slots[0]  # tokenization only reads the model's vocabulary and template
        chat = isinstance(req, ChatRequest)
        if chat:
            try:
                prompts = [model.chat_prompt([{"role": m.role, "content": m.text()} for m in req.messages])]
            except NoChatTemplate as exc:
                raise APIError(400, str(exc), param="messages") from None
        else:
            prompts = [model.tokenize(p) for p in ([req.prompt] if isinstance(req.prompt, str) else req.prompt)]
        param = "messages" if chat else "prompt"
        for tokens in prompts:
            if not tokens:
                raise APIError(400, "the prompt is empty", param=param)
            if len(tokens) > model.n_ctx:
                raise APIError(
                    400, f"the prompt has {len(tokens)} tokens, more than the context window of {model.n_ctx} tokens "
                    "(shorten it or raise N_CTX)", param=param, code="context_length_exceeded",
                )
        choices, n = [], req.n or 1
        for p, tokens in enumerate(prompts):
            max_tokens = max_tokens_of(req) or (
                max(1, model.n_ctx - len(tokens)) if chat else COMPLETIONS_DEFAULT_MAX_TOKENS
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
        self, choices: list[_Choice], chat: bool, head: dict, prompt_tokens: int, req: RequestBase, route: str,
        start: float,
    ) -> AsyncIterator[str]:
        """The SSE body. It waits for a slot itself, so keep-alive comments go out while it is queued; nothing runs
        unless the body is iterated, and closing it (a lost client) stops the run."""
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        interval = self.settings.sse_keepalive_s or None

        def chunk(index: int, text: str | None, finish: str | None = None, role: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                body: dict[str, Any] = {"index": index, "delta": delta}
            else:
                body = {"index": index, "text": text or ""}
            return {**head, "choices": [{**body, "logprobs": None, "finish_reason": finish}]}

        acquiring = asyncio.ensure_future(self.pool.acquire())
        run: _Run | None = None
        try:
            while not (await asyncio.wait({acquiring}, timeout=interval))[0]:
                yield sse_comment("keep-alive: waiting for a slot")
            run = _Run(self, acquiring.result(), choices)
            self.metrics.prompt_tokens.inc(prompt_tokens)
            completion_tokens, started, first = 0, set(), True
            async for event in _ticking(run, interval):
                if event is _KEEPALIVE:
                    yield sse_comment("keep-alive")
                    continue
                kind, index, value = event
                if first:
                    self.metrics.ttft.labels(route).observe(time.perf_counter() - start)
                    first = False
                if chat and index not in started:
                    started.add(index)
                    yield sse(chunk(index, None, role=True))
                if kind == "piece":
                    yield sse(chunk(index, value))
                else:
                    completion_tokens += len(value.tokens)
                    yield sse({**chunk(index, None, value.finish_reason), "medusa": medusa_info([value.stats])})
            if req.stream_options is not None and req.stream_options.include_usage:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}
                yield sse({**head, "choices": [], "usage": usage})
            yield sse("[DONE]")
        except Exception as exc:  # the status line has gone out: report in the stream, as OpenAI does
            if isinstance(exc, QueueFull):
                message, kind = self._busy(exc).message, "server_error"
            else:
                log.exception("generation failed mid-stream")
                message, kind = f"generation failed: {exc}", "server_error"
            yield sse({"error": {"message": message, "type": kind, "param": None, "code": None}})
        finally:
            if not acquiring.done():
                acquiring.cancel()  # the pool gives back a slot handed over just now
            if run is not None and run.stop():
                self.metrics.cancelled.inc()


def create_app(settings: Settings | None = None, slots: Sequence[Any] | None = None) -> FastAPI:
    """The app. Given `slots` (engine views, Engine.views()), it serves those at once (the caller closes their
    engine); else it loads the engine at startup and closes it at shutdown. No settings: from the environment, so
    that `uvicorn --factory medusa_gguf.server:create_app` works too."""
    settings = Settings.from_env() if settings is None else settings
    server = _Server(settings)
    if slots is not None:
        server.start(slots)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned: Engine | None = None
        if server.pool is None:
            owned = await asyncio.get_running_loop().run_in_executor(None, load_engine, settings)
            log.info("%s", describe(owned, settings))
            server.start(owned.views())
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, server.stop)
            if owned is not None:
                owned.close()

    app = FastAPI(title="medusa-gguf", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(MetricsMiddleware, metrics=server.metrics)

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


def load_engine(settings: Settings) -> Engine:
    """The engine: the model once, one llama.cpp context with N_PARALLEL slots, the drafter once."""
    return Engine(settings, slots=settings.n_parallel)


def describe(engine: Engine, settings: Settings) -> str:
    """One log line saying what is served and how."""
    path = engine.backend.model_path
    mode = "plain" if engine.plain_reason else "medusa"
    return (
        f"serving {path} ({path.stat().st_size / 1e6:.1f} MB) as '{engine.model_name}': {settings.n_parallel} "
        f"slot(s) batched in one context, n_ctx={engine.n_ctx} per request, threads={engine.backend.n_threads}, "
        f"gpu_layers={settings.n_gpu_layers}, decoding={mode}{f' ({engine.plain_reason})' if engine.plain_reason else ''}, "
        f"max_queue={settings.max_queue}, keep-alive every {settings.sse_keepalive_s or 'never'} s, "
        f"api_key={'required' if settings.api_key else 'off'}"
    )


def serve(settings: Settings) -> None:
    """Load the engine, then serve on HOST:PORT until interrupted."""
    import uvicorn

    engine = load_engine(settings)
    try:
        log.info("%s", describe(engine, settings))
        app = create_app(settings, engine.views())
        uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, timeout_graceful_shutdown=5)
    finally:
        engine.close()
