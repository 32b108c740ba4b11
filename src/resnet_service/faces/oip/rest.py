"""The Open Inference Protocol v2 over REST (``/v2/...``), as KServe and Triton speak it.

A thin face over ``faces/oip/dataplane.py``: JSON requests, and the binary tensor data extension
(``Inference-Header-Content-Length``: a JSON header, then each binary input in order; BYTES
elements length-prefixed). BYTES inputs in JSON are base64 strings declared with the
``content_type: base64`` parameter, as MLServer does. Errors are the protocol's
``{"error": "..."}`` with the status our error hierarchy gives them (input 400, unknown model
404, overload 503 with Retry-After...), never a 500 for bad input. Admission, the upload
budget, body timeouts, auth and metrics are the same as ``/classify``'s.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any, Final
from urllib.parse import unquote

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError
from starlette.types import Scope

from resnet_service.asgi.body import request_body
from resnet_service.asgi.context import request_context
from resnet_service.asgi.deps import ServiceDep, admitted_ticket, require_token
from resnet_service.asgi.routes import AdmittedRoute, ModelRef
from resnet_service.core.admission import Ticket
from resnet_service.core.classifier import Classifier
from resnet_service.core.errors import InvalidInferRequest, ServiceError
from resnet_service.faces.oip.dataplane import DataPlane
from resnet_service.faces.oip.errors import ERROR_SHAPE, error_response
from resnet_service.faces.oip.tensors import (
    InferRequest,
    InferResponse,
    InputTensor,
    RequestedOutput,
    deserialize_bytes,
    fp32_from_raw,
    priority_parameter,
)
from resnet_service.service.state import ServiceState

HEADER_LENGTH: Final = "inference-header-content-length"


class OipRoute(APIRoute):
    """Routes whose every error, validation included, is the protocol's ``{"error": ...}``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as exc:
                return error_response(exc, request)
            except RequestValidationError as exc:
                detail = "; ".join(
                    f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
                )
                return error_response(InvalidInferRequest(detail), request)

        return handle


PREFIX: Final = "/v2"
router = APIRouter(prefix=PREFIX, tags=["Open Inference Protocol v2"], route_class=OipRoute)
_INFER: Final = re.compile(rf"^{PREFIX}/models/([^/]+)(?:/versions/([^/]+))?/infer$")


def model_from_path(scope: Scope) -> ModelRef:
    """OIP names the model, and maybe its version, in the path."""
    match = _INFER.match(scope["path"])
    if match is None:
        return None, None
    return unquote(match[1]), unquote(match[2]) if match[2] else None


#: Inference, admitted from the request head; with or without a version, one route label.
ADMITTED = (
    AdmittedRoute(
        PREFIX + "/models/{model_name}/infer",
        names_model=model_from_path,
        shape=ERROR_SHAPE,
        pattern=_INFER,
    ),
)


async def get_dataplane(service: ServiceDep) -> DataPlane:
    return DataPlane.over(service)


DataPlaneDep = Annotated[DataPlane, Depends(get_dataplane)]


async def get_oip_classifier(request: Request, service: ServiceDep) -> Classifier:
    """The classifier admission chose at the head, else the one the path names (``NotReady``
    while it loads, ``ModelNotFound`` for what this replica does not serve)."""
    chosen = request_context(request).classifier
    if chosen is not None:
        return chosen
    params = request.path_params
    return await service.classifier_loaded(params.get("model_name"), params.get("model_version"))


OipClassifierDep = Annotated[Classifier, Depends(get_oip_classifier)]


async def oip_admission_ticket(
    request: Request, classifier: OipClassifierDep
) -> AsyncIterator[Ticket]:
    with admitted_ticket(request, classifier) as ticket:
        yield ticket


OipTicketDep = Annotated[Ticket, Depends(oip_admission_ticket)]


