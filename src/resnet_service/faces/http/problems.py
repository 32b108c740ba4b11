"""The JSON API's exception handlers: every error, framework ones included, becomes
problem+json (built by ``asgi/problems.py``, with its status table)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from resnet_service.asgi.context import request_context
from resnet_service.asgi.problems import (
    PROBLEM_JSON,
    error_headers,
    problem_body,
    status_of,
)
from resnet_service.core import errors
from resnet_service.faces.http.schemas import ItemError

log = logging.getLogger(__name__)

TOO_LARGE_DETAIL: Final = "The request body is larger than this route accepts."

#: Framework errors (no domain error behind them): their code and title.
_HTTP_CODES: Final[dict[int, tuple[str, str]]] = {
    400: ("malformed_request", "Malformed request"),
    401: ("unauthorized", "Unauthorized"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    413: ("upload_too_large", "Upload too large"),
    415: ("unsupported_media_type", "Unsupported media type"),
    422: ("invalid_parameter", "Invalid parameter"),
}

#: Another face's body for framework errors under its path prefix (OIP's ``{"error"}``).
PrefixHandler = Callable[[Request, StarletteHTTPException], Response]


def item_error(error: errors.ServiceError) -> ItemError:
    """A domain error as one batch item's error."""
    return ItemError(
        code=error.code, status=status_of(error), title=error.title, detail=error.detail
    )


def problem_response(
    request: Request,
    *,
    status: int,
    code: str,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Response:
    """The problem+json response, recording the code for metrics and the access log."""
    context = request_context(request)
    context.error_code = code
    body = problem_body(
        status=status,
        code=code,
        title=title,
        detail=detail,
        instance=request.url.path,
        request_id=context.request_id,
        extra=extra,
    )
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def service_error_response(request: Request, exc: errors.ServiceError) -> Response:
    status = status_of(exc)
    if status >= 500 and not isinstance(exc, errors.RetryLater):
        log.error("%s: %s", exc.code, exc.detail)
    return problem_response(
        request,
        status=status,
        code=exc.code,
        title=exc.title,
        detail=exc.detail,
        headers=error_headers(exc),
    )


def _validation_detail(errors_: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    items = []
    parts = []
    for err in errors_:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        name = ".".join(loc) or "request"
        items.append({"field": name, "message": err.get("msg", "invalid"), "type": err.get("type")})
        parts.append(f"{name}: {err.get('msg', 'invalid')}")
    return "; ".join(parts), items


def install(app: FastAPI, prefixes: dict[str, PrefixHandler] | None = None) -> None:
    """Register the handlers so that every error, framework ones included, is problem+json;
    ``prefixes``: paths whose framework errors another face answers in its own shape."""
    others = dict(prefixes or {})

    async def on_service_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, errors.ServiceError)
        return service_error_response(request, exc)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        detail, items = _validation_detail(list(exc.errors()))
        return problem_response(
            request,
            status=422,
            code="invalid_parameter",
            title="Invalid parameter",
            detail=detail,
            extra={"errors": items},
        )

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code, title = _HTTP_CODES.get(exc.status_code, ("http_error", "HTTP error"))
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        for prefix, handler in others.items():
            if request.url.path.startswith(prefix):
                request_context(request).error_code = code
                return handler(request, exc)
        if exc.status_code == 413:
            detail = TOO_LARGE_DETAIL
        elif exc.status_code in (404, 405):
            detail = (
                f"No route for {request.method} {request.url.path}. The API is described at "
                "/docs and /openapi.json."
            )
        return problem_response(
            request,
            status=exc.status_code,
            code=code,
            title=title,
            detail=detail,
            headers=dict(exc.headers or {}),
        )

    app.add_exception_handler(errors.ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
