"""What every face of a worker shares: the classifier once loaded, readiness, draining, the
replica's word, metrics and the upload budget (one per worker, never module-global)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from resnet_service.config import Settings
from resnet_service.core.classifier import Classifier
from resnet_service.core.errors import NotReady
from resnet_service.service.metrics import Metrics
from resnet_service.service.upload_budget import UploadBudget


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


@dataclass
class ServiceState:
    """The state of one worker's service, shared by its HTTP and gRPC faces."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    classifier: Classifier | None = None
    draining: bool = False
    startup_error: str | None = None
    replica: ReplicaView | None = None
    upload_budget: UploadBudget = field(init=False)

    def __post_init__(self) -> None:
        self.upload_budget = UploadBudget(self.settings.max_buffered_upload_bytes)

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
