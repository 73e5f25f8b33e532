"""Prometheus metrics of one app (a registry of its own, so apps and tests never share counters), and the middleware
that counts and times every HTTP request."""
from __future__ import annotations

import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .pool import SlotPool

ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


class Metrics:
    """Prometheus metrics in a registry of their own (one per app, so apps and tests never share counters)."""

    def __init__(self, pool_ref: Callable[[], SlotPool | None], batch_ref: Callable[[], Any] = lambda: None) -> None:
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
        Gauge("medusa_queue_depth", "requests waiting for a slot", registry=r).set_function(
            lambda: pool.waiting if (pool := pool_ref()) else 0
        )
        Gauge("medusa_slots_busy", "slots serving a request", registry=r).set_function(
            lambda: pool.busy if (pool := pool_ref()) else 0
        )
        Gauge("medusa_batch_calls", "llama.cpp decode calls of the batched slots since start", registry=r).set_function(
            lambda: stats.calls if (stats := batch_ref()) else 0
        )
        Gauge("medusa_batch_tokens", "tokens those calls decoded (steps, trees, prompt chunks)", registry=r
              ).set_function(lambda: stats.tokens if (stats := batch_ref()) else 0)


class MetricsMiddleware:
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
