"""Per-request plumbing as plain ASGI: request id, in-flight gauge, metrics, JSON access log,
and admission of inference requests from their headers alone.

Metric labels come from bounded sets only: the matched route's template (or "unmatched"),
a known HTTP method (or "other"), the status code and our own error codes.

Admission sits here, in front of routing, because under overload most requests are refused:
a refusal must cost little CPU (no routing, no dependency resolution, no exception handling,
no pydantic) or refusing itself eats the capacity it protects. For the same reason a refusal
is answered after a short pause (``refusal_delay_ms``): a client that retries at once (a
closed loop without back-off) otherwise spins, each spin a few hundred microseconds of CPU
taken from the requests being served; the pause costs a timer, not CPU. Refusals are counted
in full but logged at most once a second per worker, with the number they stand for.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import time
import uuid
from typing import Any, Final

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from resnet_service.api.metrics import Metrics
from resnet_service.api.problems import INTERNAL_DETAIL, PROBLEM_JSON
from resnet_service.api.state import ServiceState
from resnet_service.errors import RetryLater

access_log = logging.getLogger("resnet_service.access")

_REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: A 503 from a readiness probe is an answer, not a rejected request.
_PROBES: Final = frozenset({"/healthz", "/readyz", "/metrics"})
#: Routes where a refused request means one refused image.
_SINGLE_IMAGE_ROUTES: Final = frozenset({"/classify"})
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Inference routes admitted by predicted wait (exact paths; OIP paths by pattern).
_ADMITTED_PATHS: Final = frozenset({"/classify", "/classify/batch"})
_OIP_INFER: Final = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")
OIP_INFER_ROUTE: Final = "/v2/models/{model_name}/infer"
_REFUSAL_LOG_INTERVAL_S: Final = 1.0


def method_label(method: str) -> str:
    """A bounded label: made-up methods must not create a time series each."""
    return method if method in _METHODS else "other"


class RequestIds:
    """New request ids: a random per-process prefix and a counter (unique, and without a
    urandom system call per request as ``uuid4`` costs)."""

    def __init__(self) -> None:
        self._prefix = uuid.uuid4().hex[:12]
        self._counter = itertools.count(1)

    def new(self) -> str:
        return f"{self._prefix}{next(self._counter):08x}"


def request_id_from(scope: Scope, ids: RequestIds) -> str:
    """The caller's X-Request-ID when it is sane, else a new one."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate: str = value.decode("latin-1")
            if _REQUEST_ID.match(candidate):
                return candidate
    return ids.new()


def problem_bytes(
    scope: Scope, request_id: str, status: int, code: str, title: str, detail: str
) -> bytes:
    """An RFC 9457 body, built without pydantic (this is the hot path of a refusal)."""
    return json.dumps(
        {
            "type": "about:blank",
            "title": title,
            "status": status,
            "detail": detail,
            "code": code,
            "instance": scope.get("path"),
            "request_id": request_id,
        }
    ).encode()


