"""The OIP model repository extension over REST, as Triton defines it (what tritonclient's
``get_model_repository_index``, ``load_model`` and ``unload_model`` call): the index, and a
load or unload of a model in every worker of the replica. Guarded by the admin token; load
and unload only in ``explicit`` mode."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from pydantic import BaseModel, Field

from resnet_service.asgi.deps import ServiceDep
from resnet_service.faces.oip.rest import ErrorBody, OipRoute
from resnet_service.service.auth import check_admin

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "The model could not be loaded; see the reason."},
    401: {"model": ErrorBody, "description": "Missing or wrong admin token."},
    403: {"model": ErrorBody, "description": "Repository control is off."},
    404: {"model": ErrorBody, "description": "No such model in the repository."},
}


async def require_admin(request: Request, service: ServiceDep) -> None:
    check_admin(
        request.headers.get("authorization", ""),
        service.settings.admin_token,
        "'Authorization: Bearer <admin token>'",
    )


router = APIRouter(
    prefix="/v2/repository",
    tags=["Open Inference Protocol v2: model repository"],
    dependencies=[Depends(require_admin)],
    route_class=OipRoute,
)


class IndexRequest(BaseModel):
    ready: bool = Field(False, description="Only the versions that are ready.")


class IndexItem(BaseModel):
    name: str
    version: str = Field(description="Empty for a model with no version loaded.")
    state: str = Field(description="READY, LOADING, UNLOADING or UNAVAILABLE.")
    reason: str = Field(description="Why it is not READY (a failed build, 'unloaded').")


class ControlRequest(BaseModel):
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="Accepted for compatibility; none is used."
    )


@router.post(
    "/index", response_model=list[IndexItem], summary="Repository index", responses=_ERRORS
)
async def index(
    service: ServiceDep, body: Annotated[IndexRequest | None, Body()] = None
) -> list[IndexItem]:
    ready_only = body.ready if body is not None else False
    return [
        IndexItem(name=e.name, version=e.version, state=str(e.state), reason=e.reason)
        for e in service.models.repository_index(ready_only)
    ]


@router.post(
    "/models/{model_name}/load",
    summary="Load (or re-read) a model in every worker",
    responses=_ERRORS,
)
async def load(
    model_name: str, service: ServiceDep, body: Annotated[ControlRequest | None, Body()] = None
) -> dict[str, Any]:
    await asyncio.to_thread(service.require_repository().load, model_name)
    return {}


@router.post(
    "/models/{model_name}/unload", summary="Unload a model in every worker", responses=_ERRORS
)
async def unload(
    model_name: str, service: ServiceDep, body: Annotated[ControlRequest | None, Body()] = None
) -> dict[str, Any]:
    await asyncio.to_thread(service.require_repository().unload, model_name)
    return {}
