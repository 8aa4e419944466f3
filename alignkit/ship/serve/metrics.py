"""`GET /metrics`: requests, tokens, queue depth, batch sizes and latency in Prometheus' text format, plus the
ASGI middleware that counts every request (and checks the API key before anything else runs)."""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The server's Prometheus series, in a registry of its own (several servers in one process stay apart)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("alignkit_requests", "HTTP requests answered", ["path", "status"], registry=r)
        self.prompt_tokens = Counter(
            "alignkit_prompt_tokens", "prompt tokens of answered requests", registry=r
        )
        self.completion_tokens = Counter("alignkit_completion_tokens", "tokens generated", registry=r)
        self.cancelled = Counter(
            "alignkit_cancelled_rows", "answers stopped because the client left", registry=r
        )
        self.queue_depth = Gauge("alignkit_queue_depth", "requests waiting for a generation pass", registry=r)
        self.running = Gauge("alignkit_requests_running", "requests being answered", registry=r)
        self.latency = Histogram(
            "alignkit_request_latency_seconds",
            "time to the last byte",
            ["path"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "alignkit_batch_rows",
            "answers that entered generation together (one pass; continuous batching: one admission)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )


class MetricsAndAuth:
    """Pure ASGI middleware (streaming-safe): a missing or wrong bearer token on /v1/* is a 401 before the
    body is read; every answered request is counted with its status and timed to its last byte."""

    def __init__(self, app: Any, metrics: Metrics, api_key: str | None) -> None:
        self.app = app
        self.metrics = metrics
        self.api_key = api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.api_key and path.startswith("/v1/") and not self._authorized(scope):
            await _send_json(send, 401, _auth_error())
            self.metrics.requests.labels(_path_label(path), "401").inc()
            return
        start, status = time.monotonic(), {"code": 500}

        async def record(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.metrics.running.inc()
        try:
            await self.app(scope, receive, record)
        finally:
            self.metrics.running.dec()
            label = _path_label(path)
            self.metrics.requests.labels(label, str(status["code"])).inc()
            self.metrics.latency.labels(label).observe(time.monotonic() - start)

    def _authorized(self, scope: dict) -> bool:
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )


PATHS = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/feedback", "/health", "/metrics")


def _path_label(path: str) -> str:
    """The route a request went to, or `other`: a label per path a client invents would grow without end."""
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return path if path in PATHS else "other"


def _auth_error() -> dict:
    return {
        "error": {
            "message": "missing or wrong API key: send the header `Authorization: Bearer <key>`",
            "type": "authentication_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }


async def _send_json(send: Any, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
