"""How a worker's uvicorn and its logging are configured (the worker and ``serve`` share it)."""

from __future__ import annotations

import math
from typing import Any

import uvicorn

from resnet_service.config import Settings
from resnet_service.server.http import ConnectionPolicy, protocol_class

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


def uvicorn_config(app: Any, settings: Settings, policy: ConnectionPolicy) -> uvicorn.Config:
    """uvicorn's settings for one worker: our protocol, keep-alive above proxies' idle timeouts,
    our JSON access log instead of uvicorn's, no server header."""
    return uvicorn.Config(
        app,
        http=protocol_class(policy, settings.http_parser),
        loop=settings.event_loop,
        lifespan="on",
        log_config=log_config(settings.log_level),
        access_log=False,
        server_header=False,
        timeout_keep_alive=math.ceil(settings.keep_alive_timeout_s),
        # Whole seconds (uvicorn's type); rounded up so a short grace is never "no limit".
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
    )
