"""The models a worker serves: every version with its state, and the routing of a request that
names a model (or none: the default) and maybe a version (or none: the highest ready one).

Written by one thread (the repository's reconciler), read on every request from the event
loop: the table is a dict replaced whole under a lock (copy on write), so a reader never takes
the lock and never sees half a change.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final

from resnet_service.core.classifier import Classifier
from resnet_service.core.errors import ModelCold, ModelNotFound, ModelNotNamed, NotReady
from resnet_service.service.shadow import Shadow
from resnet_service.service.traffic import TrafficSplit


class VersionState(StrEnum):
    """Triton's model states, as the repository index reports them, and ``AVAILABLE``: on
    disk and ready to load on the first request (models on demand)."""

    AVAILABLE = "AVAILABLE"
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True, slots=True)
class ServedVersion:
    """One version of one model in this worker."""

    model: str
    version: str
    state: VersionState
    reason: str = ""
    classifier: Classifier | None = None
    #: Resident memory the load added to this worker, in bytes (None: not measured).
    memory_bytes: int | None = None
    #: The version folder's identity on disk (see ``repository.VersionDir.stamp``).
    stamp: str = ""

    def with_state(self, state: VersionState, reason: str = "") -> ServedVersion:
        return replace(self, state=state, reason=reason)


Table = dict[str, dict[str, ServedVersion]]

#: On demand, a request for a version in these states waits for it to (re)load.
_COLD: Final = (VersionState.AVAILABLE, VersionState.LOADING, VersionState.UNLOADING)
#: The states of a version that holds its classifier's memory.
_HELD: Final = (VersionState.READY, VersionState.LOADING, VersionState.UNLOADING)


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One line of the repository index."""

    name: str
    version: str
    state: VersionState
    reason: str


