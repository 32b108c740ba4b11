"""Every OIP RPC observed in one place, as gRPC's idiom has it (a server interceptor): its
SERVER span (continuing a ``traceparent`` sent as metadata), its request metrics, its class's
metrics, and a domain error turned into its gRPC status (with ``retry-after`` for a refusal).
The servicer's methods only do their work; what they learn that the metrics need (the class
of an inference, its images) they write to ``current_rpc()``."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span

from resnet_service.core.errors import RetryLater, ServiceError
from resnet_service.core.priority import Priority
from resnet_service.faces.oip.errors import grpc_status
from resnet_service.service import tracing
from resnet_service.service.metrics import Metrics

#: Statuses that are the service's failure (ERROR on the span), as a 5xx is over HTTP; what
#: the caller got wrong (invalid argument, not found, unauthenticated) is not.
SERVICE_FAULTS: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)

Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


@dataclass(slots=True)
class RpcRecord:
    """What an RPC learnt about itself that its metrics need."""

    priority: Priority | None = None  # an inference's class, once known
    images: int = 0  # images answered


_CURRENT: ContextVar[RpcRecord | None] = ContextVar("rpc_record", default=None)


def current_rpc() -> RpcRecord:
    """The running RPC's record (a throwaway one outside an observed RPC)."""
    return _CURRENT.get() or RpcRecord()


class ObservedRpcs(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps the unary RPCs of one service (``service``: its full name)."""

    def __init__(self, service: str, metrics: Metrics, traced: bool) -> None:
        self.service = service
        self.metrics = metrics
        self.traced = traced

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        service, _, name = details.method.lstrip("/").partition("/")
        if handler is None or handler.unary_unary is None or service != self.service:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._observed(name, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _observed(self, name: str, behavior: Behavior) -> Behavior:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            record = RpcRecord()
            token = _CURRENT.set(record)
            started, status, code = time.perf_counter(), grpc.StatusCode.OK, None
            span = self._span(name, context) if self.traced else None
            try:
                if span is None:
                    return await behavior(request, context)
                with trace.use_span(span, end_on_exit=False):
                    return await behavior(request, context)
            except ServiceError as exc:
                status, code = grpc_status(exc), exc.code
                if isinstance(exc, RetryLater):
                    context.set_trailing_metadata((("retry-after", str(exc.retry_after_s)),))
                await context.abort(status, exc.detail)
                raise  # abort raises; this keeps type checkers informed
            finally:
                _CURRENT.reset(token)
                self._record(name, record, status, code, time.perf_counter() - started)
                if span is not None:
                    span.set_attribute("rpc.grpc.status_code", status.value[0])
                    tracing.finish_request(span, code, failed=status in SERVICE_FAULTS)

        return observed

    def _span(self, name: str, context: grpc.aio.ServicerContext) -> Span:
        """The RPC's SERVER span, continuing a ``traceparent`` sent as metadata."""
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        attributes = {"rpc.system": "grpc", "rpc.service": self.service, "rpc.method": name}
        return tracing.start_request(f"{self.service}/{name}", metadata, attributes)

    def _record(
        self,
        name: str,
        record: RpcRecord,
        status: grpc.StatusCode,
        code: str | None,
        seconds: float,
    ) -> None:
        metrics = self.metrics
        route = f"grpc:{self.service}/{name}"
        metrics.requests.labels(route, "GRPC", status.name).inc()
        metrics.worker_requests.inc()
        metrics.request_latency.labels(route).observe(seconds)
        if code is not None:
            metrics.rejections.labels(code).inc()
        if record.images:
            metrics.images.labels("ok").inc(record.images)
        if record.priority is not None:
            ok = status == grpc.StatusCode.OK
            metrics.count_priority(record.priority, ok, code, seconds)
