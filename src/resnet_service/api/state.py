"""Per-app runtime state: the classifier once loaded, readiness and draining."""

from __future__ import annotations

from dataclasses import dataclass, field

from resnet_service.api.metrics import Metrics
from resnet_service.api.multipart import UploadBudget
from resnet_service.api.schemas import ModelRef
from resnet_service.classifier import Classifier
from resnet_service.config import Settings
from resnet_service.errors import NotReady


@dataclass
class ServiceState:
    """What the routes need; one per app (never module-global)."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    classifier: Classifier | None = None
    draining: bool = False
    startup_error: str | None = None
    upload_budget: UploadBudget = field(init=False)
    _model_ref: ModelRef | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.upload_budget = UploadBudget(self.settings.max_buffered_upload_bytes)

    @property
    def ready(self) -> bool:
        return self.classifier is not None and self.classifier.ready and not self.draining

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
                weights_sha256=info.weights_sha256[:12],
                random_weights=info.random_weights,
            )
        return self._model_ref
