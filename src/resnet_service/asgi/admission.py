"""Admission of inference requests from their head alone, in either layer that sees it first.

Under overload most requests are refused: a refusal must cost little CPU, or refusing itself
eats the capacity it protects. In a served worker the gate runs in the HTTP protocol layer,
before the ASGI stack is entered at all (``HeadAdmission``, hooked into ``server.http``); the
ASGI ``AdmissionMiddleware`` applies the same gate where there is no such protocol (in-process
tests, ``uvicorn --factory``, the h11 parser). A refusal is answered after a short pause
(``refusal_delay_ms``): a client that retries at once (a closed loop without back-off)
otherwise spins, each spin CPU taken from the requests being served; the pause costs a timer,
not CPU. Which routes are admitted, and how each names its model, the faces declare
(``routes.RouteTable``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from opentelemetry import trace
from starlette.types import ASGIApp, Receive, Scope, Send

from resnet_service.asgi.access_log import RequestRecorder
from resnet_service.asgi.context import RequestContext, open_context
from resnet_service.asgi.problems import error_headers
from resnet_service.asgi.routes import AdmittedRoute, RouteTable
from resnet_service.asgi.spans import finish_request_span, request_span
from resnet_service.core import priority
from resnet_service.core.errors import ModelCold, RetryLater, ServiceError
from resnet_service.core.priority import Priority
from resnet_service.service import tracing
from resnet_service.service.state import ServiceState


def requested_priority(scope: Scope) -> Priority:
    """The class a request asks for with RFC 9218's ``Priority`` header (``u=7``: bulk)."""
    for name, value in scope["headers"]:
        if name == b"priority":
            return priority.from_header(value.decode("latin-1"))
    return priority.INTERACTIVE


@dataclass(frozen=True, slots=True)
class Refusal:
    """A whole 503 answer, decided from the head: what either layer sends as it is."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class AdmissionGate:
    """Admit an inference request (its ticket goes to its context; the route calls
    ``ticket.uploaded()`` once the body is in, and whoever runs the request releases it when
    it ends) or refuse it, from the request head alone."""

    def __init__(self, service: ServiceState, routes: RouteTable) -> None:
        self.service = service
        self.routes = routes
        self.tracing = tracing.wanted(service.settings)

    def decide(self, scope: Scope, context: RequestContext) -> Refusal | None:
        """None when admitted or not subject to admission; else the refusal to send."""
        route = self.routes.admitted_route(scope)
        if route is None:
            return None
        model, version = route.names_model(scope)
        wanted = context.priority = requested_priority(scope)
        try:
            with priority.requested(wanted):
                admit = tracing.admitter(self.tracing)
                classifier, ticket = self.service.admit(model, version, admit)
        except ModelCold:
            return None  # models on demand: the route waits for the load
        except RetryLater as exc:
            context.route, context.error_code = route.template, exc.code
            return _refusal(route, scope, context.request_id, exc)
        except ServiceError:
            return None  # an unknown model or version: the route answers that
        context.classifier = classifier  # the route serves the version admission chose
        context.ticket = ticket
        return None


def _refusal(route: AdmittedRoute, scope: Scope, request_id: str, exc: RetryLater) -> Refusal:
    body = route.shape.build(exc, scope.get("path"), request_id)
    headers = [
        (b"content-type", route.shape.content_type),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode(), value.encode()) for name, value in error_headers(exc).items()),
        (b"x-request-id", request_id.encode()),
    ]
    return Refusal(503, headers, body)


class HeadAdmission:
    """The gate as the HTTP protocol layer calls it, before any ASGI code runs: it opens the
    request's context and, for a refusal, does the bookkeeping (metrics, the rate-limited
    access log) that ``RequestContextMiddleware`` would have done."""

    def __init__(self, service: ServiceState, recorder: RequestRecorder, routes: RouteTable):
        self.gate = AdmissionGate(service, routes)
        self.recorder = recorder
        self.delay_s = service.settings.refusal_delay_ms / 1000

    def __call__(self, scope: Scope) -> Refusal | None:
        if scope["method"] != "POST":
            return None  # the common probes and pages: not a dictionary look-up more
        context = open_context(scope, self.recorder.ids)
        if not self.gate.tracing:
            refusal = self.gate.decide(scope, context)
        else:  # the request's span starts here; RequestContextMiddleware carries it on
            span = context.span = request_span(scope, context)
            with trace.use_span(span, end_on_exit=False):
                refusal = self.gate.decide(scope, context)
                if refusal is not None:
                    finish_request_span(span, scope, context, refusal.status)
        if refusal is not None:
            self.recorder.record_refusal(scope, context)
        return refusal


class AdmissionMiddleware:
    """The gate inside the ASGI stack, where no protocol layer applied it; releases the
    ticket of every admitted request when it ends (whichever layer admitted it)."""

    def __init__(
        self, app: ASGIApp, service: ServiceState, recorder: RequestRecorder, routes: RouteTable
    ) -> None:
        self.app = app
        self.gate = AdmissionGate(service, routes)
        self.ids = recorder.ids
        self.refusal_delay_s = service.settings.refusal_delay_ms / 1000

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context = open_context(scope, self.ids)
        if context.ticket is None and (refusal := self.gate.decide(scope, context)) is not None:
            if self.refusal_delay_s:
                await asyncio.sleep(self.refusal_delay_s)  # pacing: see the module docstring
            headers = [h for h in refusal.headers if h[0] != b"x-request-id"]  # added outside
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": refusal.body})
            return
        ticket = context.ticket
        try:
            with priority.requested(context.priority or requested_priority(scope)):
                await self.app(scope, receive, send)
        finally:
            if ticket is not None:
                ticket.release()
