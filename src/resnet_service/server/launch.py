"""``resnet-service serve``: a supervisor with one or more worker processes, each with its own
engine and its own listening socket (see ``server/``)."""

from __future__ import annotations

import argparse
import logging
import logging.config
import os
import shutil
import tempfile
from pathlib import Path
from typing import Final

from resnet_service import logs
from resnet_service.config import Settings
from resnet_service.core.errors import BundleInvalid
from resnet_service.cpus import resolve_workers
from resnet_service.model.repository_layout import scan
from resnet_service.server.exit_codes import EXIT_STARTUP_FAILED
from resnet_service.server.http import IDLE_LINGER_S
from resnet_service.server.sockets import PortInUse, check_port_free, reserve_port
from resnet_service.server.supervisor import Supervisor
from resnet_service.server.worker import ARTIFACT_ENV
from resnet_service.service.builder_process import BuildFailed, build_in_child

log = logging.getLogger("resnet_service.server.launch")

#: Seconds beyond drain delay + grace + linger before the supervisor kills stragglers.
_STOP_MARGIN_S: Final = 5.0


def settings_as_env(settings: Settings) -> dict[str, str]:
    """The set settings as RESNET_SERVICE_* variables, for child processes."""
    return settings.as_env()


class StartupError(Exception):
    """``serve`` cannot start; the message says what to fix."""


def preflight(env: dict[str, str], json_logs: bool = False) -> str | None:
    """Build (or verify) what the workers will load, once, before them (see
    ``service.building.build_in_child``); a start-up error is said once."""
    try:
        return build_in_child(env, json_logs)
    except BuildFailed as exc:
        raise StartupError(f"preflight failed ({exc}); see the message above") from None


def _run_dir() -> Path:
    """Per-run scratch space (metrics of every worker, the replica state); removed on exit."""
    try:
        return Path(tempfile.mkdtemp(prefix="resnet-service-"))
    except OSError as exc:
        raise StartupError(
            f"cannot create a run directory in {tempfile.gettempdir()} ({exc.strerror}); "
            "point TMPDIR at a writable place (on Kubernetes: an emptyDir at /tmp)"
        ) from None


def run_server(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code."""
    settings = settings.model_copy(update={"workers": resolve_workers(settings.workers)})
    logs.configure(settings.log_level, settings.log_format)
    try:
        check_port_free(settings.host, settings.port)
        if settings.grpc_enabled:
            check_port_free(settings.host, settings.grpc_port)
        rundir = _run_dir()
    except (PortInUse, StartupError) as exc:
        log.critical("%s", exc)
        return EXIT_STARTUP_FAILED
    try:
        return _serve(settings, rundir)
    except StartupError as exc:
        log.critical("%s", exc)
        return EXIT_STARTUP_FAILED
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def _serve(settings: Settings, rundir: Path) -> int:
    reservation = reserve_port(settings.host, settings.port)
    grpc_reservation = (
        reserve_port(settings.host, settings.grpc_port) if settings.grpc_enabled else None
    )
    try:
        port = reservation.getsockname()[1]
        grpc_port = grpc_reservation.getsockname()[1] if grpc_reservation else settings.grpc_port
        settings = settings.model_copy(update={"port": port, "grpc_port": grpc_port})
        settings = pinned_default_model(settings)
        metrics_dir = rundir / "metrics"
        metrics_dir.mkdir()
        env = {
            **os.environ,
            **settings_as_env(settings),
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        }
        # A repository's workers build each version themselves (in children, once per build).
        repository = settings.model_repository is not None
        artifact = None if repository else preflight(env, json_logs=settings.log_format == "json")
        if artifact is not None:
            env[ARTIFACT_ENV] = artifact
        log.info("serving on http://%s:%d with %d worker(s)", settings.host, port, settings.workers)
        stop_timeout = (
            settings.drain_delay_s + settings.shutdown_grace_s + IDLE_LINGER_S + _STOP_MARGIN_S
        )
        return Supervisor(settings.workers, env, rundir, stop_timeout).run()
    finally:
        reservation.close()
        if grpc_reservation is not None:
            grpc_reservation.close()


def pinned_default_model(settings: Settings) -> Settings:
    """A repository's default model, decided once for every worker (replacements included):
    the one named, else the only model at start, which stays the default when others are
    published. With several and none named there is none, and saying so here is the only
    warning a user gets before requests that name no model are refused."""
    root = settings.model_repository
    if root is None or settings.default_model is not None:
        return settings
    try:
        names = sorted(scan(root))
    except BundleInvalid:
        return settings  # the workers report an unreadable repository
    if len(names) == 1:
        log.info(
            "default model: '%s', the only one in the repository at start; it stays the "
            "default when others are published (--default-model names another)",
            names[0],
        )
        return settings.model_copy(update={"default_model": names[0]})
    if names:
        log.warning(
            "the repository has %d models and no --default-model: requests that name no model "
            "are refused (400) with the list",
            len(names),
        )
    return settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--grpc-port", dest="grpc_port", type=int, help="0 = any free port")
    parser.add_argument(
        "--workers",
        type=int,
        help="worker processes, each with CPUs/N torch threads (0 = one per CPU)",
    )
    parser.add_argument(
        "--repository",
        dest="model_repository",
        type=Path,
        help="a model repository: DIR/<model>/<version>/ (several models and versions)",
    )
    parser.add_argument(
        "--repository-control",
        choices=["none", "poll", "explicit"],
        help="none: read at start; poll: follow the folders; explicit: the OIP control routes",
    )
    parser.add_argument("--repository-poll", dest="repository_poll_s", type=float)
    parser.add_argument(
        "--memory-budget",
        dest="model_memory_budget_mb",
        type=float,
        help="models on demand: MiB a worker's loaded models may take (LRU eviction)",
    )
    parser.add_argument(
        "--idle-ttl",
        dest="model_idle_ttl_s",
        type=float,
        help="models on demand: unload a model unused for this many seconds",
    )
    parser.add_argument("--default-model", help="the model of requests that name none")
    parser.add_argument("--drain-delay", dest="drain_delay_s", type=float)
    parser.add_argument("--shutdown-grace", dest="shutdown_grace_s", type=float)
