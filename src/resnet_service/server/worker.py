"""One worker process of ``serve``: load and warm the model, *then* listen, then serve.

Started by the supervisor (``supervisor.py``) with the settings in ``RESNET_SERVICE_*``
variables and its own plumbing in ``RESNET_WORKER_*`` ones: where to report readiness, the
replica's shared state, the prometheus multiprocess directory. Its listening socket is its
own (SO_REUSEPORT), bound only once the model is warm, so no connection ever reaches a worker
that cannot serve it.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import logging.config
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from resnet_service.config import Settings, SettingsError, load_settings
from resnet_service.logs import WORKER_ENV
from resnet_service.server.exit_codes import EXIT_STARTUP_FAILED

if TYPE_CHECKING:
    from resnet_service.service.state import ServiceState

log = logging.getLogger("resnet_service.worker")

NOTIFY_FD_ENV: Final = "RESNET_WORKER_NOTIFY_FD"
REPLICA_STATE_ENV: Final = "RESNET_WORKER_REPLICA_STATE"
INDEX_ENV: Final = WORKER_ENV  # the log lines name their worker by it too
ARTIFACT_ENV: Final = "RESNET_WORKER_ARTIFACT"
READY_MESSAGE: Final = b"ready\n"
_PR_SET_PDEATHSIG: Final = 1
LISTEN_BACKLOG: Final = 2048


@dataclass(frozen=True, slots=True)
class WorkerPlumbing:
    """What the supervisor hands a worker besides the settings."""

    notify_fd: int | None
    replica_state: Path | None
    index: int
    #: The built model the preflight found (torch-free runtimes): load it, nothing else.
    artifact: Path | None = None

    @classmethod
    def from_env(cls) -> WorkerPlumbing:
        fd = os.environ.get(NOTIFY_FD_ENV)
        state = os.environ.get(REPLICA_STATE_ENV)
        artifact = os.environ.get(ARTIFACT_ENV)
        return cls(
            notify_fd=int(fd) if fd else None,
            replica_state=Path(state) if state else None,
            index=int(os.environ.get(INDEX_ENV, "0")),
            artifact=Path(artifact) if artifact else None,
        )

    def notify_ready(self) -> None:
        if self.notify_fd is not None:
            os.write(self.notify_fd, READY_MESSAGE)


def _die_with_supervisor() -> None:
    """Get SIGTERM (a graceful stop) if the supervisor dies, instead of serving as an orphan."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the supervisor's SIGTERM still reaches us
        return


def _load_models(state: ServiceState, plumbing: WorkerPlumbing) -> None:
    """Every model before listening: the repository's first pass (then it is followed in the
    background), or the one model of the settings."""
    from resnet_service.service.loading import load_classifier, serve_one
    from resnet_service.service.reconciler import open_repository

    if state.settings.model_repository is None:
        serve_one(state, load_classifier(state.settings, state.metrics, plumbing.artifact))
        return
    run_dir = plumbing.replica_state.parent if plumbing.replica_state else None
    reconciler = open_repository(state, run_dir, plumbing.index)
    reconciler.reconcile()
    reconciler.start()


def _freeze_start_up_heap() -> None:
    """Move what start-up made (imported modules, the runtimes' and FastAPI's objects, the
    loaded models) out of the collector's sight: they live as long as the worker, yet each
    full collection walked them all, a 70-90 ms pause of every request in flight under load
    (measured: five such pauses in 20 s of a flood). Garbage is collected first, so only
    live objects are frozen."""
    gc.collect()
    gc.freeze()


def serve_worker(settings: Settings, plumbing: WorkerPlumbing) -> int:
    """Load, warm, listen, serve until SIGTERM; returns the exit code.

    The worker builds the service once and puts its faces over it as peers: the HTTP app (the
    JSON API and OIP REST) and, when enabled, the gRPC server (OIP gRPC), started in the same
    event loop and stopped after HTTP drained, before the classifier stops."""
    from resnet_service.core.errors import ServiceError
    from resnet_service.server.app import create_app
    from resnet_service.server.http import ConnectionPolicy, GracefulServer, Peer
    from resnet_service.server.sockets import reuseport_listener
    from resnet_service.server.uvicorn_config import uvicorn_config
    from resnet_service.service import tracing
    from resnet_service.service.metrics import Metrics
    from resnet_service.service.state import ReplicaView, ServiceState

    provider = tracing.configure(settings, plumbing.index)
    replica = ReplicaView(plumbing.replica_state) if plumbing.replica_state else None
    state = ServiceState(settings, Metrics(worker=plumbing.index), replica=replica)
    try:
        _load_models(state, plumbing)
    except ServiceError as exc:
        log.critical("start-up failed: %s", exc.detail)
        return EXIT_STARTUP_FAILED
    except Exception:
        log.critical("start-up failed", exc_info=True)
        return EXIT_STARTUP_FAILED
    metrics = state.metrics
    app = create_app(state=state)
    _freeze_start_up_heap()
    peers: list[Peer] = []
    if settings.grpc_enabled:
        from resnet_service.faces.oip.grpc import GrpcFace

        peers.append(GrpcFace(state, settings.host, settings.grpc_port))
    policy = ConnectionPolicy(
        settings.header_timeout_s, settings.max_connections, gate=app.state.head_admission
    )
    sock = reuseport_listener(settings.host, settings.port, LISTEN_BACKLOG)

    def on_signal() -> None:  # signal context: assignments only
        state.draining = True

    server = GracefulServer(
        uvicorn_config(app, settings, policy),
        policy,
        drain_delay_s=settings.drain_delay_s,
        peers=peers,
        on_signal=on_signal,
        on_draining=lambda: metrics.ready.set(0),
        on_started=plumbing.notify_ready,
    )
    log.info(
        "worker %d listening on %s:%d (runtime %s; torch %s)",
        plumbing.index,
        settings.host,
        settings.port,
        ", ".join(sorted({c.model.info.runtime for c in state.models.classifiers()})) or "none",
        "imported" if "torch" in sys.modules else "not imported",
    )
    try:
        server.run(sockets=[sock])
    finally:
        app.state.head_admission.recorder.tally.flush()  # refusals of the last interval
        tracing.shutdown(provider)
    return 0


def main() -> int:
    """``python -m resnet_service.server.worker`` (started by the supervisor)."""
    _die_with_supervisor()
    from resnet_service import logs

    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"resnet-service worker: {exc}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    logs.configure(settings.log_level, settings.log_format)
    return serve_worker(settings, WorkerPlumbing.from_env())


if __name__ == "__main__":
    raise SystemExit(main())
