"""Thin HTTP faces over the classifier: parse and validate, call the core, shape the answer."""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Query, Request, Response

from resnet_service.api.multipart import FormLimits, uploaded_files
from resnet_service.api.problems import PROBLEM_JSON, MissingField, Unauthorized, item_error
from resnet_service.api.schemas import (
    BatchItemResult,
    BatchResponse,
    ClassifyResponse,
    Health,
    ModelResponse,
    Prediction,
    Readiness,
    Timings,
)
from resnet_service.api.state import ServiceState
from resnet_service.classifier import Classification
from resnet_service.errors import NotReady, ServiceError
from resnet_service.model.loader import ModelInfo

# Multipart framing around an image: part headers and boundaries.
_FORM_OVERHEAD: Final = 64 * 1024
# Starlette's per-route body cap sits just above ours, as a backstop: ours answers first with
# a problem+json body naming the limit.
BODY_LIMIT_SLACK: Final = 64 * 1024

TopK = Annotated[
    int | None,
    Query(ge=1, description="How many classes to return (default 5; at most the class count)."),
]

_PROBLEM_DESCRIPTIONS: Final = {
    400: "Malformed request (not multipart, broken multipart, empty upload).",
    401: "Missing or wrong bearer token.",
    413: "Upload too large: bytes, or pixels from the image header.",
    415: "Not an allowed image format, or undecodable.",
    422: "Invalid parameter or missing field.",
    503: "Overloaded or not ready; see Retry-After.",
    504: "The request's deadline passed while it waited for the model.",
}


def _problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """Error responses, all RFC 9457 problem+json (schema ``Problem``)."""
    ref = {"schema": {"$ref": "#/components/schemas/Problem"}}
    return {
        code: {"description": _PROBLEM_DESCRIPTIONS[code], "content": {PROBLEM_JSON: ref}}
        for code in codes
    }


def _multipart_body(field: str, many: bool) -> dict[str, Any]:
    item = {"type": "string", "format": "binary"}
    schema = {"type": "array", "items": item} if many else item
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": [field], "properties": {field: schema}}
                }
            },
        }
    }


def state_of(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


async def require_token(request: Request) -> None:
    """Bearer-token check for inference routes, when a token is configured (async: a plain
    function dependency would cost a thread-pool hop per request)."""
    token = state_of(request).settings.auth_token
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        given.strip().encode(), token.get_secret_value().encode()
    ):
        raise Unauthorized("Send 'Authorization: Bearer <token>' with the service's token.")


def _predictions(result: Classification) -> list[Prediction]:
    p = result.prediction
    return [
        Prediction(label=label, index=index, score=score)
        for label, index, score in zip(p.labels, p.indices, p.scores, strict=True)
    ]


def _timings(result: Classification) -> Timings:
    t = result.timings
    return Timings(
        decode_ms=round(t.decode_s * 1000, 3),
        queue_ms=round(t.queue_s * 1000, 3),
        inference_ms=round(t.inference_s * 1000, 3),
        total_ms=round(t.total_s * 1000, 3),
    )


#: Provenance that names places on the server's disk: not for an unauthenticated route.
_PRIVATE_PROVENANCE: Final = frozenset({"train_dir", "val_dir", "skipped_files", "options"})


def public_model_info(info: ModelInfo) -> dict[str, Any]:
    """The model info minus server paths (weights file, caches, training folders)."""
    public = info.model_dump(exclude={"int8_cache", "weights_path"})
    public["provenance"] = {
        k: v for k, v in info.provenance.items() if k not in _PRIVATE_PROVENANCE
    }
    quant = public.get("quantization")
    if quant and quant.get("calibration_source"):
        quant["calibration_source"] = _without_paths(quant["calibration_source"])
    if quant and quant.get("fidelity"):
        fidelity = quant["fidelity"]
        fidelity["image_source"] = _without_paths(fidelity["image_source"])
    return public


def _without_paths(source: str) -> str:
    """'/srv/data/train (train split)' -> 'train (train split)'; builtin names unchanged."""
    head, _, note = source.partition(" (")
    name = head.rstrip("/").rsplit("/", 1)[-1]
    return f"{name} ({note}" if note else name


