"""A repository model's routing between its versions, from its config: the traffic split
(``service.traffic``) and the shadow (``service.shadow``), kept across repository passes
while the config says the same, so a split's round-robin and a shadow's window (and a stop)
survive them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from resnet_service.core.classifier import Classifier
from resnet_service.model.repository_layout import RepositoryModel, ShadowConfig
from resnet_service.service.models import VersionState
from resnet_service.service.shadow import Shadow, ShadowRule
from resnet_service.service.state import ServiceState
from resnet_service.service.traffic import TrafficSplit

if TYPE_CHECKING:
    from resnet_service.service.on_demand import OnDemand


class Routing:
    """Every model's split and shadow in one worker."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self.on_demand: OnDemand | None = None
        #: Per model: the config it was built from, and what was built.
        self._configs: dict[str, tuple[str, TrafficSplit | None, Shadow | None]] = {}

    def update(self, models: dict[str, RepositoryModel]) -> None:
        """Follow the configs of one repository pass (a changed config starts afresh)."""
        table = self.state.models
        for name in list(self._configs):
            if name not in models:
                del self._configs[name]
                table.route(name, None, None)
        for name, model in models.items():
            config = model.config
            said = config.model_dump_json(include={"traffic", "shadow"})
            if name in self._configs and self._configs[name][0] == said:
                continue
            split = (
                TrafficSplit({str(v): w for v, w in config.traffic.items()})
                if config.traffic
                else None
            )
            shadow = self._shadow(name, config.shadow, split)
            self._configs[name] = (said, split, shadow)
            table.route(name, split, shadow)
            self.attach(name)

    def _shadow(
        self, name: str, config: ShadowConfig | None, split: TrafficSplit | None
    ) -> Shadow | None:
        if config is None:
            return None
        rule = ShadowRule(str(config.version), config.fraction, config.min_agreement, config.window)

        def on_stop(reason: str) -> None:
            if split is not None:
                split.stop(rule.version, reason)

        return Shadow(
            name, rule, lambda: self._classifier(name, rule.version), on_stop, self.state.metrics
        )

    def _classifier(self, name: str, version: str) -> Classifier | None:
        """The shadow version's classifier; on demand, an available one is asked to load
        (this comparison is skipped, later ones run)."""
        entry = self.state.models.entry(name, version)
        if entry is None:
            return None
        if entry.state is VersionState.AVAILABLE and self.on_demand is not None:
            self.on_demand.request(name, version)
        return entry.classifier if entry.state is VersionState.READY else None

    def attach(self, name: str) -> None:
        """Give ``name``'s loaded versions their shadow tap (or take it away)."""
        shadow = self.shadow(name)
        for entry in self.state.models.versions(name):
            if entry.classifier is not None:
                entry.classifier.shadow = shadow.tap(entry.version) if shadow else None

    def shadow(self, name: str) -> Shadow | None:
        found = self._configs.get(name)
        return found[2] if found is not None else None
