"""Errors in the Open Inference Protocol: the one builder of its ``{"error": "..."}`` body, its
HTTP statuses (derived from the HTTP table) and its gRPC status table, keyed by the domain
errors' codes (a test checks that every code has a row)."""

from __future__ import annotations

import json
from typing import Final

import grpc
from fastapi import Request, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from resnet_service.asgi.context import request_context
from resnet_service.asgi.problems import ErrorShape, error_headers, status_of
from resnet_service.core import errors

_INVALID: Final = grpc.StatusCode.INVALID_ARGUMENT
_UNAVAILABLE: Final = grpc.StatusCode.UNAVAILABLE

#: The gRPC status of every domain error code.
GRPC_STATUS: Final[dict[str, grpc.StatusCode]] = {
    errors.ServiceError.code: grpc.StatusCode.INTERNAL,
    errors.InputError.code: _INVALID,
    errors.EmptyUpload.code: _INVALID,
    errors.UnreadableFile.code: _INVALID,
    errors.MalformedRequest.code: _INVALID,
    errors.DatasetError.code: _INVALID,
    errors.InvalidInferRequest.code: _INVALID,
    errors.RequestTimeout.code: _INVALID,
    errors.UploadTooLarge.code: _INVALID,
    errors.ImageTooLarge.code: _INVALID,
    errors.UnsupportedImage.code: _INVALID,
    errors.UndecodableImage.code: _INVALID,
    errors.InvalidParameter.code: _INVALID,
    errors.MissingField.code: _INVALID,
    errors.TooManyFiles.code: _INVALID,
    errors.ModelNotFound.code: grpc.StatusCode.NOT_FOUND,
    errors.ModelNotNamed.code: _INVALID,
    errors.ControlOff.code: grpc.StatusCode.PERMISSION_DENIED,
    errors.ModelLoadFailed.code: grpc.StatusCode.INVALID_ARGUMENT,
    errors.OutputUnavailable.code: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unauthorized.code: grpc.StatusCode.UNAUTHENTICATED,
    errors.InferenceFailed.code: grpc.StatusCode.INTERNAL,
    errors.Overloaded.code: _UNAVAILABLE,
    errors.NotReady.code: _UNAVAILABLE,
    errors.ModelCold.code: _UNAVAILABLE,
    errors.ModelError.code: _UNAVAILABLE,
    errors.WeightsUnavailable.code: _UNAVAILABLE,
    errors.RuntimeUnavailable.code: _UNAVAILABLE,
    errors.ArtifactBuildFailed.code: _UNAVAILABLE,
    errors.CacheUnwritable.code: _UNAVAILABLE,
    errors.BundleInvalid.code: _UNAVAILABLE,
    errors.TagRulesInvalid.code: _UNAVAILABLE,
    errors.DeadlineExceeded.code: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_status(error: errors.ServiceError) -> grpc.StatusCode:
    return GRPC_STATUS[error.code]


def http_status(error: errors.ServiceError) -> int:
    """The protocol's HTTP statuses: what the caller sent wrong is 400 (our JSON API's finer
    415 and 422 included); 404 unknown model, 401, 503 and the transport's 408/413 stay."""
    status = status_of(error)
    return 400 if status in (415, 422) else status


def error_body(detail: str) -> bytes:
    """The protocol's error body."""
    return json.dumps({"error": detail}).encode()


def error_response(error: errors.ServiceError, request: Request) -> Response:
    """``{"error": ...}`` with the status and headers (Retry-After...) the error asks for."""
    request_context(request).error_code = error.code
    return Response(
        error_body(error.detail),
        http_status(error),
        headers=error_headers(error),
        media_type="application/json",
    )


def framework_error(request: Request, exc: StarletteHTTPException) -> Response:
    """No such route (404/405) under ``/v2/``: the protocol's body, not problem+json."""
    return Response(
        error_body(f"No route for {request.method} {request.url.path}."),
        exc.status_code,
        headers=dict(exc.headers or {}),
        media_type="application/json",
    )


#: For refusals decided before the route (``asgi/admission.py``).
ERROR_SHAPE: Final = ErrorShape(
    b"application/json", lambda error, _path, _id: error_body(error.detail)
)
