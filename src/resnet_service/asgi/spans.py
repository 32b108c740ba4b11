"""The request's SERVER span (tracing on): started where the request is first seen (the
protocol layer's admission, or the request-context middleware), named by its route template
when it ends."""

from __future__ import annotations

from opentelemetry.trace import Span
from starlette.types import Scope

from resnet_service.asgi.context import RequestContext
from resnet_service.asgi.routes import method_label
from resnet_service.service import tracing


def request_span(scope: Scope, context: RequestContext) -> Span:
    """The request's span, continuing the caller's ``traceparent``."""
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
    method = method_label(scope["method"])
    attributes = {
        "http.request.method": method,
        "url.path": scope.get("path", "")[:256],
        "request.id": context.request_id,
    }
    return tracing.start_request(f"{method} {scope.get('path', '')[:64]}", headers, attributes)


def route_of(scope: Scope, context: RequestContext) -> str:
    """The matched route's template (bounded), the admitted one for a refusal, or "unmatched"."""
    return getattr(scope.get("route"), "path", None) or context.route or "unmatched"


def finish_request_span(span: Span, scope: Scope, context: RequestContext, status: int) -> None:
    """Name the span by its route template, say the status, end it."""
    route = route_of(scope, context)
    span.update_name(f"{method_label(scope['method'])} {route}")
    span.set_attributes({"http.route": route, "http.response.status_code": status})
    tracing.finish_request(span, context.error_code, failed=status >= 500)
