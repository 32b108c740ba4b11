"""The outermost ASGI layer of every HTTP request: its context and id (in, and out as
``X-Request-ID``), the in-flight gauge, its span, the record of it when it ends
(``access_log.RequestRecorder``), and a problem+json 500 for an error nothing else answered."""

from __future__ import annotations

import time

from opentelemetry import trace
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from resnet_service.asgi.access_log import RequestRecorder, access_log
from resnet_service.asgi.context import RequestContext, open_context
from resnet_service.asgi.problems import INTERNAL_DETAIL, PROBLEM_JSON, problem_body
from resnet_service.asgi.spans import finish_request_span, request_span
from resnet_service.logs import request_id_var


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
        # Opened already when the protocol layer admitted the request.
        context = open_context(scope, self.recorder.ids)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                context.response_started = True
                MutableHeaders(scope=message).append("X-Request-ID", context.request_id)
            await send(message)

        self.metrics.in_flight.inc()
        token = request_id_var.set(context.request_id)
        span = None
        if self.tracing:
            span = context.span = context.span or request_span(scope, context)
        try:
            if span is None:
                await self._call(scope, receive, send_with_id, context)
            else:
                with trace.use_span(span, end_on_exit=False):
                    await self._call(scope, receive, send_with_id, context)
        finally:
            request_id_var.reset(token)
            self.metrics.in_flight.dec()
            if span is not None:
                finish_request_span(span, scope, context, status)
            self.recorder.record(scope, context, status, time.perf_counter() - started)

    async def _call(
        self, scope: Scope, receive: Receive, send: Send, context: RequestContext
    ) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception:
            # Never for bad input; answered here (not by Starlette's outer error middleware)
            # so a 500 still carries the request id and is counted and logged.
            access_log.exception("unhandled error, request %s", context.request_id)
            context.error_code = "internal_error"
            if context.response_started:
                raise
            body = problem_body(
                status=500,
                code="internal_error",
                title="Internal error",
                detail=INTERNAL_DETAIL,
                instance=scope.get("path"),
                request_id=context.request_id,
            )
            await send_problem(send, body, 500)
