"""Per-request plumbing as plain ASGI: request id, in-flight gauge, metrics, JSON access log,
and admission of inference requests from their headers alone.

Metric labels come from bounded sets only: the matched route's template (or "unmatched"),
a known HTTP method (or "other"), the status code and our own error codes.

Admission (``AdmissionGate``) is decided from the request head alone, because under overload
most requests are refused: a refusal must cost little CPU or refusing itself eats the capacity
it protects. In a served worker the gate runs in the HTTP protocol layer, before the ASGI
stack is entered at all (``HeadAdmission``, hooked into ``server.http``); the ASGI
``AdmissionMiddleware`` applies the same gate where there is no such protocol (in-process
tests, ``uvicorn --factory``, the h11 parser). A refusal is answered after a short pause
(``refusal_delay_ms``): a client that retries at once (a closed loop without back-off)
otherwise spins, each spin CPU taken from the requests being served; the pause costs a timer,
not CPU. Refusals are counted in full but logged at most once a second per worker, with the
number they stand for.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qs, unquote

from opentelemetry import trace
from opentelemetry.trace import Span
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from resnet_service.asgi.problems import (
    INTERNAL_DETAIL,
    PROBLEM_JSON,
    PROBLEM_SHAPE,
    ErrorShape,
    error_headers,
    problem_body,
)
from resnet_service.asgi.refusal_tally import RefusalKey, RefusalTally
from resnet_service.core import priority
from resnet_service.core.admission import Ticket
from resnet_service.core.errors import RetryLater, ServiceError
from resnet_service.core.priority import Priority
from resnet_service.logs import request_id_var
from resnet_service.service import tracing
from resnet_service.service.metrics import Metrics
from resnet_service.service.state import ServiceState

access_log = logging.getLogger("resnet_service.access")

_REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: A 503 from a readiness probe is an answer, not a rejected request.
_PROBES: Final = frozenset({"/healthz", "/readyz", "/metrics"})
#: Routes where a refused request means one refused image.
_SINGLE_IMAGE_ROUTES: Final = frozenset({"/classify", "/embed", "/explain"})
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Inference routes admitted by predicted wait (exact paths; OIP paths by pattern).
_ADMITTED_PATHS: Final = frozenset(
    {"/classify", "/classify/batch", "/embed", "/embed/batch", "/explain"}
)
_OIP_INFER: Final = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
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


async def send_problem(send: Send, body: bytes, status: int) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", PROBLEM_JSON.encode()),
                (b"content-length", str(len(body)).encode()),
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


def requested_priority(scope: Scope) -> Priority:
    """The class a request asks for with RFC 9218's ``Priority`` header (``u=7``: bulk)."""
    for name, value in scope["headers"]:
        if name == b"priority":
            return priority.from_header(value.decode("latin-1"))
    return priority.INTERACTIVE


def requested_model(scope: Scope, route: str) -> tuple[str | None, str | None]:
    """The model and version a request names: OIP in its path, the JSON API in its query
    (``?model=NAME&version=V``); (None, None) for the default model."""
    if route == OIP_INFER_ROUTE:
        match = _OIP_INFER.match(scope["path"])
        return (
            (unquote(match[1]), unquote(match[2]) if match[2] else None) if match else (None, None)
        )
    query: bytes = scope.get("query_string", b"")
    if b"model" not in query and b"version" not in query:
        return None, None  # the common case: no parsing
    params = parse_qs(query.decode("latin-1"))
    model, version = params.get("model", [None])[-1], params.get("version", [None])[-1]
    return model or None, version or None


