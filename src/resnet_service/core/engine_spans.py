"""Trace spans of the core, through OpenTelemetry's API only (a no-op until a worker installs
the SDK: ``service/tracing.py``). The engine's spans are written after the fact, with the
times it measured: a ``queue wait`` per image (from its submission to its batch's start, under
the image's request span) and one ``batch`` span per forward, linked to every request span it
served. Nothing is done for a request whose span is not recording (tracing off: free)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, Status, StatusCode

TRACER: Final = trace.get_tracer("resnet_service")


@dataclass(frozen=True, slots=True)
class Traced:
    """An image's request span, and when (wall clock, ns) the image joined the queue."""

    context: SpanContext
    enqueued_ns: int


def traced_now() -> Traced | None:
    """The current request span, when it records; None otherwise (the common, free case)."""
    span = trace.get_current_span()
    if not span.is_recording():
        return None
    return Traced(span.get_span_context(), time.time_ns())


@contextmanager
def child_span(name: str) -> Iterator[None]:
    """A child of the current span when that one records; nothing at all otherwise."""
    if not trace.get_current_span().is_recording():
        yield
        return
    with TRACER.start_as_current_span(name):
        yield


def record_batch(
    items: Sequence[Traced],
    started_ns: int,
    ended_ns: int,
    size: int,
    attributes: Mapping[str, str],
    error: str | None = None,
) -> None:
    """The ``queue wait`` span of each traced image and the ``batch`` span linked to them."""
    for item in items:
        parent = trace.set_span_in_context(NonRecordingSpan(item.context))
        wait = TRACER.start_span("queue wait", context=parent, start_time=item.enqueued_ns)
        wait.end(end_time=started_ns)
    batch = TRACER.start_span(
        "batch",
        context=trace.set_span_in_context(trace.INVALID_SPAN),  # its own trace: links, not a parent
        links=[Link(item.context) for item in items],
        start_time=started_ns,
        attributes={**attributes, "batch.size": size, "batch.traced_requests": len(items)},
    )
    if error is not None:
        batch.set_status(Status(StatusCode.ERROR, error))
    batch.end(end_time=ended_ns)
