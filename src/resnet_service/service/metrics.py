"""Prometheus metrics on the app's own registry (multiprocess-aware for ``--workers N``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

PREFIX: Final = "resnet_service"
_LATENCY_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: A model's load and a request's wait for it: tenths of a second to the deadline.
_LOAD_BUCKETS: Final = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
_BATCH_BUCKETS: Final = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)


#: Labels of the per-model series: names from the model repository only (bounded).
MODEL_LABELS: Final = ("model", "version")


def multiprocess_dir() -> str | None:
    """Set by ``serve --workers N``: every worker writes its samples there."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """Every metric of one app; also the engine's and the decoder's observer."""

    def __init__(self, worker: int = 0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "HTTP requests answered.",
            ["route", "method", "status"],
            registry=r,
        )
        # Per worker *index* (bounded by the worker count; a replacement keeps its index): shows
        # how the kernel spread connections over the workers' sockets.
        self.worker_requests = Counter(
            f"{PREFIX}_worker_requests",
            "HTTP requests answered, by worker process index.",
            ["worker"],
            registry=r,
        ).labels(str(worker))
        self.request_latency = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "HTTP request latency, body read to response (refusals answered from the request head are not observed: they wait only the refusal pause).",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # By priority class (interactive, bulk: a bounded set), inference routes only.
        self.priority_requests = Counter(
            f"{PREFIX}_priority_requests",
            "Inference requests by priority class and outcome (ok, refused, error).",
            ["priority", "outcome"],
            registry=r,
        )
        self.priority_latency = Histogram(
            f"{PREFIX}_priority_request_duration_seconds",
            "Latency of answered inference requests, by priority class.",
            ["priority"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_latency = Histogram(
            f"{PREFIX}_decode_duration_seconds",
            "Image decode + preprocess time.",
            MODEL_LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_latency = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Time an image waited for the model.",
            MODEL_LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_latency = Histogram(
            f"{PREFIX}_inference_duration_seconds",
            "Model forward time per batch.",
            MODEL_LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size",
            "Images per forward pass.",
            MODEL_LABELS,
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            f"{PREFIX}_images", "Images classified or refused.", ["outcome"], registry=r
        )
        self.rejections = Counter(
            f"{PREFIX}_rejections",
            "Requests or images refused, by error code.",
            ["reason"],
            registry=r,
        )
        self.cache_lookups = Counter(
            f"{PREFIX}_response_cache_lookups",
            "Response cache look-ups, by result (hit or miss).",
            ["result"],
            registry=r,
        )
        self.cache_bytes = Gauge(
            f"{PREFIX}_response_cache_bytes",
            "Bytes the response cache holds.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth",
            "Images waiting for the model.",
            MODEL_LABELS,
            multiprocess_mode="livesum",
            registry=r,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_in_flight_requests",
            "HTTP requests being processed.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.ready = Gauge(
            f"{PREFIX}_ready",
            "1 when the model is loaded and warmed.",
            multiprocess_mode="livemin",
            registry=r,
        )
        self.model_info = Gauge(
            f"{PREFIX}_model_info",
            "The served models (value is 1 while loaded, 0 once unloaded).",
            ["name", "version", "precision", "runtime", "weights_sha256", "random_weights"],
            multiprocess_mode="max",
            registry=r,
        )
        self._on_demand_metrics(r)

    def _on_demand_metrics(self, r: CollectorRegistry) -> None:
        """Models on demand and shadow versions (labels: the repository's names only)."""
        self.model_loads = Counter(
            f"{PREFIX}_model_loads",
            "Model versions loaded (outcome: ok, failed).",
            [*MODEL_LABELS, "outcome"],
            registry=r,
        )
        self.model_unloads = Counter(
            f"{PREFIX}_model_unloads",
            "Model versions unloaded (reason: budget is an eviction; idle, retired, start).",
            [*MODEL_LABELS, "reason"],
            registry=r,
        )
        self.model_load_seconds = Histogram(
            f"{PREFIX}_model_load_seconds",
            "Time to load and warm one model version.",
            ["model"],
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.cold_wait_seconds = Histogram(
            f"{PREFIX}_cold_request_wait_seconds",
            "How long a request waited for its model to load (models on demand).",
            ["model"],
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.models_resident_bytes = Gauge(
            f"{PREFIX}_models_resident_bytes",
            "Resident memory the loaded models' loads added (summed over workers).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.shadow_compared = Counter(
            f"{PREFIX}_shadow_compared",
            "Requests run on a shadow version (result: agreed, differed, skipped).",
            [*MODEL_LABELS, "result"],
            registry=r,
        )
        self.shadow_agreement = Gauge(
            f"{PREFIX}_shadow_agreement",
            "Top-1 agreement of a shadow version with the served one over its window.",
            list(MODEL_LABELS),
            multiprocess_mode="livemin",
            registry=r,
        )
        self.shadow_score_drift = Gauge(
            f"{PREFIX}_shadow_score_drift",
            "Mean absolute difference of the served top class's score, over the window.",
            list(MODEL_LABELS),
            multiprocess_mode="livemax",
            registry=r,
        )

    def count_priority(
        self,
        wanted: str,
        answered: bool,
        code: str | None,
        seconds: float | None = None,
        count: int = 1,
    ) -> None:
        """Inference requests of one class (every face alike): ok, refused (overloaded) or
        error; an answered request's latency when given."""
        outcome = "refused" if code == "overloaded" else "ok" if answered else "error"
        self.priority_requests.labels(wanted, outcome).inc(count)
        if outcome == "ok" and seconds is not None:
            self.priority_latency.labels(wanted).observe(seconds)

    def observer(self, model: str, version: str) -> ModelMetrics:
        """The engine's and decoder's observer for one model version (its labelled series).
        ``model`` and ``version`` come from the repository, never from a request."""
        return ModelMetrics(self, model, version)

    def close(self) -> None:
        """A worker stopping: drop its live gauges from the shared multiprocess view."""
        if multiprocess_dir():
            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    # --- exposition ----------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """The text exposition: this process, or every worker in multiprocess mode."""
        directory = multiprocess_dir()
        if directory:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class ModelMetrics:
    """One model version's series, bound once (a ``labels()`` look-up per batch costs more
    than the observation)."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self._queue_depth = metrics.queue_depth.labels(model, version)
        self._batch_size = metrics.batch_size.labels(model, version)
        self._inference = metrics.inference_latency.labels(model, version)
        self._queue = metrics.queue_latency.labels(model, version)
        self._decode = metrics.decode_latency.labels(model, version)
        self._cache_lookups = metrics.cache_lookups
        self._cache_bytes = metrics.cache_bytes

    def batch_done(
        self, size: int, inference_s: float, queue_waits_s: Sequence[float], queue_depth: int
    ) -> None:
        self._queue_depth.set(queue_depth)
        self._batch_size.observe(size)
        self._inference.observe(inference_s)
        for wait in queue_waits_s:
            self._queue.observe(wait)

    def decoded(self, seconds: float) -> None:
        self._decode.observe(seconds)

    def cache_lookup(self, hit: bool, cached_bytes: int) -> None:
        self._cache_lookups.labels("hit" if hit else "miss").inc()
        self._cache_bytes.set(cached_bytes)
