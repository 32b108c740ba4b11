"""OpenTelemetry tracing for a worker: off by default, on with ``RESNET_SERVICE_TRACING=true``,
configured by the standard ``OTEL_*`` variables (the SDK reads them: the OTLP endpoint and
headers, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, the batch
processor's delays); ``OTEL_SDK_DISABLED=true`` wins over our switch.

Spans are exported over OTLP/HTTP (protobuf) by the SDK's batch processor, from a thread of
its own, never on the request path. Off means free: no provider is installed, the API's tracer
is a no-op, and the faces skip their tracing code behind one boolean.

What is traced (names as they appear in a trace):
- ``POST /classify`` (and every other request, HTTP or gRPC): the request, a SERVER span that
  continues the caller's W3C ``traceparent``; its status is ERROR for a 5xx (a refusal, a
  deadline) with ``error.type`` the error's code, for a 4xx the code only;
- ``admission``: the decision from the request head and the predicted wait;
- ``read upload``: the body arriving (multipart or OIP);
- ``decode``: bytes to the model's input, per image;
- ``queue wait``: from the image's submission to the start of its batch;
- ``batch``: one span per forward pass in its own trace, **linked** to the request span of
  every image it served, with the batch size, model, version and runtime.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final

from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from resnet_service import __version__
from resnet_service.config import Settings
from resnet_service.core.admission import Ticket
from resnet_service.core.classifier import Classifier
from resnet_service.core.engine_spans import TRACER
from resnet_service.core.errors import RetryLater

if TYPE_CHECKING:  # the SDK is imported only when tracing is on
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME: Final = "resnet-service"


def wanted(settings: Settings) -> bool:
    """Whether this process traces: our switch, unless the SDK is disabled by its own."""
    disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    return settings.tracing and not disabled


def configure(settings: Settings, worker: int) -> TracerProvider | None:
    """Install the SDK's provider with an OTLP/HTTP exporter when tracing is wanted."""
    if not wanted(settings):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create(
        {
            "service.name": os.environ.get("OTEL_SERVICE_NAME", DEFAULT_SERVICE_NAME),
            "service.version": __version__,
            "service.instance.id": f"{socket.gethostname()}/{worker}",
        }
    )
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    log.info("tracing on: OTLP/HTTP to %s", _endpoint())
    return provider


def shutdown(provider: TracerProvider | None) -> None:
    """Export what is buffered, then stop (at the end of a worker's life)."""
    if provider is not None:
        provider.shutdown()


def _endpoint() -> str:
    return os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318"),
    )


# --- spans every face writes ----------------------------------------------------------------
def start_request(
    name: str, carrier: Mapping[str, str], attributes: Mapping[str, AttributeValue]
) -> Span:
    """A request's SERVER span, continuing the caller's W3C trace context from ``carrier``
    (HTTP headers or gRPC metadata, lower-case keys)."""
    return TRACER.start_span(
        name, context=extract(carrier), kind=SpanKind.SERVER, attributes=attributes
    )


def finish_request(span: Span, error_code: str | None, failed: bool) -> None:
    """End a request span: its error's code when it had one, ERROR status when the service
    failed it (a 5xx: a refusal, a deadline, a fault), not when the caller sent bad input."""
    if error_code is not None:
        span.set_attribute("error.type", error_code)
    if failed:
        span.set_status(Status(StatusCode.ERROR, error_code or "error"))
    span.end()


def admit(classifier: Classifier) -> Ticket:
    """``classifier.admit()`` inside an ``admission`` child of the current request span, which
    says the decision, the predicted wait and whether a standing queue is being shed."""
    with TRACER.start_as_current_span("admission") as span:
        span.set_attribute("admission.shedding", classifier.workload.shedding)
        try:
            ticket = classifier.admit()
        except RetryLater as exc:
            span.set_attributes({"admission.decision": "refused", "error.type": exc.code})
            raise
        span.set_attributes(
            {
                "admission.decision": "admitted",
                "admission.predicted_wait_ms": round(ticket.predicted_wait_s * 1000, 3),
            }
        )
        return ticket


def admitter(traced: bool) -> Callable[[Classifier], Ticket]:
    """How a face admits a request: inside an ``admission`` span when tracing, else plainly."""
    return admit if traced else Classifier.admit


def trace_id() -> str | None:
    """The current trace's id (32 hex digits), when a span records one."""
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None
