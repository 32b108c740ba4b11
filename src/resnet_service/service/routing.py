"""A repository model's routing between its versions, from its config: the traffic split
(``service.traffic``) and the shadow (``service.shadow``), kept across repository passes
while the config says the same, so a split's round-robin and a shadow's window (and a stop)
survive them."""

from __future__ import annotations

from collections.abc import Callable

from resnet_service.core.classifier import Classifier
from resnet_service.model.repository_layout import RepositoryModel, ShadowConfig
from resnet_service.service.models import VersionState
from resnet_service.service.shadow import Shadow, ShadowRule
from resnet_service.service.state import ServiceState
from resnet_service.service.traffic import TrafficSplit


def _split(model: RepositoryModel) -> TrafficSplit | None:
    """The config's split; with a shadow and no split, every request goes to the highest
    other version (a shadow's answers are never returned, so it takes no traffic unless the
    split gives it some)."""
    config = model.config
    if config.traffic:
        return TrafficSplit({str(v): w for v, w in config.traffic.items()})
    if config.shadow is None:
        return None
    others = [v.version for v in model.wanted() if v.version != config.shadow.version]
    return TrafficSplit({str(max(others)): 1.0}) if others else None


class Routing:
    """Every model's split and shadow in one worker."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        #: Models on demand: ask for a version's load without waiting (None: off).
        self.request_load: Callable[[str, str], object] | None = None
        #: Per model: the config its split and shadow (in the model table) were built from.
        self._configs: dict[str, str] = {}

    def update(self, models: dict[str, RepositoryModel]) -> None:
        """Follow the configs of one repository pass (a changed config starts afresh)."""
        table = self.state.models
        for name in list(self._configs):
            if name not in models:
                del self._configs[name]
                table.route(name, None, None)
        for name, model in models.items():
            config = model.config
            said = config.model_dump_json(include={"traffic", "shadow"}) + repr(
                [v.version for v in model.wanted()]
            )
            if self._configs.get(name) == said:
                continue
            split = _split(model)
            self._configs[name] = said
            table.route(name, split, self._shadow(name, config.shadow, split))
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
        if entry.state is VersionState.AVAILABLE and self.request_load is not None:
            self.request_load(name, version)
        return entry.classifier if entry.state is VersionState.READY else None

    def attach(self, name: str) -> None:
        """Give ``name``'s loaded versions their shadow tap (or take it away)."""
        shadow = self.state.models.shadow(name)
        for entry in self.state.models.versions(name):
            if entry.classifier is not None:
                entry.classifier.shadow = shadow.tap(entry.classifier) if shadow else None
