"""Per-request plumbing as plain ASGI: request id, in-flight gauge, metrics and a JSON access log."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any, Final

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from resnet_service.api.metrics import Metrics
from resnet_service.api.problems import INTERNAL_DETAIL, PROBLEM_JSON, TOO_LARGE_DETAIL
from resnet_service.api.schemas import Problem

access_log = logging.getLogger("resnet_service.access")

_REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: A 503 from a readiness probe is an answer, not a rejected request.
_PROBES: Final = frozenset({"/healthz", "/readyz", "/metrics"})


def request_id_from(scope: Scope) -> str:
    """The caller's X-Request-ID when it is sane, else a new one."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate: str = value.decode("latin-1")
            if _REQUEST_ID.match(candidate):
                return candidate
    return uuid.uuid4().hex


def _problem_body(
    scope: Scope, request_id: str, status: int, code: str, title: str, detail: str
) -> bytes:
    return (
        Problem(
            title=title,
            status=status,
            detail=detail,
            code=code,
            instance=scope.get("path"),
            request_id=request_id,
        )
        .model_dump_json(exclude_none=True)
        .encode()
    )


class RequestContextMiddleware:
    """Wraps every HTTP request: id in and out, in-flight gauge, counters, access log line."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope)
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        replace_body: bytes | None = None

        status_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, replace_body, status_started
            if message["type"] == "http.response.start":
                status = message["status"]
                status_started = True
                headers = MutableHeaders(scope=message)
                if status == 413 and headers.get("content-type", "").startswith("text/plain"):
                    # Starlette's per-route body limiter answers in plain text; keep the
                    # one error body of this API.
                    replace_body = _problem_body(
                        scope,
                        request_id,
                        413,
                        "upload_too_large",
                        "Upload too large",
                        TOO_LARGE_DETAIL,
                    )
                    headers["content-type"] = "application/problem+json"
                    headers["content-length"] = str(len(replace_body))
                    state["error_code"] = "upload_too_large"
                headers.append("X-Request-ID", request_id)
            elif message["type"] == "http.response.body" and replace_body is not None:
                message = {"type": "http.response.body", "body": replace_body, "more_body": False}
                replace_body = None
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
            body = _problem_body(
                scope, request_id, 500, "internal_error", "Internal error", INTERNAL_DETAIL
            )
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", PROBLEM_JSON.encode()),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send_with_id({"type": "http.response.body", "body": body})
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.request_latency.labels(route).observe(elapsed)
            code = state.get("error_code")
            if code and route not in _PROBES:
                self.metrics.rejections.labels(code).inc()
                if route == "/classify":
                    self.metrics.images.labels("error").inc()
            self._log(scope, state, route, status, elapsed)

    @staticmethod
    def _log(scope: Scope, state: dict[str, Any], route: str, status: int, elapsed: float) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        line: dict[str, Any] = {
            "event": "request",
            "request_id": state["request_id"],
            "method": scope["method"],
            "route": route,
            "path": scope.get("path"),
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
        access_log.info(json.dumps(line))