async def send_problem(
    send: Send,
    body: bytes,
    status: int,
    extra_headers: list[tuple[bytes, bytes]],
    content_type: bytes = PROBLEM_JSON.encode(),
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *extra_headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def admitted_route(scope: Scope) -> str | None:
    """The route template of an inference request subject to admission, else None."""
    if scope["method"] != "POST":
        return None
    path: str = scope["path"]
    if path in _ADMITTED_PATHS:
        return path
    return OIP_INFER_ROUTE if _OIP_INFER.match(path) else None


class AdmissionMiddleware:
    """Admit or refuse an inference request before it is routed or its upload read.

    An admitted request carries its ticket in ``scope["state"]["ticket"]`` (the route calls
    ``ticket.uploaded()`` once the body is in); the ticket is released when the request ends.
    """

    def __init__(self, app: ASGIApp, service: ServiceState) -> None:
        self.app = app
        self.service = service
        self.refusal_delay_s = service.settings.refusal_delay_ms / 1000

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (route := admitted_route(scope)) is None:
            await self.app(scope, receive, send)
            return
        classifier = self.service.classifier
        if classifier is None:  # still loading: the route answers not_ready
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        try:
            ticket = classifier.admit()
        except RetryLater as exc:
            state["route"] = route
            state["error_code"] = exc.code
            if route == OIP_INFER_ROUTE:  # the protocol's own error body
                body = json.dumps({"error": exc.detail}).encode()
                content_type = b"application/json"
            else:
                body = problem_bytes(
                    scope, state["request_id"], 503, exc.code, exc.title, exc.detail
                )
                content_type = PROBLEM_JSON.encode()
            if self.refusal_delay_s:
                await asyncio.sleep(self.refusal_delay_s)  # pacing: see the module docstring
            retry = (b"retry-after", str(exc.retry_after_s).encode())
            await send_problem(send, body, 503, [retry], content_type)
            return
        state["ticket"] = ticket
        try:
            await self.app(scope, receive, send)
        finally:
            ticket.uploaded()


class RefusalLog:
    """At most one access-log line a second for refusals, saying how many it stands for."""

    def __init__(self) -> None:
        self.last = 0.0
        self.suppressed = 0

    def take(self, now: float) -> int | None:
        """The count to report now (this one included), or None to stay quiet."""
        if now - self.last < _REFUSAL_LOG_INTERVAL_S:
            self.suppressed += 1
            return None
        count, self.suppressed, self.last = self.suppressed + 1, 0, now
        return count


class RequestContextMiddleware:
    """Wraps every HTTP request: id in and out, in-flight gauge, counters, access log line."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self.refusals = RefusalLog()
        self.ids = RequestIds()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope, self.ids)
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        status_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, status_started
            if message["type"] == "http.response.start":
                status = message["status"]
                status_started = True
                MutableHeaders(scope=message).append("X-Request-ID", request_id)
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Never for bad input; answered here (not by Starlette's outer error middleware)
            # so a 500 still carries the request id and is counted and logged.
            access_log.exception("unhandled error, request %s", request_id)
            state["error_code"] = "internal_error"
            if status_started:
                raise
            body = problem_bytes(
                scope, request_id, 500, "internal_error", "Internal error", INTERNAL_DETAIL
            )
            await send_problem(send_with_id, body, 500, [])
        finally:
            self.metrics.in_flight.dec()
            self._record(scope, state, status, time.perf_counter() - started)

    def _record(self, scope: Scope, state: dict[str, Any], status: int, elapsed: float) -> None:
        route = getattr(scope.get("route"), "path", None) or state.get("route") or "unmatched"
        self.metrics.requests.labels(route, method_label(scope["method"]), str(status)).inc()
        self.metrics.worker_requests.inc()
        self.metrics.request_latency.labels(route).observe(elapsed)
        code = state.get("error_code")
        if code and route not in _PROBES:
            self.metrics.rejections.labels(code).inc()
            if route in _SINGLE_IMAGE_ROUTES:
                self.metrics.images.labels("error").inc()
        if not access_log.isEnabledFor(logging.INFO):
            return
        if code == "overloaded":
            count = self.refusals.take(time.monotonic())
            if count is None:
                return
            state["refusals_logged_as_one"] = count
        _log(scope, state, route, status, elapsed)


def _log(scope: Scope, state: dict[str, Any], route: str, status: int, elapsed: float) -> None:
    line: dict[str, Any] = {
        "event": "request",
        "request_id": state["request_id"],
        "method": scope["method"][:16],
        "route": route,
        "path": scope.get("path", "")[:256],
        "status": status,
        "duration_ms": round(elapsed * 1000, 3),
    }
    if (client := scope.get("client")) is not None:
        line["client"] = client[0]
    if "images" in state:
        line["images"] = state["images"]
    if (timings := state.get("timings")) is not None:
        line["decode_ms"] = round(timings.decode_s * 1000, 3)
        line["queue_ms"] = round(timings.queue_s * 1000, 3)
        line["inference_ms"] = round(timings.inference_s * 1000, 3)
    if (code := state.get("error_code")) is not None:
        line["error_code"] = code
    if (count := state.get("refusals_logged_as_one")) is not None:
        line["refusals"] = count
    access_log.info(json.dumps(line))
