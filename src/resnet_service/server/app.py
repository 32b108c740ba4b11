"""The HTTP app: where the faces that speak HTTP (the JSON API with its page and operations,
and OIP REST) are put together over one service. Nothing happens at import time.

``create_app(settings, classifier=...)`` serves a classifier that is already warm: that is how
``serve``'s worker processes run (they load the model *before* they listen). Without one, the
lifespan loads and warms the model in the background, so /healthz and /readyz answer during
start-up (in-process tests, ``uvicorn --factory`` for development).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig

from resnet_service import __version__
from resnet_service.asgi.access_log import RequestRecorder
from resnet_service.asgi.admission import AdmissionMiddleware, HeadAdmission
from resnet_service.asgi.request_middleware import RequestContextMiddleware
from resnet_service.asgi.routes import RouteTable
from resnet_service.config import Settings, SettingsError, load_settings
from resnet_service.core.classifier import Classifier
from resnet_service.core.errors import ServiceError
from resnet_service.faces.http import (
    classify,
    embed_explain,
    openapi,
    operations,
    page,
    problems,
)
from resnet_service.faces.oip import errors as oip_errors
from resnet_service.faces.oip import repository_api as oip_repository
from resnet_service.faces.oip import rest as oip_rest
from resnet_service.server.exit_codes import EXIT_STARTUP_FAILED
from resnet_service.service import tracing
from resnet_service.service.loading import announce_ready, load_classifier, serve_one
from resnet_service.service.metrics import Metrics
from resnet_service.service.reconciler import open_repository
from resnet_service.service.state import ReplicaView, ServiceState

log = logging.getLogger(__name__)


NO_FASTAPI_TELEMETRY: Final[TelemetryConfig] = {
    "tracing": False,
    "metrics": False,
    "logs": False,
    "operation_spans": False,
    "auto_configure": False,
}

DESCRIPTION = """\
Fast CPU image classification with an int8 ResNet18.

Send an image as multipart field `image` to `POST /classify`, or many as repeated `images` to
`POST /classify/batch`. `POST /embed` (and `/embed/batch`) give each image's feature vector
for similarity search; `POST /explain` gives the Top-k and a class activation map of where the
evidence lies. Errors are RFC 9457 `application/problem+json` with a stable `code`.
"""


async def _load_in_background(state: ServiceState, exit_on_failure: bool) -> None:
    try:
        if state.settings.model_repository is not None:
            reconciler = open_repository(state)
            await asyncio.to_thread(reconciler.reconcile)
            await asyncio.to_thread(reconciler.start)  # models on demand start their runtime
        else:
            classifier = await asyncio.to_thread(load_classifier, state.settings, state.metrics)
            serve_one(state, classifier)
    except Exception as exc:
        detail = exc.detail if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
        state.startup_error = detail
        log.critical("start-up failed: %s", detail)
        if exit_on_failure:
            logging.shutdown()
            os._exit(EXIT_STARTUP_FAILED)
        return
    if state.classifier is not None:
        announce_ready(state)


async def stop_models(state: ServiceState) -> None:
    """Stop following the repository, then flush and stop every loaded version."""
    if state.repository is not None:
        await asyncio.to_thread(state.repository.stop)
    grace = state.settings.shutdown_grace_s
    await asyncio.gather(*(asyncio.to_thread(c.stop, grace) for c in state.models.classifiers()))


def _lifespan(state: ServiceState, exit_on_startup_failure: bool) -> Any:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader: asyncio.Task[None] | None = None
        if not state.models.names():
            state.metrics.ready.set(0)
            loader = asyncio.create_task(_load_in_background(state, exit_on_startup_failure))
        elif state.classifier is not None:
            announce_ready(state)
        elif state.models.readiness_problem() is None:
            state.metrics.ready.set(1)  # models on demand: none loaded yet, all available
        try:
            yield
        finally:
            state.draining = True
            state.metrics.ready.set(0)
            if loader is not None and not loader.done():
                await asyncio.shield(loader)  # the thread cannot be cancelled; wait for it
            # The server has already finished the requests in flight; flush what is queued.
            await stop_models(state)
            state.metrics.close()
            log.info("stopped")

    return lifespan


def create_app(
    settings: Settings | None = None,
    *,
    classifier: Classifier | None = None,
    metrics: Metrics | None = None,
    replica: ReplicaView | None = None,
    exit_on_startup_failure: bool = True,
    state: ServiceState | None = None,
) -> FastAPI:
    """Build the service over ``state`` (a worker's, its models loaded) or a new one. Without
    a ``classifier`` or loaded models, the lifespan loads them in the background, and a model
    that cannot be loaded ends the process (exit code 3, the message says how to fix it);
    tests turn that off."""
    if state is None:
        settings = settings or load_settings()
        state = ServiceState(settings=settings, metrics=metrics or Metrics(), replica=replica)
        if classifier is not None:
            serve_one(state, classifier)
    settings = state.settings
    app = FastAPI(
        title="resnet-service",
        version=__version__,
        description=DESCRIPTION,
        lifespan=_lifespan(state, exit_on_startup_failure),
        docs_url="/docs",
        redoc_url=None,
        # FastAPI's own telemetry off: our request span starts in the protocol layer (where
        # admission decides, before any ASGI code) and is the same for gRPC; FastAPI's would
        # be a second SERVER span under it, and we export metrics and logs our own way.
        telemetry=NO_FASTAPI_TELEMETRY,
    )
    app.state.service = state
    # Two faces over one service: the JSON API (with the page and operations) and OIP REST.
    problems.install(app, prefixes={oip_rest.PREFIX + "/": oip_errors.framework_error})
    openapi.install(app, settings, schemas=[oip_rest.InferenceRequest])
    app.include_router(classify.router)
    app.include_router(embed_explain.router)
    app.include_router(operations.router)
    app.include_router(oip_rest.router)
    app.include_router(oip_repository.router)
    page.install(app)
    # What each face admits from the request head, and its probes: the plumbing below reads
    # these, and writes a refusal in the shape of the face that owns the route.
    routes = RouteTable.of(
        classify.ADMITTED, embed_explain.ADMITTED, oip_rest.ADMITTED, probes=operations.PROBES
    )
    # Starlette wraps in reverse order: the request context is outermost, admission inside it.
    recorder = RequestRecorder(state.metrics, routes, json_lines=settings.log_format == "json")
    app.add_middleware(AdmissionMiddleware, service=state, recorder=recorder, routes=routes)
    app.add_middleware(
        RequestContextMiddleware, recorder=recorder, tracing=tracing.wanted(settings)
    )
    #: For the HTTP protocol layer (``server.http``): admission before the ASGI stack.
    app.state.head_admission = HeadAdmission(state, recorder, routes)
    return app


def create_app_from_env() -> FastAPI:
    """``uvicorn --factory resnet_service.server.app:create_app_from_env``: one process, settings
    from the environment (development; ``resnet-service serve`` is the production server)."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        log.critical("%s", exc)
        raise SystemExit(EXIT_STARTUP_FAILED) from None
    return create_app(settings)


def openapi_document() -> dict[str, Any]:
    """The OpenAPI spec from the default settings (never this machine's environment)."""
    return create_app(Settings.model_construct()).openapi()
