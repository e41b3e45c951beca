"""Prometheus metrics of the inference API (GET /metrics): requests, latency and errors by
endpoint, model and error kind, and the requests in flight.

`MetricsMiddleware` sits outside everything else of ours, so it also counts what is refused
before an endpoint runs (a body over the cap, a missing password). Labels come from a fixed
set, never from what a client typed: the endpoint is the route's template
(`/v2/models/{name}/infer`), the model a catalog key or "none", so a stream of made-up model
names cannot grow the metrics without bound. The page's own traffic (Gradio's upload, queue
and file routes) is not measured here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.routing import BaseRoute, Match

from serving.limits import ASGIApp, Message, Receive, Scope, Send

# A classification takes about a millisecond; a big upload or a busy server, up to seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
NO_MODEL = "none"
# Where an endpoint records what it learnt (request.state, i.e. scope["state"]).
MODEL_STATE = "metrics_model"
ERROR_STATE = "metrics_error"
# The error kind of an answer no endpoint described (refused before one ran).
STATUS_KINDS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    503: "overloaded",
}


class Metrics:
    """The API's metrics, in a registry of their own: two servers in one process (the tests
    start several) must not share or collide on counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        by = ["endpoint", "model"]
        self.requests = Counter(
            "toolkit_requests",
            "API requests answered, by endpoint, model and HTTP status",
            [*by, "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "toolkit_request_duration_seconds",
            "Time from a request's arrival to the end of its answer",
            by,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "toolkit_request_errors",
            "API requests refused or failed, by endpoint, model and error kind",
            [*by, "kind"],
            registry=self.registry,
        )
        self.images = Counter(
            "toolkit_images",
            "Images classified through the API, by model",
            ["model"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "toolkit_requests_in_flight",
            "Inference requests being answered or waiting for a worker now",
            registry=self.registry,
        )

    def observe(
        self, endpoint: str, model: str, status: int, seconds: float, kind: str | None
    ) -> None:
        self.requests.labels(endpoint, model, str(status)).inc()
        self.latency.labels(endpoint, model).observe(seconds)
        if kind:
            self.errors.labels(endpoint, model, kind).inc()

    def render(self) -> tuple[bytes, str]:
        """The text exposition format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """ASGI middleware: times and counts every request that one of `routes` would answer."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def endpoint(self, scope: Scope) -> str | None:
        """The template of the API route this request is for; None for anything else."""
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return getattr(route, "path", None)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.endpoint(scope) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        status = 500  # what a request that raised past every handler became

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, watched)
        finally:
            kind = state.get(ERROR_STATE)
            if kind is None and status >= 400:
                kind = STATUS_KINDS.get(status, "internal" if status >= 500 else f"http_{status}")
            self.metrics.observe(
                endpoint,
                state.get(MODEL_STATE, NO_MODEL),
                status,
                time.perf_counter() - start,
                kind,
            )
