"""The OIP model repository extension over REST, as Triton defines it (what tritonclient's
``get_model_repository_index``, ``load_model`` and ``unload_model`` call): the index, and a
load or unload of a model in every worker of the replica. Guarded by the admin token; load
and unload only in ``explicit`` mode."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field, ValidationError

from resnet_service.asgi.deps import ServiceDep
from resnet_service.core.errors import InvalidInferRequest
from resnet_service.faces.oip.rest import ErrorBody, OipRoute
from resnet_service.service.auth import check_admin
from resnet_service.service.state import ServiceState

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


Body = TypeVar("Body", bound=BaseModel)


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


async def _body(request: Request, schema: type[Body]) -> Body:
    """The JSON body, or the defaults when there is none: tritonclient sends JSON without a
    content type, so FastAPI's own body parsing would refuse it."""
    raw = await request.body()
    if not raw.strip():
        return schema()
    try:
        return schema.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidInferRequest(f"Invalid request body: {exc.errors()[0]['msg']}.") from None


def _documented(schema: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": schema.model_json_schema()}},
        }
    }


@router.post(
    "/index",
    response_model=list[IndexItem],
    summary="Repository index",
    responses=_ERRORS,
    openapi_extra=_documented(IndexRequest),
)
async def index(request: Request, service: ServiceDep) -> list[IndexItem]:
    body = await _body(request, IndexRequest)
    return [
        IndexItem(name=e.name, version=e.version, state=str(e.state), reason=e.reason)
        for e in service.models.repository_index(body.ready)
    ]


async def _control(request: Request, service: ServiceState, model: str, load: bool) -> None:
    await _body(request, ControlRequest)
    repository = service.require_repository()
    await asyncio.to_thread(repository.load if load else repository.unload, model)


@router.post(
    "/models/{model_name}/load",
    summary="Load (or re-read) a model in every worker",
    responses=_ERRORS,
    openapi_extra=_documented(ControlRequest),
)
async def load(model_name: str, request: Request, service: ServiceDep) -> dict[str, Any]:
    await _control(request, service, model_name, load=True)
    return {}


@router.post(
    "/models/{model_name}/unload",
    summary="Unload a model in every worker",
    responses=_ERRORS,
    openapi_extra=_documented(ControlRequest),
)
async def unload(model_name: str, request: Request, service: ServiceDep) -> dict[str, Any]:
    await _control(request, service, model_name, load=False)
    return {}
