"""How a worker's uvicorn is configured: our protocol, our logging, our access log."""

from __future__ import annotations

import math
from typing import Any

import uvicorn

from resnet_service.config import Settings
from resnet_service.logs import log_config
from resnet_service.server.http import ConnectionPolicy, protocol_class


def uvicorn_config(app: Any, settings: Settings, policy: ConnectionPolicy) -> uvicorn.Config:
    """uvicorn's settings for one worker: our protocol, keep-alive above proxies' idle timeouts,
    our JSON access log instead of uvicorn's, no server header."""
    return uvicorn.Config(
        app,
        http=protocol_class(policy, settings.http_parser),
        loop=settings.event_loop,
        lifespan="on",
        log_config=log_config(settings.log_level, settings.log_format),
        access_log=False,
        server_header=False,
        timeout_keep_alive=math.ceil(settings.keep_alive_timeout_s),
        # Whole seconds (uvicorn's type); rounded up so a short grace is never "no limit".
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
    )
