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

access_log = logging.getLogger("resnet_service.access")

_REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id_from(scope: Scope) -> str:
    """The caller's X-Request-ID when it is sane, else a new one."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate: str = value.decode("latin-1")
            if _REQUEST_ID.match(candidate):
                return candidate
    return uuid.uuid4().hex


def _too_large_problem(scope: Scope, request_id: str) -> bytes:
    route = scope.get("route")
    limit = getattr(route, "max_body_size", None)
    detail = "The request body is larger than this route accepts"
    detail += f" ({limit} bytes)." if limit else "."
    return json.dumps(
        {
            "type": "about:blank",
            "title": "Upload too large",
            "status": 413,
            "detail": detail,
            "code": "upload_too_large",
            "instance": scope.get("path"),
            "request_id": request_id,
        }
    ).encode()


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

        async def send_with_id(message: Message) -> None:
            nonlocal status, replace_body
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                if status == 413 and headers.get("content-type", "").startswith("text/plain"):
                    # Starlette's per-route body limiter answers in plain text; keep the
                    # one error body of this API.
                    replace_body = _too_large_problem(scope, request_id)
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
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.request_latency.labels(route).observe(elapsed)
            code = state.get("error_code")
            if code:
                self.metrics.rejections.labels(code).inc()
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
