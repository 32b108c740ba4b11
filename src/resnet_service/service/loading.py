"""Bringing a worker's service up: load and warm the classifier, then say so in the metrics and
the log. Shared by the worker (which loads before it listens) and the app's lifespan (which
loads in the background for in-process use)."""

from __future__ import annotations

import logging
from pathlib import Path

from resnet_service import logs
from resnet_service.config import Settings
from resnet_service.core.classifier import MODEL_VERSION, Classifier
from resnet_service.service.metrics import Metrics
from resnet_service.service.state import ServiceState

log = logging.getLogger("resnet_service.service")


def load_classifier(
    settings: Settings, metrics: Metrics, artifact: Path | None = None
) -> Classifier:
    """Resolve and build (or load) the model, warm the engine up; blocking. ``artifact``: a
    built model the caller already found (a worker, after the preflight)."""
    from resnet_service.model.opening import open_served_model

    classifier = Classifier(open_served_model(settings, artifact), settings, observer=metrics)
    classifier.start()
    return classifier


def announce_ready(state: ServiceState) -> None:
    """The model info gauge and readiness, once the classifier is warm."""
    classifier = state.require_classifier()
    info = classifier.model.info
    state.metrics.model_info.labels(
        info.name,
        info.precision,
        info.runtime,
        info.weights_sha256[:12],
        str(info.random_weights).lower(),
    ).set(1)
    state.metrics.ready.set(1)
    logs.set_model(info.name, MODEL_VERSION)
    log.info("ready: %s (%s, %s)", info.name, info.precision, info.runtime)
