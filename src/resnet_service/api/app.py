"""The app factory. Nothing happens at import time; ``create_app(settings)`` builds an app whose
lifespan loads and warms the model in the background (so /healthz and /readyz answer during
start-up), flips readiness, and on SIGTERM drains before the engine stops."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from fastapi import FastAPI

from resnet_service import __version__
from resnet_service.api import problems, web
from resnet_service.api.middleware import RequestContextMiddleware
from resnet_service.api.routes import build_router
from resnet_service.api.state import ServiceState
from resnet_service.classifier import Classifier
from resnet_service.config import Settings, SettingsError, load_settings
from resnet_service.errors import ServiceError
from resnet_service.model.loader import load_model

log = logging.getLogger(__name__)

#: uvicorn's own exit code for a failed start-up.
EXIT_STARTUP_FAILED = 3

DESCRIPTION = """\
Fast CPU image classification with an int8 ResNet18.

Send an image as multipart field `image` to `POST /classify`, or many as repeated `images` to
`POST /classify/batch`. Errors are RFC 9457 `application/problem+json` with a stable `code`.
"""


def _load_and_start(state: ServiceState) -> Classifier:
    """Runs in a worker thread: resolve and build the model, warm the engine up."""
    model = load_model(state.settings)
    classifier = Classifier(model, state.settings, observer=state.metrics)
    classifier.start()
    return classifier


def _install_sigterm_hook(
    state: ServiceState, loop: asyncio.AbstractEventLoop
) -> Callable[[], None]:
    """On SIGTERM, flip readiness to 503 at once, then (after the drain delay) hand the signal
    to the server's own handler, which stops accepting and finishes requests in flight."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def forward(signum: int, frame: FrameType | None) -> None:
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:  # no server handler: the default action, terminate
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if not state.draining:
            log.info("SIGTERM: readiness is now 503; draining")
        state.draining = True
        state.metrics.ready.set(0)
        delay = state.settings.drain_delay_s
        if delay > 0:
            loop.call_soon_threadsafe(loop.call_later, delay, forward, signum, frame)
        else:
            forward(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, previous)

    return restore


def create_app(
    settings: Settings | None = None,
    *,
    exit_on_startup_failure: bool = True,
    handle_signals: bool = True,
) -> FastAPI:
    """Build the service. With the defaults, a model that cannot be loaded ends the process
    (exit code 3, the message says how to fix it); tests turn that off."""
    settings = settings or load_settings()
    state = ServiceState(settings=settings)

    async def load_in_background() -> None:
        try:
            state.classifier = await asyncio.to_thread(_load_and_start, state)
        except Exception as exc:
            detail = exc.detail if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
            state.startup_error = detail
            log.critical("start-up failed: %s", detail)
            if exit_on_startup_failure:
                logging.shutdown()
                os._exit(EXIT_STARTUP_FAILED)
            return
        info = state.classifier.model.info
        state.metrics.model_info.labels(
            info.name, info.precision, info.weights_sha256[:12], str(info.random_weights).lower()
        ).set(1)
        state.metrics.ready.set(1)
        log.info("ready: %s (%s), serving", info.name, info.precision)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.metrics.ready.set(0)
        loader = asyncio.create_task(load_in_background())
        restore = (
            _install_sigterm_hook(state, asyncio.get_running_loop()) if handle_signals else None
        )
        try:
            yield
        finally:
            state.draining = True
            state.metrics.ready.set(0)
            if not loader.done():
                await asyncio.shield(loader)  # the thread cannot be cancelled; wait for it
            if state.classifier is not None:
                # uvicorn has already finished the requests in flight; flush what is queued.
                await asyncio.to_thread(state.classifier.stop, settings.shutdown_grace_s)
            if restore is not None:
                restore()
            state.metrics.close()
            log.info("stopped")

    app = FastAPI(
        title="resnet-service",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.service = state
    problems.install(app)
    problems.document(app)
    app.include_router(build_router(state))
    web.install(app)
    app.add_middleware(RequestContextMiddleware, metrics=state.metrics)
    return app


def create_app_from_env() -> FastAPI:
    """``uvicorn --factory resnet_service.api.app:create_app_from_env``: settings from env."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        log.critical("%s", exc)
        raise SystemExit(EXIT_STARTUP_FAILED) from None
    return create_app(settings)


def openapi_document() -> dict[str, Any]:
    """The OpenAPI spec from the default settings (never this machine's environment)."""
    return create_app(Settings.model_construct(), handle_signals=False).openapi()
