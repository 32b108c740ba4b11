"""Dependencies of the routes, as ``Annotated`` aliases: tests swap any of them with
``app.dependency_overrides``. All ``async``: a plain function dependency would cost a
thread-pool hop per request."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import Depends, Query, Request

from resnet_service.asgi.context import request_context
from resnet_service.config import Settings
from resnet_service.core.admission import Ticket
from resnet_service.core.classifier import Classifier
from resnet_service.core.errors import NotReady
from resnet_service.service.auth import cache_scope, check_bearer
from resnet_service.service.state import ServiceState


async def get_service(request: Request) -> ServiceState:
    """The app's state (one per app, never module-global)."""
    state: ServiceState = request.app.state.service
    return state


ServiceDep = Annotated[ServiceState, Depends(get_service)]


async def get_settings(service: ServiceDep) -> Settings:
    return service.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


ModelQuery = Annotated[
    str | None,
    Query(
        max_length=64,
        description="The model to use (GET /models lists them); default: the default model.",
    ),
]
VersionQuery = Annotated[
    str | None,
    Query(max_length=16, description="The model's version; default: its highest ready one."),
]


async def get_classifier(
    request: Request, service: ServiceDep, model: ModelQuery = None, version: VersionQuery = None
) -> Classifier:
    """The classifier the request names (``?model=&version=``): the one admission chose at the
    head when it did, so a request is answered by the version that admitted it; ``NotReady``
    (503) while loading, ``ModelNotFound`` (404) for what this replica does not serve."""
    chosen = request_context(request).classifier
    return chosen if chosen is not None else await service.classifier_loaded(model, version)


ClassifierDep = Annotated[Classifier, Depends(get_classifier)]


async def require_token(request: Request, settings: SettingsDep) -> None:
    """Bearer-token check for inference routes, when a token is configured."""
    check_bearer(
        request.headers.get("authorization", ""),
        settings.auth_token,
        "'Authorization: Bearer <token>'",
    )


async def get_cache_scope(request: Request, settings: SettingsDep) -> str:
    """Whose cached answers a request may share: with auth on, only those of its own token."""
    return cache_scope(request.headers.get("authorization", ""), settings.auth_token)


CacheScopeDep = Annotated[str, Depends(get_cache_scope)]


@contextmanager
def admitted_ticket(request: Request, classifier: Classifier) -> Iterator[Ticket]:
    """The ticket admission gave the request, else one taken now (a face's dependency)."""
    ticket = request_context(request).ticket
    if ticket is not None:
        yield ticket
        return
    with classifier.admit() as own:  # the head did not admit it (an in-process app, a
        if classifier.retiring:  # model on demand), so it may be leaving since: see admit
            raise NotReady("The model version is being unloaded; retry.", 1)
        yield own


async def admission_ticket(request: Request, classifier: ClassifierDep) -> AsyncIterator[Ticket]:
    """The request's admission ticket: taken by ``AdmissionMiddleware`` before routing (it
    refuses cheaply under overload); taken here only if the model finished loading in between."""
    with admitted_ticket(request, classifier) as ticket:
        yield ticket


TicketDep = Annotated[Ticket, Depends(admission_ticket)]
