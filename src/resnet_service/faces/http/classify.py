"""The JSON inference routes: thin faces over the classifier (parse, validate, call the core,
shape the answer). Admission happens in a dependency, before the upload is read."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from resnet_service.asgi.context import request_context
from resnet_service.asgi.deps import (
    CacheScopeDep,
    ClassifierDep,
    ServiceDep,
    TicketDep,
    require_token,
)
from resnet_service.asgi.routes import AdmittedRoute
from resnet_service.core.results import Classification
from resnet_service.faces.http.openapi import multipart_body, problems
from resnet_service.faces.http.schemas import (
    BatchItemResult,
    BatchResponse,
    ClassifyResponse,
    ItemError,
    Prediction,
    Tag,
    model_ref,
)
from resnet_service.faces.http.uploads import (
    batch_items,
    batch_totals,
    many_images,
    one_image,
    timings_of,
)

router = APIRouter(dependencies=[Depends(require_token)])
#: This face's routes that admission decides from the request head.
ADMITTED = (AdmittedRoute("/classify", single_image=True), AdmittedRoute("/classify/batch"))

TopK = Annotated[
    int | None,
    Query(ge=1, description="How many classes to return (default 5; capped at the class count)."),
]


def predictions_of(result: Classification) -> list[Prediction]:
    p = result.prediction
    return [
        Prediction(label=label, index=index, score=score)
        for label, index, score in zip(p.labels, p.indices, p.scores, strict=True)
    ]


def tags_of(result: Classification) -> list[Tag]:
    return [
        Tag(name=t.name, score=t.score, categories=list(t.categories), aliases=list(t.aliases))
        for t in result.tags
    ]


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    summary="Top-k labels for one image",
    description="Multipart field `image` (JPEG, PNG, WebP, BMP or GIF's first frame).",
    responses=problems(400, 401, 404, 408, 413, 415, 422, 503, 504),
    openapi_extra=multipart_body("image", many=False),
)
async def classify(
    request: Request,
    response: Response,
    service: ServiceDep,
    classifier: ClassifierDep,
    ticket: TicketDep,
    scope: CacheScopeDep,
    top_k: TopK = None,
) -> ClassifyResponse:
    k = classifier.check_top_k(top_k)
    async with one_image(request, service, ticket) as upload:
        result = await classifier.classify(upload.data, k, scope)
    if classifier.cache is not None:
        response.headers["X-Cache"] = "hit" if result.cached else "miss"
    context = request_context(request)
    context.timings, context.images_ok = result.timings, 1
    return ClassifyResponse(
        predictions=predictions_of(result),
        tags=tags_of(result),
        top_k=k,
        model=model_ref(classifier),
        timings=timings_of(result),
        batch_size=result.prediction.batch_size,
    )


@router.post(
    "/classify/batch",
    response_model=BatchResponse,
    summary="Top-k labels for many images; a result or an error per image",
    description="Repeated multipart field `images` (at most `max_batch_files`, see /model). "
    "One bad image never fails the others; the good ones share forward passes.",
    responses=problems(400, 401, 404, 408, 413, 422, 503),
    openapi_extra=multipart_body("images", many=True),
)
async def classify_batch(
    request: Request,
    service: ServiceDep,
    classifier: ClassifierDep,
    ticket: TicketDep,
    scope: CacheScopeDep,
    top_k: TopK = None,
) -> BatchResponse:
    started = time.perf_counter()
    k = classifier.check_top_k(top_k)
    async with many_images(request, service, ticket) as files:
        outcomes = await classifier.classify_many([f.data for f in files], k, scope)
        names = [f.filename for f in files]
    results = batch_items(request, service, names, outcomes, _batch_item)
    totals = batch_totals(results, classifier, started)
    return BatchResponse(results=results, top_k=k, **totals.model_dump())


def _batch_item(
    index: int, filename: str | None, result: Classification | None, error: ItemError | None
) -> BatchItemResult:
    if result is None:
        return BatchItemResult(index=index, filename=filename, error=error)
    return BatchItemResult(
        index=index,
        filename=filename,
        predictions=predictions_of(result),
        tags=tags_of(result),
        timings=timings_of(result),
    )