@dataclass(frozen=True, slots=True)
class Refusal:
    """A whole 503 answer, decided from the head: what either layer sends as it is."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class AdmissionGate:
    """Admit an inference request (its ticket goes to ``scope["state"]["ticket"]``; the
    route calls ``ticket.uploaded()`` once the body is in, and whoever runs the request
    releases it when it ends) or refuse it, from the request head alone."""

    def __init__(self, service: ServiceState, shapes: Mapping[str, ErrorShape]) -> None:
        self.service = service
        self.shapes = shapes
        self.tracing = tracing.wanted(service.settings)

    def decide(self, scope: Scope, state: dict[str, Any]) -> Refusal | None:
        """None when admitted or not subject to admission; else the refusal to send."""
        route = admitted_route(scope)
        if route is None:
            return None
        model, version = requested_model(scope, route)
        wanted = state["priority"] = requested_priority(scope)
        try:
            with priority.requested(wanted):
                admit = tracing.admitter(self.tracing)
                classifier, ticket = self.service.admit(model, version, admit)
        except RetryLater as exc:
            return self._refuse(scope, state, route, exc)
        except ServiceError:
            return None  # an unknown model or version: the route answers that
        state["classifier"] = classifier  # the route serves the version admission chose
        state["ticket"] = ticket
        return None

    def _refuse(self, scope: Scope, state: dict[str, Any], route: str, exc: RetryLater) -> Refusal:
        state["route"] = route
        state["error_code"] = exc.code
        shape = self.shapes.get(route, PROBLEM_SHAPE)
        return _refusal(shape, scope, state["request_id"], exc)


def _refusal(shape: ErrorShape, scope: Scope, request_id: str, exc: RetryLater) -> Refusal:
    body = shape.build(exc, scope.get("path"), request_id)
    headers = [
        (b"content-type", shape.content_type),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode(), value.encode()) for name, value in error_headers(exc).items()),
        (b"x-request-id", request_id.encode()),
    ]
    return Refusal(503, headers, body)


class HeadAdmission:
    """The gate as the HTTP protocol layer calls it, before any ASGI code runs: it gives the
    request its id and, for a refusal, does the request-context bookkeeping (metrics, the
    rate-limited access log) that ``RequestContextMiddleware`` would have done."""

    def __init__(
        self, service: ServiceState, recorder: RequestRecorder, shapes: Mapping[str, ErrorShape]
    ) -> None:
        self.gate = AdmissionGate(service, shapes)
        self.recorder = recorder
        self.delay_s = service.settings.refusal_delay_ms / 1000

    def __call__(self, scope: Scope) -> Refusal | None:
        if scope["method"] != "POST":
            return None  # the common probes and pages: not a dictionary look-up more
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id_from(scope, self.recorder.ids)
        if not self.gate.tracing:
            refusal = self.gate.decide(scope, state)
        else:  # the request's span starts here; RequestContextMiddleware carries it on
            span = state["span"] = request_span(scope, state)
            with trace.use_span(span, end_on_exit=False):
                refusal = self.gate.decide(scope, state)
                if refusal is not None:
                    finish_request_span(span, scope, state, refusal.status)
        if refusal is not None:
            self.recorder.record_refusal(scope, state)
        return refusal


class AdmissionMiddleware:
    """The gate inside the ASGI stack, where no protocol layer applied it; releases the
    ticket of every admitted request when it ends (whichever layer admitted it)."""

    def __init__(
        self, app: ASGIApp, service: ServiceState, shapes: Mapping[str, ErrorShape]
    ) -> None:
        self.app = app
        self.gate = AdmissionGate(service, shapes)
        self.refusal_delay_s = service.settings.refusal_delay_ms / 1000

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        if "ticket" not in state and (refusal := self.gate.decide(scope, state)) is not None:
            if self.refusal_delay_s:
                await asyncio.sleep(self.refusal_delay_s)  # pacing: see the module docstring
            headers = [h for h in refusal.headers if h[0] != b"x-request-id"]  # added outside
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": refusal.body})
            return
        ticket: Ticket | None = state.get("ticket")
        try:
            with priority.requested(state.get("priority") or requested_priority(scope)):
                await self.app(scope, receive, send)
        finally:
            if ticket is not None:
                ticket.release()


def request_span(scope: Scope, state: dict[str, Any]) -> Span:
    """The request's SERVER span, continuing the caller's ``traceparent`` (tracing on)."""
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
    method = method_label(scope["method"])
    attributes = {
        "http.request.method": method,
        "url.path": scope.get("path", "")[:256],
        "request.id": state["request_id"],
    }
    return tracing.start_request(f"{method} {scope.get('path', '')[:64]}", headers, attributes)


def finish_request_span(span: Span, scope: Scope, state: dict[str, Any], status: int) -> None:
    """Name the span by its route template (bounded), say the status, end it."""
    route = getattr(scope.get("route"), "path", None) or state.get("route") or "unmatched"
    span.update_name(f"{method_label(scope['method'])} {route}")
    span.set_attributes({"http.route": route, "http.response.status_code": status})
    tracing.finish_request(span, state.get("error_code"), failed=status >= 500)


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


class RequestRecorder:
    """Counts and logs one finished request (metrics, access log); shared by the ASGI
    middleware and the protocol-layer refusals."""

    def __init__(self, metrics: Metrics, json_lines: bool = False) -> None:
        self.metrics = metrics
        #: The access line as a JSON log record's fields (json logs) or as its message (text).
        self.json_lines = json_lines
        self.refusals = RefusalLog()
        self.tally = RefusalTally(metrics)
        self.ids = RequestIds()
        # Label children by their (bounded) label values: ``labels()`` takes a lock and
        # builds a key per call, a visible share of a refusal's few microseconds.
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._rejections: dict[str, Any] = {}

    def _series(self, route: str, method: str, status: int) -> tuple[Any, Any]:
        key = (route, method_label(method), str(status))
        series = self._children.get(key)
        if series is None:
            series = (
                self.metrics.requests.labels(*key),
                self.metrics.request_latency.labels(route),
            )
            self._children[key] = series
        return series

    def record_refusal(self, scope: Scope, state: dict[str, Any]) -> None:
        """A refusal answered from the request head: counted in the tally (batched), logged
        as ``record`` logs refusals."""
        route: str = state.get("route") or "unmatched"
        code: str = state.get("error_code") or "overloaded"
        key = RefusalKey(
            route,
            method_label(scope["method"]),
            code,
            state.get("priority"),
            route in _SINGLE_IMAGE_ROUTES,
        )
        self.tally.add(key)
        if access_log.isEnabledFor(logging.INFO) and (
            count := self.refusals.take(time.monotonic())
        ):
            state["refusals_logged_as_one"] = count
            _log(scope, state, route, 503, 0.0, self.json_lines)

    def record(self, scope: Scope, state: dict[str, Any], status: int, elapsed: float) -> None:
        route = getattr(scope.get("route"), "path", None) or state.get("route") or "unmatched"
        requests, latency = self._series(route, scope["method"], status)
        requests.inc()
        self.metrics.worker_requests.inc()
        latency.observe(elapsed)
        code = state.get("error_code")
        if (wanted := state.get("priority")) is not None:  # an inference request
            self.metrics.count_priority(wanted, status < 400, code, elapsed)
        if code and route not in _PROBES:
            rejections = self._rejections.get(code)
            if rejections is None:
                rejections = self._rejections[code] = self.metrics.rejections.labels(code)
            rejections.inc()
            if route in _SINGLE_IMAGE_ROUTES:
                self.metrics.images.labels("error").inc()
        if not access_log.isEnabledFor(logging.INFO):
            return
        if code == "overloaded":
            count = self.refusals.take(time.monotonic())
            if count is None:
                return
            state["refusals_logged_as_one"] = count
        _log(scope, state, route, status, elapsed, self.json_lines)


class RequestContextMiddleware:
    """Wraps every HTTP request: id in and out, in-flight gauge, counters, access log line."""

    def __init__(self, app: ASGIApp, recorder: RequestRecorder, tracing: bool = False) -> None:
        self.app = app
        self.recorder = recorder
        self.metrics = recorder.metrics
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        # Given already when the protocol layer admitted the request.
        request_id: str = state.get("request_id") or request_id_from(scope, self.recorder.ids)
        state["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                state["status_started"] = True
                MutableHeaders(scope=message).append("X-Request-ID", request_id)
            await send(message)

        self.metrics.in_flight.inc()
        token = request_id_var.set(request_id)
        span = (state.get("span") or request_span(scope, state)) if self.tracing else None
        try:
            if span is None:
                await self._call(scope, receive, send_with_id, state, request_id)
            else:
                with trace.use_span(span, end_on_exit=False):
                    await self._call(scope, receive, send_with_id, state, request_id)
        finally:
            request_id_var.reset(token)
            self.metrics.in_flight.dec()
            if span is not None:
                finish_request_span(span, scope, state, status)
            self.recorder.record(scope, state, status, time.perf_counter() - started)

    async def _call(
        self, scope: Scope, receive: Receive, send: Send, state: dict[str, Any], request_id: str
    ) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception:
            # Never for bad input; answered here (not by Starlette's outer error middleware)
            # so a 500 still carries the request id and is counted and logged.
            access_log.exception("unhandled error, request %s", request_id)
            state["error_code"] = "internal_error"
            if state.get("status_started"):
                raise
            body = problem_body(
                status=500,
                code="internal_error",
                title="Internal error",
                detail=INTERNAL_DETAIL,
                instance=scope.get("path"),
                request_id=request_id,
            )
            await send_problem(send, body, 500)


def _log(
    scope: Scope, state: dict[str, Any], route: str, status: int, elapsed: float, fields: bool
) -> None:
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
    if (classifier := state.get("classifier")) is not None:  # the version that answered
        line["model"], line["version"] = classifier.name, classifier.version
    if (wanted := state.get("priority")) is not None:  # an inference request's class
        line["priority"] = wanted
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
    if (span := state.get("span")) is not None:
        line["trace_id"] = trace.format_trace_id(span.get_span_context().trace_id)
    if fields:
        access_log.info("request", extra=line)
    else:
        access_log.info(json.dumps(line))
