"""One finished HTTP request counted and logged: the request metrics (labels from bounded sets
only: the route's template, a known method, the status, our own error codes), the class of an
inference request, and one JSON access-log line. Refusals are counted in full but logged at
most once a second per worker, with the number they stand for."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Final

from opentelemetry import trace
from starlette.types import Scope

from resnet_service.asgi.context import RequestContext, RequestIds
from resnet_service.asgi.refusal_tally import RefusalKey, RefusalTally
from resnet_service.asgi.routes import RouteTable, method_label
from resnet_service.asgi.spans import route_of
from resnet_service.service.metrics import Metrics

access_log = logging.getLogger("resnet_service.access")

_REFUSAL_LOG_INTERVAL_S: Final = 1.0


class RefusalLog:
    """At most one access-log line a second for refusals, saying how many it stands for."""

    def __init__(self) -> None:
        self.last = 0.0
        self.suppressed = 0

    def take(self, now: float) -> int | None:
        """The count to report now (this one included), or None to stay quiet."""
        if now - self.last < _REFUSAL_LOG_INTERVAL_S:
            self.suppressed += 1
            return None
        count, self.suppressed, self.last = self.suppressed + 1, 0, now
        return count


class RequestRecorder:
    """Counts and logs one finished request (metrics, access log); shared by the ASGI
    middleware and the protocol layer's refusals."""

    def __init__(self, metrics: Metrics, routes: RouteTable, json_lines: bool = False) -> None:
        self.metrics = metrics
        self.routes = routes
        #: The access line as a JSON log record's fields (json logs) or as its message (text).
        self.json_lines = json_lines
        self.refusals = RefusalLog()
        self.tally = RefusalTally(metrics)
        self.ids = RequestIds()
        # Label children by their (bounded) label values: ``labels()`` takes a lock and
        # builds a key per call, a visible share of a refusal's few microseconds.
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._rejections: dict[str, Any] = {}

    def _series(self, route: str, method: str, status: int) -> tuple[Any, Any]:
        key = (route, method_label(method), str(status))
        series = self._children.get(key)
        if series is None:
            series = (
                self.metrics.requests.labels(*key),
                self.metrics.request_latency.labels(route),
            )
            self._children[key] = series
        return series

    def record_refusal(self, scope: Scope, context: RequestContext) -> None:
        """A refusal answered from the request head: counted in the tally (batched), logged
        as ``record`` logs refusals."""
        route = context.route or "unmatched"
        key = RefusalKey(
            route,
            method_label(scope["method"]),
            context.error_code or "overloaded",
            context.priority,
            route in self.routes.single_image,
        )
        self.tally.add(key)
        if access_log.isEnabledFor(logging.INFO) and (
            count := self.refusals.take(time.monotonic())
        ):
            context.refusals_logged_as_one = count
            _log(scope, context, route, 503, 0.0, self.json_lines)

    def record(self, scope: Scope, context: RequestContext, status: int, elapsed: float) -> None:
        route = route_of(scope, context)
        requests, latency = self._series(route, scope["method"], status)
        requests.inc()
        self.metrics.worker_requests.inc()
        latency.observe(elapsed)
        code = context.error_code
        if context.priority is not None:  # an inference request
            self.metrics.count_priority(context.priority, status < 400, code, elapsed)
        if code and route not in self.routes.probes:
            rejections = self._rejections.get(code)
            if rejections is None:
                rejections = self._rejections[code] = self.metrics.rejections.labels(code)
            rejections.inc()
        self._count_images(route, status, context)
        if not access_log.isEnabledFor(logging.INFO):
            return
        if code == "overloaded":
            count = self.refusals.take(time.monotonic())
            if count is None:
                return
            context.refusals_logged_as_one = count
        _log(scope, context, route, status, elapsed, self.json_lines)

    def _count_images(self, route: str, status: int, context: RequestContext) -> None:
        """The images the route counted; a single-image request that failed before its route
        counted anything (a bad upload, a deadline) is one failed image."""
        if context.images_ok:
            self.metrics.images.labels("ok").inc(context.images_ok)
        if context.images_failed:
            self.metrics.images.labels("error").inc(context.images_failed)
        elif status >= 400 and not context.images_ok and route in self.routes.single_image:
            self.metrics.images.labels("error").inc()


def _log(
    scope: Scope, context: RequestContext, route: str, status: int, elapsed: float, fields: bool
) -> None:
    line: dict[str, Any] = {
        "event": "request",
        "request_id": context.request_id,
        "method": scope["method"][:16],
        "route": route,
        "path": scope.get("path", "")[:256],
        "status": status,
        "duration_ms": round(elapsed * 1000, 3),
    }
    if (client := scope.get("client")) is not None:
        line["client"] = client[0]
    if (classifier := context.classifier) is not None:  # the version that answered
        line["model"], line["version"] = classifier.name, classifier.version
    if context.priority is not None:  # an inference request's class
        line["priority"] = context.priority
    if context.images is not None:
        line["images"] = context.images
    if (timings := context.timings) is not None:
        line["decode_ms"] = round(timings.decode_s * 1000, 3)
        line["queue_ms"] = round(timings.queue_s * 1000, 3)
        line["inference_ms"] = round(timings.inference_s * 1000, 3)
    if context.error_code is not None:
        line["error_code"] = context.error_code
    if context.refusals_logged_as_one is not None:
        line["refusals"] = context.refusals_logged_as_one
    if (span := context.span) is not None:
        line["trace_id"] = trace.format_trace_id(span.get_span_context().trace_id)
    if fields:
        access_log.info("request", extra=line)
    else:
        access_log.info(json.dumps(line))