def build_router(state: ServiceState) -> APIRouter:
    """All routes; body caps come from the settings, so they are set per app."""
    settings = state.settings
    single = FormLimits(
        file_fields=frozenset({"image"}),
        max_files=1,
        max_file_bytes=settings.max_upload_bytes,
        max_body_bytes=settings.max_upload_bytes + _FORM_OVERHEAD,
    )
    batch = FormLimits(
        file_fields=frozenset({"images"}),
        max_files=settings.max_batch_files,
        max_file_bytes=settings.max_upload_bytes,
        max_body_bytes=settings.max_batch_bytes,
    )
    router = APIRouter()
    auth = [Depends(require_token)]

    @router.post(
        "/classify",
        response_model=ClassifyResponse,
        summary="Top-k labels for one image",
        description="Multipart field `image` (JPEG, PNG, WebP, BMP or GIF's first frame).",
        dependencies=auth,
        responses=_problems(400, 401, 413, 415, 422, 503, 504),
        openapi_extra=_multipart_body("image", many=False),
        max_body_size=single.max_body_bytes + BODY_LIMIT_SLACK,
    )
    async def classify(request: Request, top_k: TopK = None) -> ClassifyResponse:
        classifier = state.require_classifier()
        k = classifier.check_top_k(top_k)
        async with uploaded_files(request, single, state.upload_budget) as files:
            if not files:
                raise MissingField("Missing the multipart file field 'image'.")
            request.state.images = 1
            result = await classifier.classify(files[0].data, k)
        request.state.timings = result.timings
        state.metrics.images.labels("ok").inc()
        return ClassifyResponse(
            predictions=_predictions(result),
            model=state.model_ref(),
            timings=_timings(result),
            batch_size=result.prediction.batch_size,
        )

    @router.post(
        "/classify/batch",
        response_model=BatchResponse,
        summary="Top-k labels for many images; a result or an error per image",
        description="Repeated multipart field `images` (at most `max_batch_files`, see "
        "/model). One bad image never fails the others; the good ones share forward passes.",
        dependencies=auth,
        responses=_problems(400, 401, 413, 422, 503),
        openapi_extra=_multipart_body("images", many=True),
        max_body_size=batch.max_body_bytes + BODY_LIMIT_SLACK,
    )
    async def classify_batch(request: Request, top_k: TopK = None) -> BatchResponse:
        started = time.perf_counter()
        classifier = state.require_classifier()
        k = classifier.check_top_k(top_k)
        async with uploaded_files(request, batch, state.upload_budget) as files:
            if not files:
                raise MissingField(
                    "Missing the multipart file field 'images' (repeat it per image)."
                )
            request.state.images = len(files)
            outcomes = await classifier.classify_many([f.data for f in files], k)
            names = [f.filename for f in files]
        results: list[BatchItemResult] = []
        for index, (filename, outcome) in enumerate(zip(names, outcomes, strict=True)):
            if isinstance(outcome, ServiceError):
                state.metrics.rejections.labels(outcome.code).inc()
                state.metrics.images.labels("error").inc()
                results.append(
                    BatchItemResult(index=index, filename=filename, error=item_error(outcome))
                )
            else:
                state.metrics.images.labels("ok").inc()
                results.append(
                    BatchItemResult(
                        index=index,
                        filename=filename,
                        predictions=_predictions(outcome),
                        timings=_timings(outcome),
                    )
                )
        failed = sum(1 for r in results if r.error is not None)
        return BatchResponse(
            results=results,
            succeeded=len(results) - failed,
            failed=failed,
            model=state.model_ref(),
            total_ms=round((time.perf_counter() - started) * 1000, 3),
        )

    @router.get(
        "/model", response_model=ModelResponse, summary="The served model", responses=_problems(503)
    )
    async def model() -> ModelResponse:
        classifier = state.require_classifier()
        info = classifier.model.info
        return ModelResponse(
            **public_model_info(info),
            labels=classifier.model.labels,
            runtime={
                "torch_threads": classifier.torch_threads,
                "decode_threads": classifier.decode_threads,
                "workers": settings.workers or 1,
                "max_batch_size": settings.max_batch_size,
                "max_batch_wait_ms": settings.max_batch_wait_ms,
                "queue_capacity": settings.queue_capacity,
                "request_timeout_s": settings.request_timeout_s,
                "max_upload_bytes": settings.max_upload_bytes,
                "max_pixels": settings.max_pixels,
                "default_top_k": min(settings.default_top_k, classifier.max_top_k),
                "max_top_k": classifier.max_top_k,
                "max_batch_files": settings.max_batch_files,
                "max_batch_bytes": settings.max_batch_bytes,
                "auth_required": settings.auth_token is not None,
            },
        )

    @router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
    async def healthz() -> Health:
        return Health()

    @router.get(
        "/readyz",
        response_model=Readiness,
        summary="Readiness: model loaded and warmed, not draining",
        responses=_problems(503),
    )
    async def readyz() -> Readiness:
        if state.draining:
            raise NotReady("The service is shutting down; send new requests elsewhere.")
        state.require_classifier()  # raises the precise NotReady while starting
        return Readiness(model=state.model_ref())

    @router.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    return router
