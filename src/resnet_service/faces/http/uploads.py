"""What every upload route does with its body: read it within the route's limits, tell
admission it is in, refuse an empty form, count its images; and one batch item's outcome."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import Request

from resnet_service.asgi.context import request_context
from resnet_service.core.admission import Ticket
from resnet_service.core.classifier import Classifier
from resnet_service.core.errors import MissingField, ServiceError
from resnet_service.core.results import Classification
from resnet_service.faces.http.multipart import FormLimits, UploadedFile, uploaded_files
from resnet_service.faces.http.problems import item_error
from resnet_service.faces.http.schemas import BatchItem, BatchTotals, ItemError, Timings, model_ref
from resnet_service.service.state import ServiceState

Item = TypeVar("Item", bound=BatchItem)


@asynccontextmanager
async def one_image(
    request: Request, service: ServiceState, ticket: Ticket
) -> AsyncIterator[UploadedFile]:
    """The multipart field ``image``."""
    limits = FormLimits.single_image(service.settings)
    async with _files(request, service, ticket, limits) as files:
        if not files:
            raise MissingField("Missing the multipart file field 'image'.")
        yield files[0]


@asynccontextmanager
async def many_images(
    request: Request, service: ServiceState, ticket: Ticket
) -> AsyncIterator[list[UploadedFile]]:
    """The repeated multipart field ``images``."""
    limits = FormLimits.batch(service.settings)
    async with _files(request, service, ticket, limits) as files:
        if not files:
            raise MissingField("Missing the multipart file field 'images' (repeat it per image).")
        yield files


@asynccontextmanager
async def _files(
    request: Request, service: ServiceState, ticket: Ticket, limits: FormLimits
) -> AsyncIterator[list[UploadedFile]]:
    timeout = service.settings.body_timeout_s
    async with uploaded_files(request, limits, service.upload_budget, timeout) as files:
        ticket.uploaded()
        request_context(request).images = len(files) or 1
        yield files


def timings_of(result: Classification) -> Timings:
    t = result.timings
    return Timings(
        decode_ms=round(t.decode_s * 1000, 3),
        queue_ms=round(t.queue_s * 1000, 3),
        inference_ms=round(t.inference_s * 1000, 3),
        total_ms=round(t.total_s * 1000, 3),
    )


def batch_items(
    request: Request,
    service: ServiceState,
    names: list[str | None],
    outcomes: list[Classification | ServiceError],
    make: Callable[[int, str | None, Classification | None, ItemError | None], Item],
) -> list[Item]:
    """One item per image, in order, each counted for the image metrics (ok or error)."""
    context = request_context(request)
    items = []
    for index, (filename, outcome) in enumerate(zip(names, outcomes, strict=True)):
        if isinstance(outcome, ServiceError):
            service.metrics.rejections.labels(outcome.code).inc()
            context.images_failed += 1
            items.append(make(index, filename, None, item_error(outcome)))
        else:
            context.images_ok += 1
            items.append(make(index, filename, outcome, None))
    return items


def batch_totals(items: list[Item], classifier: Classifier, started: float) -> BatchTotals:
    """How many succeeded and failed, which model answered, the whole request's time."""
    failed = sum(1 for item in items if item.error is not None)
    return BatchTotals(
        succeeded=len(items) - failed,
        failed=failed,
        model=model_ref(classifier),
        total_ms=round((time.perf_counter() - started) * 1000, 3),
    )
