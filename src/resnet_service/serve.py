"""``resnet-service serve``: uvicorn with one or more worker processes, each with its own engine."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from typing import Any

from pydantic import SecretStr

from resnet_service.config import ENV_PREFIX, Settings
from resnet_service.cpus import resolve_workers

ACCESS_AND_APP_LOGGERS = ("resnet_service", "uvicorn", "uvicorn.error")


def log_config(level: str) -> dict[str, Any]:
    """Plain lines on stderr; access lines are JSON (written by our middleware, not uvicorn)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s"},
            "raw": {"format": "%(message)s"},
        },
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "plain",
                "stream": "ext://sys.stderr",
            },
            "access": {
                "class": "logging.StreamHandler",
                "formatter": "raw",
                "stream": "ext://sys.stdout",
            },
        },
        "loggers": {
            **{
                name: {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
                for name in ACCESS_AND_APP_LOGGERS
            },
            "resnet_service.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }


def settings_as_env(settings: Settings) -> dict[str, str]:
    """The settings as RESNET_SERVICE_* variables, for worker processes."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, bool):
            value = "true" if value else "false"
        env[f"{ENV_PREFIX}{name.upper()}"] = str(value)
    return env


def _preflight(env: dict[str, str]) -> None:
    """Several workers: build (or verify) the model once, so a missing-weights error is said
    once and workers find the int8 model cached instead of each calibrating."""
    proc = subprocess.run(
        [sys.executable, "-m", "resnet_service", "info"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(proc.returncode)


def run_server(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code."""
    import uvicorn

    settings = settings.model_copy(update={"workers": resolve_workers(settings.workers)})
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": log_config(settings.log_level),
        "access_log": False,
        # Whole seconds (uvicorn's type); rounded up so a short grace is never "no limit".
        "timeout_graceful_shutdown": math.ceil(settings.shutdown_grace_s),
        "lifespan": "on",
    }
    if settings.workers == 1:
        from resnet_service.api.app import create_app

        uvicorn.Server(uvicorn.Config(create_app(settings), **common)).run()
        return 0
    env = {**os.environ, **settings_as_env(settings)}
    metrics_dir = tempfile.mkdtemp(prefix="resnet-service-metrics-")
    env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    _preflight(env)
    os.environ.update(env)
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(
        "resnet_service.api.app:create_app_from_env",
        factory=True,
        workers=settings.workers,
        **common,
    )
    try:
        Multiprocess(config, sockets=[listening_socket(settings.host, settings.port)]).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def listening_socket(host: str, port: int) -> socket.socket:
    """The shared socket of the worker processes, declared as TCP.

    asyncio turns on TCP_NODELAY only for sockets whose ``proto`` is IPPROTO_TCP; uvicorn's own
    multi-worker socket is made with proto 0, so its connections keep Nagle's algorithm, and
    each response (headers and body written separately) waits ~40 ms for a delayed ACK:
    measured here, 56 ms per request at concurrency 1 instead of 10 ms.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument(
        "--workers",
        type=int,
        help="worker processes, each with CPUs/N torch threads (0 = one per CPU)",
    )
    parser.add_argument("--drain-delay", dest="drain_delay_s", type=float)
    parser.add_argument("--shutdown-grace", dest="shutdown_grace_s", type=float)
