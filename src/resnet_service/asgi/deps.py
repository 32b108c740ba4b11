"""Dependencies of the routes, as ``Annotated`` aliases: tests swap any of them with
``app.dependency_overrides``. All ``async``: a plain function dependency would cost a
thread-pool hop per request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request

from resnet_service.config import Settings
from resnet_service.core.admission import Ticket
from resnet_service.core.classifier import Classifier
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


async def get_classifier(service: ServiceDep) -> Classifier:
    """The loaded classifier, or ``NotReady`` (503) while the model loads."""
    return service.require_classifier()


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


async def admission_ticket(request: Request, classifier: ClassifierDep) -> AsyncIterator[Ticket]:
    """The request's admission ticket: taken by ``AdmissionMiddleware`` before routing (it
    refuses cheaply under overload); taken here only if the model finished loading in between."""
    ticket: Ticket | None = getattr(request.state, "ticket", None)
    if ticket is not None:
        yield ticket
        return
    with classifier.admit() as own:
        yield own


TicketDep = Annotated[Ticket, Depends(admission_ticket)]