# --- schemas (JSON mode) --------------------------------------------------------------------
class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    """An OIP v2 inference request (JSON; binary inputs follow it with the extension)."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ErrorBody(BaseModel):
    error: str


_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    400: {"model": ErrorBody, "description": "Invalid request."},
    404: {"model": ErrorBody, "description": "No such model or version."},
    503: {"model": ErrorBody, "description": "Not ready or overloaded; see Retry-After."},
}


# --- decoding -------------------------------------------------------------------------------
def _parameter(params: dict[str, Any] | None, name: str) -> Any:
    return (params or {}).get(name)


def _bytes_from_json(item: RequestInput) -> list[bytes]:
    if _parameter(item.parameters, "content_type") not in ("base64", "b64"):
        raise InvalidInferRequest(
            f"Input '{item.name}': BYTES in JSON must be base64 strings with parameters "
            '{"content_type": "base64"} (or use the binary tensor data extension).'
        )
    try:
        return [base64.b64decode(str(value), validate=True) for value in item.data or []]
    except (binascii.Error, ValueError):
        raise InvalidInferRequest(f"Input '{item.name}': data is not valid base64.") from None


def _fp32_from_json(item: RequestInput) -> np.ndarray:
    try:
        array = np.asarray(item.data, dtype=np.float32)
        return array.reshape(item.shape)
    except (TypeError, ValueError):
        raise InvalidInferRequest(
            f"Input '{item.name}': data does not fill shape {item.shape} with numbers."
        ) from None


def _input(item: RequestInput, raw: bytes | None) -> InputTensor:
    shape = tuple(item.shape)
    if item.datatype == "BYTES":
        count = int(np.prod(shape)) if shape else 0
        elements = (
            deserialize_bytes(raw, count, f"input '{item.name}'")
            if raw is not None
            else _bytes_from_json(item)
        )
        return InputTensor(item.name, "BYTES", shape, elements=elements)
    if item.datatype == "FP32":
        array = (
            fp32_from_raw(raw, shape, f"input '{item.name}'")
            if raw is not None
            else _fp32_from_json(item)
        )
        return InputTensor(item.name, "FP32", shape, array=array)
    raise InvalidInferRequest(
        f"Input '{item.name}': datatype {item.datatype} is not served (BYTES or FP32)."
    )


def parse_infer(
    body: bytes, header_length: str | None, model: str, version: str | None
) -> InferRequest:
    """JSON, or JSON + binary tensors (the binary tensor data extension)."""
    split = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidInferRequest(
                f"{HEADER_LENGTH} is {header_length!r} for a {len(body)}-byte body."
            )
        split = int(header_length)
    try:
        request = InferenceRequest.model_validate_json(body[:split])
    except ValidationError as exc:
        raise InvalidInferRequest(
            f"The inference request is not valid: {exc.errors()[0]['msg']} at "
            f"{'.'.join(map(str, exc.errors()[0]['loc']))}."
        ) from None
    binary, inputs = body[split:], []
    for item in request.inputs:
        size = _parameter(item.parameters, "binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or size > len(binary):
                raise InvalidInferRequest(
                    f"Input '{item.name}': binary_data_size {size!r} does not fit the body."
                )
            raw, binary = binary[:size], binary[size:]
            inputs.append(_input(item, raw))
        else:
            inputs.append(_input(item, None))
    if binary:
        raise InvalidInferRequest(f"{len(binary)} bytes follow the inputs' binary data.")
    return InferRequest(
        model_name=model,
        model_version=version or "",
        inputs=inputs,
        outputs=[_requested(o) for o in request.outputs] if request.outputs else None,
        id=request.id,
        binary_output=bool(_parameter(request.parameters, "binary_data_output")),
        target=_integer(request.parameters, "target", "The request"),
        priority=priority_parameter(_parameter(request.parameters, "priority")),
    )


def _integer(parameters: dict[str, Any] | None, name: str, what: str) -> int | None:
    value = _parameter(parameters, name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise InvalidInferRequest(f"{what}: {name} must be an integer.")
    return value


def _requested(output: RequestOutput) -> RequestedOutput:
    what = f"Output '{output.name}'"
    return RequestedOutput(
        output.name,
        _integer(output.parameters, "classification", what),
        bool(_parameter(output.parameters, "binary_data")),
        _integer(output.parameters, "target", what),
    )


def encode_response(response: InferResponse) -> Response:
    """JSON, or JSON + binary outputs (Inference-Header-Content-Length) when asked."""
    outputs, blobs = [], []
    for tensor in response.outputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if tensor.binary:
            raw = tensor.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif tensor.array is not None:
            entry["data"] = tensor.array.reshape(-1).tolist()
        else:
            entry["data"] = [e.decode() for e in tensor.elements]
        outputs.append(entry)
    head: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    }
    if response.id is not None:
        head["id"] = response.id
    header = json.dumps(head).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


# --- routes ---------------------------------------------------------------------------------
@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata(plane: DataPlaneDep) -> dict[str, Any]:
    return plane.server_metadata()


@router.get("/health/live", summary="Liveness", responses=_ERRORS)
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Readiness of the server", responses=_ERRORS)
async def ready(plane: DataPlaneDep) -> Response:
    ok = plane.server_ready()
    return Response(json.dumps({"ready": ok}), 200 if ok else 503, media_type="application/json")


def _model_ready(plane: DataPlane, model_name: str, version: str | None) -> Response:
    ok = plane.model_ready(model_name, version)
    body = json.dumps({"name": model_name, "ready": ok})
    return Response(body, 200 if ok else 503, media_type="application/json")


@router.get(
    "/models/{model_name}",
    response_model=ModelMetadata,
    summary="Model metadata",
    responses=_ERRORS,
)
async def model_metadata(model_name: str, plane: DataPlaneDep) -> dict[str, Any]:
    return plane.model_metadata(model_name, None)


@router.get(
    "/models/{model_name}/versions/{model_version}",
    response_model=ModelMetadata,
    summary="Model metadata (a version)",
    responses=_ERRORS,
)
async def model_version_metadata(
    model_name: str, model_version: str, plane: DataPlaneDep
) -> dict[str, Any]:
    return plane.model_metadata(model_name, model_version)


@router.get("/models/{model_name}/ready", summary="Model readiness", responses=_ERRORS)
async def model_ready(model_name: str, plane: DataPlaneDep) -> Response:
    return _model_ready(plane, model_name, None)


@router.get(
    "/models/{model_name}/versions/{model_version}/ready",
    summary="Model readiness (a version)",
    responses=_ERRORS,
)
async def model_version_ready(model_name: str, model_version: str, plane: DataPlaneDep) -> Response:
    return _model_ready(plane, model_name, model_version)


async def _infer(
    request: Request,
    service: ServiceState,
    plane: DataPlane,
    ticket: Ticket,
    classifier: Classifier,
    name: str,
    version: str | None,
) -> Response:
    if request.headers.get("content-encoding", "identity") != "identity":
        raise InvalidInferRequest("Compressed request bodies are not accepted; send them plain.")
    settings, context = service.settings, request_context(request)
    limit, budget = settings.max_batch_bytes, service.upload_budget
    async with request_body(request, limit, budget, settings.body_timeout_s) as body:
        ticket.uploaded()
        parsed = parse_infer(body, request.headers.get(HEADER_LENGTH), name, version)
        del body
        if parsed.priority is not None:  # counted under the class the body asked for
            context.priority = parsed.priority
        first = parsed.inputs[0]
        context.images = first.shape[0] if first.shape else 0
        response = await plane.infer(parsed, classifier)
    context.images_ok = context.images
    return encode_response(response)


_INFER_DOC: Final[dict[str, Any]] = {
    "summary": "Inference: encoded images (BYTES) or preprocessed FP32 tensors",
    "description": "JSON body (BYTES as base64 with `content_type: base64`), or the binary "
    "tensor data extension (`Inference-Header-Content-Length`). Outputs: `probabilities` "
    "FP32 [N, classes], or with `classification: k` BYTES [N, k] of `score:index:label`; "
    "`embedding` FP32 [N, D] (L2-normalised) and `cam` FP32 [N, 7, 7] (class activation map "
    "of the `target` parameter, per output or per request, else of the top class). Request "
    "parameter `priority`: `interactive`, `bulk`, or a Triton level (1 interactive, 2 and up "
    "bulk); the header `Priority: u=7` also marks a request bulk, and only the header counts at "
    "admission (decided before the body is read).",
    "response_model": InferenceResponse,
    "responses": _ERRORS,
    "dependencies": [Depends(require_token)],
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
}


@router.post("/models/{model_name}/infer", **_INFER_DOC)
async def infer(
    request: Request,
    model_name: str,
    service: ServiceDep,
    plane: DataPlaneDep,
    classifier: OipClassifierDep,
    ticket: OipTicketDep,
) -> Response:
    return await _infer(request, service, plane, ticket, classifier, model_name, None)


@router.post("/models/{model_name}/versions/{model_version}/infer", **_INFER_DOC)
async def infer_version(
    request: Request,
    model_name: str,
    model_version: str,
    service: ServiceDep,
    plane: DataPlaneDep,
    classifier: OipClassifierDep,
    ticket: OipTicketDep,
) -> Response:
    return await _infer(request, service, plane, ticket, classifier, model_name, model_version)
