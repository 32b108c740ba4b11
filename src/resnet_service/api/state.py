"""Per-app runtime state: the classifier once loaded, readiness, draining, per-route limits."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Final, Protocol

from resnet_service.api.metrics import Metrics
from resnet_service.api.multipart import FormLimits, UploadBudget
from resnet_service.api.schemas import ModelRef
from resnet_service.classifier import Classifier
from resnet_service.config import Settings
from resnet_service.errors import NotReady

# Multipart framing around an image: part headers and boundaries.
_FORM_OVERHEAD: Final = 64 * 1024


class ReplicaView:
    """The supervisor's word on the whole replica, shared by its workers: one byte in a file
    (``S`` starting, ``R`` ready, ``D`` draining), read on every readiness probe, so that
    ``/readyz`` gives one answer whichever worker takes the probe."""

    STARTING: Final = b"S"
    READY: Final = b"R"
    DRAINING: Final = b"D"

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY)

    def state(self) -> bytes:
        return os.pread(self._fd, 1, 0)

    def close(self) -> None:
        os.close(self._fd)


class Face(Protocol):
    """Another protocol served beside HTTP by the same worker (the gRPC face)."""

    async def start(self) -> None: ...

    async def stop(self, grace_s: float) -> None: ...


@dataclass
class ServiceState:
    """What the routes need; one per app (never module-global)."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    classifier: Classifier | None = None
    draining: bool = False
    startup_error: str | None = None
    replica: ReplicaView | None = None
    faces: list[Face] = field(default_factory=list)
    upload_budget: UploadBudget = field(init=False)
    _model_ref: ModelRef | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.upload_budget = UploadBudget(self.settings.max_buffered_upload_bytes)

    @cached_property
    def single_image_limits(self) -> FormLimits:
        return FormLimits(
            file_fields=frozenset({"image"}),
            max_files=1,
            max_file_bytes=self.settings.max_upload_bytes,
            max_body_bytes=self.settings.max_upload_bytes + _FORM_OVERHEAD,
        )

    @cached_property
    def batch_limits(self) -> FormLimits:
        return FormLimits(
            file_fields=frozenset({"images"}),
            max_files=self.settings.max_batch_files,
            max_file_bytes=self.settings.max_upload_bytes,
            max_body_bytes=self.settings.max_batch_bytes,
        )

    def readiness_problem(self) -> str | None:
        """Why this replica should get no new traffic, or None when it is ready."""
        if self.draining:
            return "The service is shutting down; send new requests elsewhere."
        if self.classifier is None or not self.classifier.ready:
            return f"The service is not ready: {self.startup_error or 'the model is loading'}."
        if self.replica is not None:
            state = self.replica.state()
            if state == ReplicaView.DRAINING:
                return "The service is shutting down; send new requests elsewhere."
            if state != ReplicaView.READY:
                return "The service is not ready: its worker processes are still starting."
        return None

    def require_classifier(self) -> Classifier:
        """The classifier, or ``NotReady`` (503 + Retry-After) while starting or stopped.

        Draining does not refuse work: requests keep being served until the server stops
        accepting them; only /readyz turns 503, so load balancers stop sending new ones."""
        if self.classifier is None or not self.classifier.ready:
            reason = self.startup_error or "the model is still loading"
            raise NotReady(f"The service is not ready: {reason}.", 2)
        return self.classifier

    def model_ref(self) -> ModelRef:
        """Which model answers (built once: the model never changes while served)."""
        if self._model_ref is None:
            info = self.require_classifier().model.info
            self._model_ref = ModelRef(
                name=info.name,
                precision=info.precision,
                runtime=info.runtime,
                weights_sha256=info.weights_sha256[:12],
                random_weights=info.random_weights,
            )
        return self._model_ref
