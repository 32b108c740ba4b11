"""Errors over HTTP, for every HTTP face: one status table keyed by the domain errors' codes,
the headers an error asks for, and the one builder of RFC 9457 ``application/problem+json``
bodies (used by the exception handlers, the admission middleware and the protocol layer).

The body is built with ``json.dumps``, not pydantic: a refusal under overload is the hot path.
``faces/http/schemas.Problem`` documents the same shape in the OpenAPI spec, and a test checks
that every body built here validates against it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from resnet_service.core import errors
from resnet_service.service import tracing

PROBLEM_JSON: Final = "application/problem+json"
INTERNAL_DETAIL: Final = "The server failed unexpectedly; the request id identifies it in the logs."

#: The HTTP status of every domain error code (a test checks that none is missing).
HTTP_STATUS: Final[dict[str, int]] = {
    errors.ServiceError.code: 500,
    errors.InputError.code: 400,
    errors.EmptyUpload.code: 400,
    errors.UnreadableFile.code: 400,
    errors.MalformedRequest.code: 400,
    errors.DatasetError.code: 400,
    errors.InvalidInferRequest.code: 400,
    errors.Unauthorized.code: 401,
    errors.ModelNotFound.code: 404,
    errors.ModelNotNamed.code: 400,
    errors.ControlOff.code: 403,
    errors.ModelLoadFailed.code: 400,
    errors.OutputUnavailable.code: 409,
    errors.RequestTimeout.code: 408,
    errors.UploadTooLarge.code: 413,
    errors.ImageTooLarge.code: 413,
    errors.UnsupportedImage.code: 415,
    errors.UndecodableImage.code: 415,
    errors.InvalidParameter.code: 422,
    errors.MissingField.code: 422,
    errors.TooManyFiles.code: 422,
    errors.InferenceFailed.code: 500,
    errors.Overloaded.code: 503,
    errors.NotReady.code: 503,
    errors.ModelCold.code: 503,
    errors.ModelError.code: 503,
    errors.WeightsUnavailable.code: 503,
    errors.RuntimeUnavailable.code: 503,
    errors.ArtifactBuildFailed.code: 503,
    errors.CacheUnwritable.code: 503,
    errors.BundleInvalid.code: 503,
    errors.TagRulesInvalid.code: 503,
    errors.DeadlineExceeded.code: 504,
}


def status_of(error: errors.ServiceError) -> int:
    """The HTTP status of a domain error."""
    return HTTP_STATUS[error.code]


def error_headers(error: errors.ServiceError) -> dict[str, str]:
    """What the error asks of the response's headers, whatever the body's shape."""
    headers: dict[str, str] = {}
    if isinstance(error, errors.RetryLater):
        headers["Retry-After"] = str(error.retry_after_s)
    if isinstance(error, errors.Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="resnet-service"'
    if isinstance(error, errors.RequestTimeout | errors.UploadTooLarge):
        # The rest of the body is not wanted: close instead of reading it to the end.
        headers["Connection"] = "close"
    return headers


def problem_body(
    *,
    status: int,
    code: str,
    title: str,
    detail: str,
    instance: str | None = None,
    request_id: str | None = None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """An RFC 9457 problem+json body (absent members are left out, as pydantic would)."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if instance is not None:
        body["instance"] = instance
    if request_id is not None:
        body["request_id"] = request_id
    if (trace_id := tracing.trace_id()) is not None:
        body["trace_id"] = trace_id
    if extra:
        body.update(extra)
    return json.dumps(body).encode()


def error_problem(
    error: errors.ServiceError, instance: str | None = None, request_id: str | None = None
) -> bytes:
    """The problem+json body of a domain error."""
    return problem_body(
        status=status_of(error),
        code=error.code,
        title=error.title,
        detail=error.detail,
        instance=instance,
        request_id=request_id,
    )


@dataclass(frozen=True, slots=True)
class ErrorShape:
    """How a face writes an error body outside its routes (a refusal from the request head):
    its content type and its builder, given the error, the path and the request id."""

    content_type: bytes
    build: Callable[[errors.ServiceError, str | None, str | None], bytes]


#: The JSON API's shape, and every route's unless its face says otherwise.
PROBLEM_SHAPE: Final = ErrorShape(PROBLEM_JSON.encode(), error_problem)
