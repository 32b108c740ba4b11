"""What every face of a worker shares: the classifier once loaded, readiness, draining, the
replica's word, metrics and the upload budget (one per worker, never module-global)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol, TypeVar

from resnet_service.config import Settings
from resnet_service.core.admission import Ticket
from resnet_service.core.classifier import Classifier
from resnet_service.core.errors import ControlOff, ModelCold, NotReady
from resnet_service.service.metrics import Metrics
from resnet_service.service.models import ModelTable
from resnet_service.service.upload_budget import UploadBudget

T = TypeVar("T")


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


class RepositoryControl(Protocol):
    """The model repository's control, as the faces call it (``service.repository``)."""

    def load(self, name: str) -> None: ...

    def unload(self, name: str) -> None: ...

    def stop(self) -> None: ...


class Demand(Protocol):
    """Models on demand, as requests call it (``service.on_demand.OnDemand``)."""

    async def wait(self, model: str, version: str, timeout_s: float) -> None: ...


@dataclass
class ServiceState:
    """The state of one worker's service, shared by its HTTP and gRPC faces."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    models: ModelTable = field(default_factory=ModelTable)
    draining: bool = False
    startup_error: str | None = None
    replica: ReplicaView | None = None
    #: Set when serving a model repository (None: one model from the settings).
    repository: RepositoryControl | None = None
    #: Set when the repository's models load on demand.
    demand: Demand | None = None
    upload_budget: UploadBudget = field(init=False)

    def __post_init__(self) -> None:
        self.upload_budget = UploadBudget(self.settings.max_buffered_upload_bytes)

    @property
    def classifier(self) -> Classifier | None:
        """The default model's serving version (None while none is ready)."""
        return self.models.default_classifier()

    def readiness_problem(self) -> str | None:
        """Why this replica should get no new traffic, or None when it is ready: every model
        the repository asks for has a warm version and none is still loading."""
        if self.draining:
            return "The service is shutting down; send new requests elsewhere."
        if self.startup_error is not None:
            return f"The service is not ready: {self.startup_error}."
        problem = self.models.readiness_problem()
        if problem is not None:
            return f"The service is not ready: {problem}."
        if self.replica is not None:
            state = self.replica.state()
            if state == ReplicaView.DRAINING:
                return "The service is shutting down; send new requests elsewhere."
            if state != ReplicaView.READY:
                return "The service is not ready: its worker processes are still starting."
        return None

    def require_classifier(
        self, model: str | None = None, version: str | None = None
    ) -> Classifier:
        """The classifier a request names (default model, highest ready version when it names
        none); ``NotReady`` (503 + Retry-After) while starting or stopped, ``ModelNotFound``
        (404) for what this replica does not serve.

        Draining does not refuse work: requests keep being served until the server stops
        accepting them; only /readyz turns 503, so load balancers stop sending new ones."""
        if self.startup_error is not None and not self.models.names():
            raise NotReady(f"The service is not ready: {self.startup_error}.", 2)
        classifier = self.models.resolve(model, version)
        if not classifier.ready:
            raise NotReady("The service is not ready: the model is starting or stopping.", 2)
        return classifier

    def admit(
        self, model: str | None, version: str | None, admit: Callable[[Classifier], Ticket]
    ) -> tuple[Classifier, Ticket]:
        """Resolve the request's model and admit it there. A version retired between the two
        steps (a swap under way) is skipped for its successor: its reconciler marks it
        retiring *before* it checks that nothing is admitted, so a request either holds a
        ticket it waits for, or sees the mark and goes to the new version."""
        for _ in range(3):
            classifier = self.require_classifier(model, version)
            try:
                ticket = admit(classifier)
            except NotReady:
                if classifier.retiring:
                    continue
                raise
            if not classifier.retiring:
                return classifier, ticket
            ticket.release()
        raise NotReady("The model is being replaced; retry.", 1)

    async def admit_loaded(
        self, model: str | None, version: str | None, admit: Callable[[Classifier], Ticket]
    ) -> tuple[Classifier, Ticket]:
        """``admit``, first waiting for a model on demand to load (see ``when_loaded``)."""
        return await self.when_loaded(lambda: self.admit(model, version, admit))

    async def classifier_loaded(self, model: str | None, version: str | None) -> Classifier:
        """``require_classifier``, first waiting for a model on demand to load."""

        def resolve() -> Classifier:
            classifier = self.require_classifier(model, version)
            classifier.last_used = time.monotonic()  # not the next one evicted
            return classifier

        return await self.when_loaded(resolve)

    async def when_loaded(self, attempt: Callable[[], T]) -> T:
        """``attempt()``; while it finds its model available but not loaded (models on
        demand), wait for the load within the request's deadline and try again (an eviction
        between the load and the attempt loads it again)."""
        deadline = time.monotonic() + self.settings.request_timeout_s
        while True:
            try:
                return attempt()
            except ModelCold as cold:
                if self.demand is None:
                    raise
                await self.demand.wait(cold.model, cold.version, deadline - time.monotonic())

    def require_repository(self) -> RepositoryControl:
        """The repository's control, or ``ControlOff`` when serving one model from settings."""
        if self.repository is None:
            raise ControlOff(
                "This server serves one model from its settings, not a model repository: "
                "start it with RESNET_SERVICE_MODEL_REPOSITORY=DIR to load and unload models."
            )
        return self.repository
