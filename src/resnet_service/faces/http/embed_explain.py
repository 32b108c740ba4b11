"""``/embed``, ``/embed/batch`` and ``/explain``: the same multipart contract, limits,
admission, batching and deadlines as ``/classify``, over the same forward (``core.outputs``)."""

from __future__ import annotations

import base64
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request

from resnet_service.asgi.context import request_context
from resnet_service.asgi.deps import ClassifierDep, ServiceDep, TicketDep, require_token
from resnet_service.asgi.routes import AdmittedRoute
from resnet_service.core.classifier import EMBEDDING, FEATURE_MAP, Classifier
from resnet_service.core.feature_outputs import Encoding, encode_vector, l2_normalised
from resnet_service.core.results import Classification
from resnet_service.faces.http.classify import TopK, predictions_of
from resnet_service.faces.http.openapi import multipart_body, problems
from resnet_service.faces.http.schemas import (
    ClassActivationMap,
    CropBoxModel,
    EmbedBatchItem,
    EmbedBatchResponse,
    EmbedResponse,
    ExplainResponse,
    ItemError,
    Prediction,
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
ADMITTED = (
    AdmittedRoute("/embed", single_image=True),
    AdmittedRoute("/embed/batch"),
    AdmittedRoute("/explain", single_image=True),
)

Normalize = Annotated[
    bool, Query(description="L2-normalise the vector (cosine similarity is then a dot product).")
]
EncodingQuery = Annotated[
    Literal["json", "float16", "float32"],
    Query(description="json numbers, or base64 of little-endian float16/float32 values."),
]
Target = Annotated[
    str,
    Query(
        pattern=r"^(top1|[0-9]{1,6})$",
        description="The class to explain: `top1` (the best) or a class index.",
    ),
]


def _vector(result: Classification, normalize: bool, encoding: Encoding) -> list[float] | str:
    assert result.embedding is not None, "asked with the embedding"
    vector = l2_normalised(result.embedding) if normalize else result.embedding
    return encode_vector(vector, encoding)


def _embedding_size(classifier: Classifier) -> int:
    classifier.check_outputs(EMBEDDING)
    size = classifier.embedding_size
    assert size is not None, "check_outputs passed"
    return size


@router.post(
    "/embed",
    response_model=EmbedResponse,
    summary="The embedding of one image (its pooled features)",
    description="Multipart field `image`. Near-duplicates and look-alikes have close vectors; "
    "compare vectors of the same model only.",
    responses=problems(400, 401, 404, 408, 409, 413, 415, 422, 503, 504),
    openapi_extra=multipart_body("image", many=False),
)
async def embed(
    request: Request,
    service: ServiceDep,
    classifier: ClassifierDep,
    ticket: TicketDep,
    normalize: Normalize = True,
    encoding: EncodingQuery = "json",
) -> EmbedResponse:
    size = _embedding_size(classifier)
    async with one_image(request, service, ticket) as upload:
        result = await classifier.embed(upload.data)
    context = request_context(request)
    context.timings, context.images_ok = result.timings, 1
    return EmbedResponse(
        embedding=_vector(result, normalize, encoding),
        encoding=encoding,
        dimensions=size,
        normalized=normalize,
        model=model_ref(classifier),
        timings=timings_of(result),
        batch_size=result.prediction.batch_size,
    )


@router.post(
    "/embed/batch",
    response_model=EmbedBatchResponse,
    summary="Embeddings of many images; a vector or an error per image",
    description="Repeated multipart field `images` (at most `max_batch_files`, see /model).",
    responses=problems(400, 401, 404, 408, 409, 413, 422, 503),
    openapi_extra=multipart_body("images", many=True),
)
async def embed_batch(
    request: Request,
    service: ServiceDep,
    classifier: ClassifierDep,
    ticket: TicketDep,
    normalize: Normalize = True,
    encoding: EncodingQuery = "json",
) -> EmbedBatchResponse:
    started = time.perf_counter()
    size = _embedding_size(classifier)
    async with many_images(request, service, ticket) as files:
        outcomes = await classifier.classify_many([f.data for f in files], 1, wants=EMBEDDING)
        names = [f.filename for f in files]

    def item(
        index: int, filename: str | None, result: Classification | None, error: ItemError | None
    ) -> EmbedBatchItem:
        if result is None:
            return EmbedBatchItem(index=index, filename=filename, error=error)
        return EmbedBatchItem(
            index=index,
            filename=filename,
            embedding=_vector(result, normalize, encoding),
            timings=timings_of(result),
        )

    results = batch_items(request, service, names, outcomes, item)
    return EmbedBatchResponse(
        results=results,
        encoding=encoding,
        dimensions=size,
        normalized=normalize,
        **batch_totals(results, classifier, started).model_dump(),
    )


def target_index(target: str) -> int | None:
    """``top1`` -> None (the best class), else the class index."""
    return None if target == "top1" else int(target)


@router.post(
    "/explain",
    response_model=ExplainResponse,
    summary="Top-k and where in the image the evidence for a class lies",
    description="Multipart field `image`. Returns the class activation map of `target` as a "
    "7x7 grid and a PNG heatmap over the centre crop the model saw, with that crop's box in "
    "the image's own pixels so it can be overlaid.",
    responses=problems(400, 401, 404, 408, 409, 413, 415, 422, 503, 504),
    openapi_extra=multipart_body("image", many=False),
)
async def explain(
    request: Request,
    service: ServiceDep,
    classifier: ClassifierDep,
    ticket: TicketDep,
    target: Target = "top1",
    top_k: TopK = None,
) -> ExplainResponse:
    k = classifier.check_top_k(top_k)
    chosen = target_index(target)
    classifier.check_target(chosen)
    classifier.check_outputs(FEATURE_MAP)
    async with one_image(request, service, ticket) as upload:
        explained = await classifier.explain(upload.data, k, chosen)
    result = explained.classification
    context = request_context(request)
    context.timings, context.images_ok = result.timings, 1
    box = explained.crop_box
    assert box is not None, "an uploaded image has a size, hence a crop box"
    assert result.size is not None, "an uploaded image has a size"
    return ExplainResponse(
        predictions=predictions_of(result),
        top_k=k,
        target=Prediction(
            label=classifier.model.labels[explained.target],
            index=explained.target,
            score=float(result.probabilities[explained.target]),
        ),
        cam=ClassActivationMap(
            grid=explained.grid.astype(float).round(6).tolist(),
            heatmap_png=base64.b64encode(explained.heatmap_png).decode("ascii"),
            heatmap_size=explained.side,
            crop_box=CropBoxModel(left=box.left, top=box.top, right=box.right, bottom=box.bottom),
            image_width=result.size[0],
            image_height=result.size[1],
        ),
        model=model_ref(classifier),
        timings=timings_of(result),
        batch_size=result.prediction.batch_size,
    )
