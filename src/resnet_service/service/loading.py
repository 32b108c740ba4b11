"""Bringing a worker's service up: load and warm the classifier, then say so in the metrics and
the log. Shared by the worker (which loads before it listens) and the app's lifespan (which
loads in the background for in-process use)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from prometheus_client import Gauge

from resnet_service import logs
from resnet_service.config import Settings
from resnet_service.core.admission import AdmissionPolicy
from resnet_service.core.classifier import MODEL_VERSION, Classifier, ClassifierOptions
from resnet_service.core.engine import ComputeGate
from resnet_service.core.images import ImageLimits
from resnet_service.cpus import threads_per_worker
from resnet_service.service.metrics import Metrics
from resnet_service.service.models import ServedVersion, VersionState
from resnet_service.service.state import ServiceState

log = logging.getLogger("resnet_service.service")


def classifier_options(settings: Settings) -> ClassifierOptions:
    """What a classifier uses of the settings (a model's own config already applied), in the
    core's units."""
    return ClassifierOptions(
        decode_threads=settings.decode_threads
        or threads_per_worker(settings.inference_threads, settings.workers or 1),
        limits=ImageLimits(settings.max_upload_bytes, settings.max_pixels),
        preprocessing=settings.preprocessing,
        max_top_k=settings.max_top_k,
        default_top_k=settings.default_top_k,
        max_batch_size=settings.max_batch_size,
        max_batch_wait_s=settings.max_batch_wait_ms / 1000,
        queue_capacity=settings.queue_capacity,
        request_timeout_s=settings.request_timeout_s,
        shutdown_grace_s=settings.shutdown_grace_s,
        admission=AdmissionPolicy(
            bound_s=settings.effective_queue_budget_ms / 1000,
            target_s=settings.queue_target_ms / 1000,
            interval_s=settings.queue_interval_ms / 1000,
            floor_images=settings.max_batch_size,
        ),
        response_cache_bytes=int(settings.response_cache_mb * 2**20),
    )


def load_classifier(
    settings: Settings,
    metrics: Metrics,
    artifact: Path | None = None,
    *,
    name: str | None = None,
    version: str = MODEL_VERSION,
    display_names: Mapping[str, str] | None = None,
    compute: ComputeGate | None = None,
) -> Classifier:
    """Resolve and build (or load) the model, warm the engine up; blocking. ``artifact``: a
    built model the caller already found (a worker, after the preflight). ``name`` and
    ``version``: how requests reach it (a repository's folders; default: the model's own name,
    version 1); ``display_names``: labels to show instead of the model's own."""
    from resnet_service.model.served import open_served_model
    from resnet_service.model.tag_rules_file import tag_rules_for

    model = open_served_model(settings, artifact)
    own_labels = model.labels
    rules = tag_rules_for(settings, own_labels)  # rules name the model's labels, not display names
    if display_names:
        model = replace(model, labels=[display_names.get(label, label) for label in model.labels])
    served = name or model.info.name
    classifier = Classifier(
        model,
        classifier_options(settings),
        observer=metrics.observer(served, version),
        name=served,
        version=version,
        compute=compute,
        tag_rules=rules,
        own_labels=own_labels,
    )
    classifier.start()
    model_info_gauge(metrics, classifier).set(1)
    return classifier


def model_info_gauge(metrics: Metrics, classifier: Classifier) -> Gauge:
    """The ``model_info`` series of one loaded version (1 while loaded, 0 once unloaded)."""
    info = classifier.model.info
    return metrics.model_info.labels(
        classifier.name,
        classifier.version,
        info.precision,
        info.runtime,
        info.weights_sha256[:12],
        str(info.random_weights).lower(),
    )


def serve_one(state: ServiceState, classifier: Classifier) -> None:
    """Without a repository: a repository of one model, version 1."""
    state.models.put(
        ServedVersion(
            classifier.name, classifier.version, VersionState.READY, classifier=classifier
        )
    )
    state.models.expect({classifier.name})


def announce_ready(state: ServiceState) -> None:
    """Readiness in the metrics and the log, once the default model is warm."""
    classifier = state.require_classifier()
    info = classifier.model.info
    state.metrics.ready.set(1)
    logs.set_model(classifier.name, classifier.version)
    log.info(
        "ready: %s version %s (%s, %s)",
        classifier.name,
        classifier.version,
        info.precision,
        info.runtime,
    )
