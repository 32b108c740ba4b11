"""The one place where errors become HTTP: RFC 9457 ``application/problem+json``."""

from __future__ import annotations

import logging
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from resnet_service import errors
from resnet_service.api.schemas import ItemError, Problem
from resnet_service.oip.tensors import InvalidInferRequest, ModelNotFound

log = logging.getLogger(__name__)

PROBLEM_JSON: Final = "application/problem+json"
TOO_LARGE_DETAIL: Final = "The request body is larger than this route accepts."
INTERNAL_DETAIL: Final = "The server failed unexpectedly; the request id identifies it in the logs."

_STATUS: Final[dict[type[errors.ServiceError], int]] = {
    errors.EmptyUpload: 400,
    errors.UploadTooLarge: 413,
    errors.ImageTooLarge: 413,
    errors.UnsupportedImage: 415,
    errors.UndecodableImage: 415,
    errors.InvalidParameter: 422,
    errors.RequestTimeout: 408,
    errors.InputError: 400,
    errors.Overloaded: 503,
    errors.NotReady: 503,
    errors.DeadlineExceeded: 504,
    errors.InferenceFailed: 500,
    errors.ModelError: 503,
}

_HTTP_CODES: Final[dict[int, tuple[str, str]]] = {
    400: ("malformed_request", "Malformed request"),
    401: ("unauthorized", "Unauthorized"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    413: ("upload_too_large", "Upload too large"),
    415: ("unsupported_media_type", "Unsupported media type"),
    422: ("invalid_parameter", "Invalid parameter"),
}


class MalformedRequest(errors.InputError):
    """The HTTP request itself is unusable (not multipart, broken multipart...)."""

    code = "malformed_request"
    title = "Malformed request"


class MissingField(errors.InputError):
    code = "missing_field"
    title = "Missing field"


class TooManyFiles(errors.InputError):
    code = "too_many_files"
    title = "Too many files"


class Unauthorized(errors.ServiceError):
    code = "unauthorized"
    title = "Unauthorized"


_STATUS.update(
    {
        MalformedRequest: 400,
        MissingField: 422,
        TooManyFiles: 422,
        Unauthorized: 401,
        ModelNotFound: 404,
        InvalidInferRequest: 400,
    }
)


def status_of(error: errors.ServiceError) -> int:
    """HTTP status for a domain error (most specific class wins)."""
    for cls in type(error).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 500


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
) -> JSONResponse:
    """Build the problem+json response, recording the code for metrics and the access log."""
    request.state.error_code = code
    body = Problem(
        title=title,
        status=status,
        detail=detail,
        code=code,
        instance=request.url.path,
        request_id=getattr(request.state, "request_id", None),
        **(extra or {}),
    )
    return JSONResponse(
        body.model_dump(exclude_none=True),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def service_error_response(request: Request, exc: errors.ServiceError) -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(exc, errors.RetryLater):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="resnet-service"'
    if isinstance(exc, errors.RequestTimeout | errors.UploadTooLarge):
        # The rest of the body is not wanted: close instead of reading it to the end.
        headers["Connection"] = "close"
    status = status_of(exc)
    if status >= 500 and not isinstance(exc, errors.RetryLater):
        log.error("%s: %s", exc.code, exc.detail)
    return problem_response(
        request, status=status, code=exc.code, title=exc.title, detail=exc.detail, headers=headers
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


def install(app: FastAPI) -> None:
    """Register the handlers so that every error, framework ones included, is problem+json."""

    async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, errors.ServiceError)
        return service_error_response(request, exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
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

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code, title = _HTTP_CODES.get(exc.status_code, ("http_error", "HTTP error"))
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if request.url.path.startswith("/v2/"):  # Open Inference Protocol: its error body
            request.state.error_code = code
            return JSONResponse(
                {"error": f"No route for {request.method} {request.url.path}."},
                status_code=exc.status_code,
                headers=dict(exc.headers or {}),
            )
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