def _numeric(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isdigit() else (0, version)


class ModelTable:
    """Models by name, versions by number, and which model a request without a name gets."""

    def __init__(self, default_model: str | None = None) -> None:
        self._configured_default = default_model
        self._lock = threading.Lock()
        self._table: Table = {}
        #: The models the repository asks for (readiness waits for each of them).
        self._expected: frozenset[str] | None = None
        #: Models on demand: loaded on a request (readiness does not wait for them).
        self._available: frozenset[str] = frozenset()
        #: Set by the repository when models load on demand: a request for an available or
        #: loading version gets ``ModelCold`` (wait for it) instead of ``NotReady``.
        self.on_demand = False
        #: Per model, the split of requests naming no version between versions (canary).
        self._splits: dict[str, TrafficSplit] = {}
        self._shadows: dict[str, Shadow] = {}
        #: Models on demand that stay loaded.
        self.pinned: frozenset[str] = frozenset()

    # --- writing (the reconciler) --------------------------------------------------------
    def put(self, entry: ServedVersion) -> None:
        with self._lock:
            table = {name: dict(versions) for name, versions in self._table.items()}
            table.setdefault(entry.model, {})[entry.version] = entry
            self._table = table

    def drop(self, model: str, version: str) -> None:
        with self._lock:
            table = {name: dict(versions) for name, versions in self._table.items()}
            table.get(model, {}).pop(version, None)
            self._table = table

    def know(self, model: str) -> None:
        """A model the repository has, with no version in this worker (yet, or unloaded)."""
        with self._lock:
            if model not in self._table:
                self._table = {**self._table, model: {}}

    def forget(self, model: str) -> None:
        with self._lock:
            self._table = {k: v for k, v in self._table.items() if k != model}

    def expect(self, models: set[str], available: set[str] | None = None) -> None:
        """Readiness waits for ``models``; ``available`` ones load on request."""
        self._available = frozenset(available or ())
        self._expected = frozenset(models)

    def route(self, model: str, split: TrafficSplit | None, shadow: Shadow | None) -> None:
        """Route requests for ``model`` that name no version by ``split`` (None: the highest
        ready version); ``shadow``: its shadow version's comparisons, for the index."""
        with self._lock:
            splits = {k: v for k, v in self._splits.items() if k != model}
            shadows = {k: v for k, v in self._shadows.items() if k != model}
            if split is not None:
                splits[model] = split
            if shadow is not None:
                shadows[model] = shadow
            self._splits, self._shadows = splits, shadows

    def traffic(self, model: str) -> TrafficSplit | None:
        return self._splits.get(model)

    def shadow(self, model: str) -> Shadow | None:
        return self._shadows.get(model)

    def resident(self) -> list[ServedVersion]:
        """The versions holding memory (loaded, or finishing their work)."""
        return [e for e in self.index() if e.state in _HELD and e.classifier is not None]

    def can_serve(self, name: str, version: str) -> bool:
        """Whether ``version`` can take a request now (or, on demand, once loaded)."""
        return _serves(self.entry(name, version), self.on_demand)

    # --- reading (every request) ---------------------------------------------------------
    def readiness_problem(self) -> str | None:
        """None when every expected model has a ready version (a model loading a new version
        while an old one serves is ready: a rollout must not take replicas out)."""
        if self._expected is None:
            return "the model is loading"
        missing = [name for name in sorted(self._expected) if self.serving(name) is None]
        if not self._expected and not self._available:
            return "the model repository asks for no model"
        if not missing:
            return None
        details = []
        for name in missing:
            versions = self.versions(name)
            states = ", ".join(
                f"version {v.version} {v.state}" + (f" ({v.reason})" if v.reason else "")
                for v in versions
            )
            details.append(f"model '{name}': {states or 'no version'}")
        return "; ".join(details)

    def names(self) -> list[str]:
        return sorted(self._table)

    def versions(self, model: str) -> list[ServedVersion]:
        """The model's versions, highest first."""
        found = self._table.get(model, {})
        return [found[v] for v in sorted(found, key=_numeric, reverse=True)]

    def entry(self, model: str, version: str) -> ServedVersion | None:
        return self._table.get(model, {}).get(version)

    def index(self) -> list[ServedVersion]:
        return [entry for name in self.names() for entry in self.versions(name)]

    def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        """The OIP repository index: every version with its state; a model with none loaded
        is listed once, UNAVAILABLE."""
        entries = []
        for name in self.names():
            versions = self.versions(name)
            if not versions and not ready_only:
                entries.append(IndexEntry(name, "", VersionState.UNAVAILABLE, "unloaded"))
            for v in versions:
                if not ready_only or v.state is VersionState.READY:
                    entries.append(IndexEntry(name, v.version, v.state, v.reason))
        return entries

    @property
    def default_name(self) -> str | None:
        """The configured default (``serve`` names the repository's only model at start), or
        the only model; None with several and none named: never one picked by name order,
        which would change under a client's feet when a model is published."""
        if self._configured_default is not None:
            return self._configured_default
        names = self.names()
        return names[0] if len(names) == 1 else None

    def serving(self, model: str) -> ServedVersion | None:
        """The highest READY version of ``model``: where a request without a version goes."""
        for entry in self.versions(model):
            if entry.state is VersionState.READY and entry.classifier is not None:
                return entry
        return None

    def default_classifier(self) -> Classifier | None:
        name = self.default_name
        entry = self.serving(name) if name is not None else None
        return entry.classifier if entry is not None else None

    def classifiers(self) -> list[Classifier]:
        """Every loaded classifier (ready or finishing its work)."""
        return [e.classifier for e in self.index() if e.classifier is not None]

    def resolve(self, model: str | None, version: str | None) -> Classifier:
        """The classifier for a request, or the error that says what to fix."""
        name = model or self.default_name
        if name is None and len(self.names()) > 1:
            raise ModelNotNamed(
                f"This server has {_listing(self.names())} and no default model: name one "
                "(?model=NAME on the JSON API, the path on OIP), or start it with "
                "--default-model NAME (RESNET_SERVICE_DEFAULT_MODEL)."
            )
        if name is None:
            raise NotReady("The service is not ready: no model is loaded yet.", 2)
        if name not in self._table:
            raise ModelNotFound(
                f"No model named '{name}'; this server has {_listing(self.names())} "
                "(GET /models lists them)."
            )
        split = self._splits.get(name)
        if not version and split is not None:
            version = split.pick(lambda v: self.can_serve(name, v))
        if version:
            return self._version(name, version)
        entry = self.serving(name)
        if entry is not None:
            assert entry.classifier is not None
            return entry.classifier
        versions = self.versions(name)
        if self.on_demand:
            for v in versions:
                if v.state in _COLD:
                    raise ModelCold.of(name, v.version)
        if not versions:
            raise ModelNotFound(
                f"Model '{name}' has no version loaded (unloaded, or none on disk)."
            )
        if any(v.state is VersionState.LOADING for v in versions):
            raise NotReady(f"The service is not ready: model '{name}' is loading.", 2)
        reasons = "; ".join(f"version {v.version}: {v.reason or v.state}" for v in versions)
        raise ModelNotFound(f"Model '{name}' has no ready version ({reasons}).")

    def _version(self, name: str, version: str) -> Classifier:
        entry = self.entry(name, version)
        if entry is None:
            have = [v.version for v in self.versions(name)]
            raise ModelNotFound(
                f"Model '{name}' has no version '{version}'; it has {_listing(have)}."
            )
        if self.on_demand and entry.state in _COLD:
            raise ModelCold.of(name, version)
        if entry.state is VersionState.LOADING:
            raise NotReady(f"Version {version} of model '{name}' is loading.", 2)
        if entry.state is not VersionState.READY or entry.classifier is None:
            why = f": {entry.reason}" if entry.reason else ""
            raise ModelNotFound(f"Version {version} of model '{name}' is {entry.state}{why}.")
        return entry.classifier


def _serves(entry: ServedVersion | None, on_demand: bool) -> bool:
    if entry is None:
        return False
    if on_demand and entry.state in _COLD:
        return True
    return entry.state is VersionState.READY


def _listing(items: list[str]) -> str:
    return ", ".join(f"'{item}'" for item in items) if items else "none"
