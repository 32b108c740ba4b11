"""The model repository, served: what a worker loads, keeps and unloads, and when.

One reconciler per worker compares what the repository asks for (its folders, each model's
version policy and, in ``explicit`` mode, what the control routes loaded or unloaded) with
what the worker has, and closes the gap one version at a time:

- a new version is built in a child process (workers never import torch for a torch-free
  runtime), loaded and warmed beside the serving one, and only then takes traffic;
- a version that fails to build or load never takes traffic; the one before keeps serving and
  the index says why (it is tried again only when its folder changes);
- a version no longer asked for leaves the routing table first, finishes what it accepted,
  then stops, and its memory goes back to the system. A model's old versions go only once one
  of its wanted versions is ready.

``none`` reads the repository once; ``poll`` looks again every ``repository_poll_s``;
``explicit`` looks again whenever the control file changes (a load or an unload, from any
worker: the file lives in the replica's run directory, so every worker follows).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from resnet_service.config import ENV_PREFIX, Settings
from resnet_service.core.engine import ComputeGate
from resnet_service.core.errors import ControlOff, ModelLoadFailed, ModelNotFound, ServiceError
from resnet_service.model.repository_layout import (
    RepositoryModel,
    VersionDir,
    scan,
    version_rules_file,
    version_settings,
)
from resnet_service.service.builder_process import BuildFailed, build_in_child
from resnet_service.service.control import ControlFile
from resnet_service.service.loading import load_classifier, model_info_gauge
from resnet_service.service.models import ModelTable, ServedVersion, VersionState
from resnet_service.service.on_demand import OnDemand
from resnet_service.service.routing import Routing
from resnet_service.service.state import ServiceState
from resnet_service.service.tag_rules_watch import CHECK_S as RULES_CHECK_S
from resnet_service.service.tag_rules_watch import TagRulesWatch

log = logging.getLogger("resnet_service.repository")

#: How often ``explicit`` mode checks the control file (a stat: cheap).
_CONTROL_CHECK_S: Final = 0.2
#: How long a load or unload waits for every worker of the replica to apply it.
_REPLICA_WAIT_S: Final = 600.0
#: After a load, how long the queues it made stand may drain before shedding can start.
_SETTLE_S: Final = 2.0


@dataclass(frozen=True, slots=True)
class Failure:
    """A version that could not be loaded, and the folder state it failed with."""

    stamp: str
    reason: str


def resident_bytes() -> int | None:
    """This process's resident memory (Linux ``/proc``; None elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _return_memory() -> None:
    """Give freed heap back to the system (glibc keeps it otherwise; RSS would not drop).

    The worker froze its start-up heap (``server.worker``), which may hold the version just
    retired: thawed for one full collection, then frozen again (a rare pause, at a retire)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return


class Reconciler:
    """Keeps one worker's ``ModelTable`` in line with the repository."""

    def __init__(self, state: ServiceState, root: Path, control: ControlFile) -> None:
        self.state = state
        self.settings = state.settings
        self.root = root
        self.control = control
        self.failures: dict[tuple[str, str], Failure] = {}
        #: A model's folder problem as last logged: poll passes every second log it once.
        self._problems: dict[str, str] = {}
        self._pass = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.applied_generation = -1
        #: One forward at a time across this worker's models (see ``engine.ComputeGate``).
        self.compute = ComputeGate()
        #: The loaded versions' tag rules files, followed in poll mode.
        self.tag_rules = TagRulesWatch()
        #: The repository as last scanned.
        self.models: dict[str, RepositoryModel] = {}
        #: Built models by version folder identity (a bundle is built once, then loads fast).
        self._built: dict[tuple[str, str, str], Path | None] = {}
        #: Traffic splits and shadows, from the models' configs.
        self.routing = Routing(state)
        settings = self.settings
        self.on_demand: OnDemand | None = None
        if settings.model_memory_budget_mb is not None or settings.model_idle_ttl_s is not None:
            budget = settings.model_memory_budget_mb
            self.on_demand = OnDemand(
                self,
                int(budget * 2**20) if budget is not None else None,
                settings.model_idle_ttl_s,
            )
            state.models.on_demand = True
            self.routing.request_load = self.on_demand.request

    def pinned(self, name: str) -> bool:
        """Whether ``name`` stays loaded (its config's ``pinned``; every model without
        models on demand)."""
        model = self.models.get(name)
        return self.on_demand is None or (model is not None and model.config.pinned)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """No repository pass, load or unload while held (one at a time per worker)."""
        with self._pass:
            yield

    # --- one pass ------------------------------------------------------------------------
    def wanted(self, models: dict[str, RepositoryModel]) -> dict[str, list[VersionDir]]:
        """Per model, the versions to serve (explicit mode: minus the models unloaded)."""
        unloaded = (
            self.control.unloaded() if self.settings.repository_control == "explicit" else set()
        )
        return {name: m.wanted() for name, m in models.items() if name not in unloaded}

    def reconcile(self) -> None:
        """One pass: load what is missing, then unload what is no longer asked for."""
        with self._pass:
            generation = self.control.generation()
            models = self.models = scan(self.root)
            wanted = self.wanted(models)
            table = self.state.models
            for name in models:
                table.know(name)
            for name in table.names():
                if name not in models and not table.versions(name):
                    table.forget(name)
            for name, versions in wanted.items():
                for version in versions:
                    self._ensure(models[name], version)
            self._record_problems(models)
            asked = {name for name, versions in wanted.items() if versions}
            loaded = {name for name in asked if self.pinned(name)}
            table.expect(loaded, asked - loaded)
            table.pinned = frozenset(n for n in models if self.on_demand and self.pinned(n))
            for name in table.names():
                self._retire(name, {str(v.version) for v in wanted.get(name, [])})
            self.routing.update(models)
            self.applied_generation = generation
            self.control.report(self.applied_generation, self.state.models.index())

    def _record_problems(self, models: dict[str, RepositoryModel]) -> None:
        """Log a model folder's problem when it appears or changes, and when it is mended."""
        for name, model in models.items():
            if model.problem is not None and self._problems.get(name) != model.problem:
                log.error("model %s: %s", name, model.problem)
                self._problems[name] = model.problem
            elif model.problem is None and self._problems.pop(name, None) is not None:
                log.info("model %s: its folder is readable again", name)

    def _ensure(self, model: RepositoryModel, version: VersionDir) -> None:
        key = (model.name, str(version.version))
        entry = self.state.models.entry(*key)
        if entry is not None and entry.state is VersionState.READY:
            return
        failed = self.failures.get(key)
        if failed is not None and failed.stamp == version.stamp:
            return  # it failed as it is now; tried again when its folder changes
        if not self.pinned(model.name):
            if entry is None or entry.state is VersionState.UNAVAILABLE:
                self._make_available(model, version)
            return
        self._load(model, version)

    def _make_available(self, model: RepositoryModel, version: VersionDir) -> None:
        """On demand: build it now (a bundle's first load must not wait for a build) and
        list it as available."""
        name, number = model.name, str(version.version)
        try:
            self._build(version_settings(self.settings, model, version), version)
        except (ServiceError, BuildFailed, OSError) as exc:
            self._failed(name, number, version.stamp, exc)
            return
        self.state.models.put(
            ServedVersion(name, number, VersionState.AVAILABLE, stamp=version.stamp)
        )

    def _failed(self, name: str, number: str, stamp: str, exc: Exception) -> None:
        reason = exc.detail if isinstance(exc, ServiceError) else str(exc)
        self.failures[(name, number)] = Failure(stamp, reason)
        self.state.models.put(
            ServedVersion(name, number, VersionState.UNAVAILABLE, reason, stamp=stamp)
        )
        self.state.metrics.model_loads.labels(name, number, "failed").inc()
        log.error("model %s version %s not loaded: %s", name, number, reason)

    def load_available(self, name: str, number: str) -> ModelLoadFailed | None:
        """Load an available version now (the on-demand loader, holding ``locked``); the
        error a waiting request gets when it cannot be."""
        model = self.models.get(name)
        version = (
            next((v for v in model.versions if str(v.version) == number), None)
            if model is not None
            else None
        )
        if model is None or version is None:
            self.state.models.drop(name, number)
            return ModelLoadFailed(f"Model '{name}' version {number} is gone from the repository.")
        self._load(model, version)
        entry = self.state.models.entry(name, number)
        if entry is not None and entry.state is VersionState.READY:
            self.routing.attach(name)
            return None
        reason = entry.reason if entry is not None else "it could not be loaded"
        return ModelLoadFailed(f"Model '{name}' version {number} could not be loaded: {reason}.")

    def files_bytes(self, name: str, number: str) -> int:
        """The size of a version's built files (the memory estimate of one never loaded)."""
        model = self.models.get(name)
        for version in model.versions if model is not None else ():
            if str(version.version) == number:
                folder = self._built.get((name, number, version.stamp)) or version.path
                return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        return 0

    @contextmanager
    def _capacity_dip(self) -> Iterator[None]:
        """While a version builds, loads and warms, the serving ones lose CPU and their
        queues stand for a moment: that is this worker's own doing, not an overload, so
        they do not start shedding (clients that retry at once would keep a shed going).
        The deadline bound still holds; the hold ends a settle time after the load."""
        serving = [c.workload for c in self.state.models.classifiers()]
        for workload in serving:
            workload.hold(math.inf)
        try:
            yield
        finally:
            for workload in serving:
                workload.hold(_SETTLE_S)

    def _load(self, model: RepositoryModel, version: VersionDir) -> None:
        with self._capacity_dip():
            self._load_version(model, version)

    def _load_version(self, model: RepositoryModel, version: VersionDir) -> None:
        name, number = model.name, str(version.version)
        table = self.state.models
        known = table.entry(name, number)
        table.put(
            ServedVersion(
                name,
                number,
                VersionState.LOADING,
                memory_bytes=known.memory_bytes if known is not None else None,
                stamp=version.stamp,
            )
        )
        log.info("loading model %s version %s from %s", name, number, version.path)
        started, before = time.monotonic(), resident_bytes()
        try:
            settings = version_settings(self.settings, model, version)
            artifact = self._build(settings, version)
            classifier = load_classifier(
                settings,
                self.state.metrics,
                artifact,
                name=name,
                version=number,
                display_names=model.config.display_names,
                compute=self.compute,
            )
        except (ServiceError, BuildFailed, OSError) as exc:
            self._failed(name, number, version.stamp, exc)
            return
        after = resident_bytes()
        memory = after - before if after is not None and before is not None else None
        self.failures.pop((name, number), None)
        if settings.tags:
            self.tag_rules.loaded(name, number, version_rules_file(version))
        table.put(
            ServedVersion(
                name,
                number,
                VersionState.READY,
                classifier=classifier,
                memory_bytes=memory,
                stamp=version.stamp,
            )
        )
        took = time.monotonic() - started
        metrics = self.state.metrics
        metrics.model_loads.labels(name, number, "ok").inc()
        metrics.model_load_seconds.labels(name).observe(took)
        self._count_resident()
        self.routing.attach(name)
        log.info(
            "model %s version %s ready in %.2fs (+%s MB)",
            name,
            number,
            took,
            f"{memory / 2**20:.0f}" if memory is not None else "?",
        )

    def _count_resident(self) -> None:
        self.state.metrics.models_resident_bytes.set(
            sum(e.memory_bytes or 0 for e in self.state.models.resident())
        )

    def _build(self, settings: Settings, version: VersionDir) -> Path | None:
        """The built model for a torch-free runtime (built in a child on a cache miss; once
        per version folder)."""
        if settings.runtime == "torch" and settings.artifact_path is None:
            return None
        if settings.artifact_path is not None:
            return settings.artifact_path
        key = (version.model, str(version.version), version.stamp)
        if key in self._built:
            return self._built[key]
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env.update(settings.as_env())
        folder = build_in_child(env, json_logs=self.settings.log_format == "json")
        built = self._built[key] = Path(folder) if folder else None
        return built

    def _retire(self, name: str, wanted: set[str]) -> None:
        """Unload the versions of ``name`` no longer wanted, once a wanted one serves (or the
        model is not wanted at all)."""
        table = self.state.models
        if wanted and not any(table.can_serve(name, v) for v in wanted):
            return  # nothing new serves yet: the old versions keep serving
        for entry in table.versions(name):
            if entry.version not in wanted:
                self.retire(entry)

    def retire(
        self, entry: ServedVersion, reason: str = "retired", keep_available: bool = False
    ) -> None:
        """Out of the routing table, finish what it accepted, stop, give the memory back;
        ``keep_available``: listed as available again (models on demand: evicted, idle)."""
        table = self.state.models
        classifier = entry.classifier
        if classifier is None:
            table.drop(entry.model, entry.version)
            return
        classifier.retiring = True  # before the idle check: see ServiceState.admit
        table.put(entry.with_state(VersionState.UNLOADING))
        log.info("unloading model %s version %s (%s)", entry.model, entry.version, reason)
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while not classifier.idle and time.monotonic() < deadline:
            time.sleep(0.01)  # requests it accepted are finishing; polled with a deadline
        classifier.stop()
        classifier.shadow = None
        model_info_gauge(self.state.metrics, classifier).set(0)
        self.tag_rules.forget(entry.model, entry.version)
        self.state.metrics.model_unloads.labels(entry.model, entry.version, reason).inc()
        # Still UNLOADING, without its classifier, until the memory is back: a state that
        # says AVAILABLE is one whose memory the worker no longer holds.
        table.put(replace(entry, state=VersionState.UNLOADING, classifier=None))
        model, version, memory, stamp = entry.model, entry.version, entry.memory_bytes, entry.stamp
        del classifier, entry
        _return_memory()
        if keep_available:
            table.put(
                ServedVersion(
                    model, version, VersionState.AVAILABLE, memory_bytes=memory, stamp=stamp
                )
            )
        else:
            table.drop(model, version)
        self._count_resident()

    # --- explicit control (the OIP repository extension) ---------------------------------
    def load(self, name: str) -> None:
        """Load (or re-read) ``name`` in every worker; returns once the replica did it, raises
        ``ModelLoadFailed`` with the reasons when no wanted version of it could be loaded."""
        self._require_explicit("load")
        models = scan(self.root)
        if name not in models:
            raise ModelNotFound(
                f"No model named '{name}' in the repository {self.root} (it has "
                f"{', '.join(sorted(models)) or 'none'})."
            )
        self.failures = {k: v for k, v in self.failures.items() if k[0] != name}  # try again
        self._apply(self.control.request(name, load=True))
        wanted = {str(v.version) for v in models[name].wanted()}
        entries = [e for e in self.state.models.versions(name) if e.version in wanted]
        if not wanted or not any(self.state.models.can_serve(name, e.version) for e in entries):
            reasons = "; ".join(f"version {e.version}: {e.reason}" for e in entries if e.reason)
            raise ModelLoadFailed(
                f"Model '{name}' could not be loaded: {reasons or 'it has no version on disk'}."
            )

    def unload(self, name: str) -> None:
        """Unload every version of ``name`` in every worker."""
        self._require_explicit("unload")
        if name not in self.state.models.names():
            raise ModelNotFound(f"No model named '{name}' in this server.")
        self._apply(self.control.request(name, load=False))

    def _require_explicit(self, what: str) -> None:
        if self.settings.repository_control != "explicit":
            raise ControlOff(
                f"Models {what} only in explicit mode (RESNET_SERVICE_REPOSITORY_CONTROL="
                f"explicit); this server is in '{self.settings.repository_control}' mode."
            )

    def _apply(self, generation: int) -> None:
        """This worker applies ``generation`` now; then wait (bounded) for the others."""
        self.reconcile()
        deadline = time.monotonic() + _REPLICA_WAIT_S
        workers = max(1, self.settings.workers)
        while time.monotonic() < deadline:
            done = [r for r in self.control.reports() if r.generation >= generation]
            if len(done) >= workers:
                return
            time.sleep(_CONTROL_CHECK_S)
        log.warning("repository generation %d: not every worker applied it in time", generation)

    # --- the loop ------------------------------------------------------------------------
    def start(self) -> None:
        """Follow the repository in the background (poll and explicit modes; models on
        demand in every mode)."""
        if self.on_demand is not None:
            self.on_demand.prime()
            self.on_demand.start()
        if self.settings.repository_control == "none":
            return
        self._thread = threading.Thread(target=self._run, name="repository", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poll = self.settings.repository_control == "poll"
        interval = self.settings.repository_poll_s if poll else _CONTROL_CHECK_S
        # Poll mode also follows the tag rules files, more often than the folders.
        tick = min(interval, RULES_CHECK_S) if poll else interval
        next_pass = time.monotonic() + interval
        while not self._stop.wait(tick):
            if poll:
                self._follow_tag_rules()
                if time.monotonic() < next_pass:
                    continue
                next_pass = time.monotonic() + interval
            elif self.control.generation() == self.applied_generation:
                continue
            try:
                self.reconcile()
            except ServiceError as exc:
                log.error("model repository: %s", exc.detail)
            except Exception:
                log.exception("model repository pass failed")

    def _follow_tag_rules(self) -> None:
        try:
            self.tag_rules.check(self.state.models)
        except Exception:
            log.exception("following the tag rules failed")

    def stop(self) -> None:
        """Stop following (a pass under way finishes first); the classifiers stop with the
        worker."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.settings.shutdown_grace_s + 60)
        if self.on_demand is not None:
            self.on_demand.stop()
        with self._pass:
            pass


def open_repository(
    state: ServiceState, run_dir: Path | None = None, worker: int = 0
) -> Reconciler:
    """The reconciler of ``state``'s repository, set as its control; ``run_dir``: the replica's
    shared directory (explicit mode's control file), None for one in-process app."""
    root = state.settings.model_repository
    assert root is not None
    state.models = ModelTable(state.settings.default_model)
    reconciler = Reconciler(state, root, ControlFile(run_dir, worker))
    state.repository = reconciler
    state.demand = reconciler.on_demand
    return reconciler
