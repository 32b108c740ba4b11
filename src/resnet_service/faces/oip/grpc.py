"""The Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``) and the
standard ``grpc.health.v1`` service, on their own port, in each worker's event loop.

A thin face over ``faces/oip/dataplane.py``, like the REST one: the same admission (a refused RPC is
``UNAVAILABLE`` with a ``retry-after`` trailer), auth (``authorization: Bearer`` metadata),
limits (message sizes fit ``max_batch_bytes``) and metrics. Outputs go in
``raw_output_contents``. Each worker binds the port with SO_REUSEPORT once its model is warm,
like the HTTP socket; on shutdown the server stops taking RPCs and finishes those in flight.

Note: these generated messages share the protobuf package ``inference`` with tritonclient's
(that is the protocol); one process cannot import both, which is why only workers import this.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from resnet_service.core import priority
from resnet_service.core.errors import InvalidInferRequest
from resnet_service.core.priority import Priority
from resnet_service.faces.oip.dataplane import DataPlane
from resnet_service.faces.oip.grpc_observed import ObservedRpcs, current_rpc
from resnet_service.faces.oip.pb import inference_pb2 as pb
from resnet_service.faces.oip.pb import inference_pb2_grpc as pb_grpc
from resnet_service.faces.oip.tensors import (
    InferRequest,
    InferResponse,
    InputTensor,
    RequestedOutput,
    deserialize_bytes,
    fp32_from_raw,
    priority_parameter,
)
from resnet_service.service import tracing
from resnet_service.service.auth import check_admin, check_bearer
from resnet_service.service.state import ServiceState

log = logging.getLogger(__name__)

SERVICE: Final = "inference.GRPCInferenceService"
_MESSAGE_OVERHEAD: Final = 1 << 20


def _param(params: Any, name: str) -> Any:
    if name not in params:
        return None
    value = params[name]
    return getattr(value, value.WhichOneof("parameter_choice") or "string_param")


def parse_request(request: pb.ModelInferRequest) -> InferRequest:
    """The protocol-neutral request: raw contents (tritonclient's way) or typed contents."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInferRequest(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs."
        )
    inputs = [_input(tensor, raw[i] if raw else None) for i, tensor in enumerate(request.inputs)]
    outputs = [
        RequestedOutput(
            o.name,
            _param(o.parameters, "classification"),
            binary=True,
            target=_param(o.parameters, "target"),
        )
        for o in request.outputs
    ]
    return InferRequest(
        model_name=request.model_name,
        model_version=request.model_version,
        inputs=inputs,
        outputs=outputs or None,
        id=request.id or None,
        binary_output=True,
        target=_param(request.parameters, "target"),
    )


def _input(tensor: Any, raw: bytes | None) -> InputTensor:
    shape = tuple(int(d) for d in tensor.shape)
    what = f"input '{tensor.name}'"
    if tensor.datatype == "BYTES":
        count = int(np.prod(shape)) if shape else 0
        elements = (
            deserialize_bytes(raw, count, what)
            if raw is not None
            else list(tensor.contents.bytes_contents)
        )
        return InputTensor(tensor.name, "BYTES", shape, elements=elements)
    if tensor.datatype == "FP32":
        if raw is not None:
            array = fp32_from_raw(raw, shape, what)
        else:
            values = np.asarray(tensor.contents.fp32_contents, dtype=np.float32)
            if values.size != int(np.prod(shape)):
                raise InvalidInferRequest(f"{what}: {values.size} values for shape {list(shape)}.")
            array = values.reshape(shape)
        return InputTensor(tensor.name, "FP32", shape, array=array)
    raise InvalidInferRequest(f"{what}: datatype {tensor.datatype} is not served (BYTES or FP32).")


def encode_response(response: InferResponse) -> pb.ModelInferResponse:
    message = pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id or "",
    )
    for tensor in response.outputs:
        message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
        message.raw_output_contents.append(tensor.raw())
    return message


def _requested_priority(request: Any, context: grpc.aio.ServicerContext) -> Priority:
    """The request's ``priority`` parameter (tritonclient's ``priority=``), else the
    ``priority`` metadata in RFC 9218's syntax as on HTTP (``u=7`` is bulk). Read once,
    before admission; the context carries it to the data plane (``parse_request`` leaves the
    request's own field unset)."""
    wanted = priority_parameter(_param(request.parameters, "priority"))
    if wanted is not None:
        return wanted
    metadata = dict(context.invocation_metadata() or ())
    return priority.from_header(str(metadata.get("priority", "")))


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The OIP RPCs over the data plane, with admission and auth; spans, metrics and the
    status of a domain error are the interceptor's (``grpc_observed``)."""

    def __init__(self, service: ServiceState) -> None:
        self.service = service
        self.plane = DataPlane.over(service)
        self.tracing = tracing.wanted(service.settings)

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.plane.server_ready())

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version))

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return pb.ServerMetadataResponse(**self.plane.server_metadata())

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        meta = self.plane.model_metadata(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        self._authorize(context)
        model, version = request.model_name, request.model_version or None
        record = current_rpc()
        wanted = record.priority = _requested_priority(request, context)
        with priority.requested(wanted):
            admit = tracing.admitter(self.tracing)
            classifier, ticket = await self.service.admit_loaded(model, version, admit)
            with ticket:
                ticket.uploaded()  # a unary RPC arrives whole
                parsed = parse_request(request)
                response = await self.plane.infer(parsed, classifier)
        record.images = parsed.inputs[0].shape[0]
        return encode_response(response)

    # --- the model repository extension ---------------------------------------------------
    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        self._authorize_admin(context)
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                index(name=e.name, version=e.version, state=str(e.state), reason=e.reason)
                for e in self.service.models.repository_index(request.ready)
            ]
        )

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        self._authorize_admin(context)
        await asyncio.to_thread(self.service.require_repository().load, request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        self._authorize_admin(context)
        await asyncio.to_thread(self.service.require_repository().unload, request.model_name)
        return pb.RepositoryModelUnloadResponse()

    def _authorize_admin(self, context: grpc.aio.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        check_admin(
            str(metadata.get("authorization", "")),
            self.service.settings.admin_token,
            "'authorization: Bearer <admin token>' metadata",
        )

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        check_bearer(
            str(metadata.get("authorization", "")),
            self.service.settings.auth_token,
            "'authorization: Bearer <token>' metadata",
        )


class ReadinessHealth(HealthServicer):  # type: ignore[misc]
    """``grpc.health.v1``: SERVING exactly when /readyz would say 200."""

    def __init__(self, plane: DataPlane) -> None:
        super().__init__()
        self.plane = plane

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        if request.service not in ("", SERVICE):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.plane.server_ready()
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        return health_pb2.HealthCheckResponse(status=status)


class GrpcFace:
    """The gRPC server of one worker: started in the worker's event loop once the model is
    warm, stopped (finishing the RPCs in flight) after the HTTP server drained."""

    def __init__(self, service: ServiceState, host: str, port: int) -> None:
        self.service = service
        self.address = f"{host}:{port}"
        self._server: grpc.aio.Server | None = None
        self._health: ReadinessHealth | None = None

    async def start(self) -> None:
        limit = self.service.settings.max_batch_bytes + _MESSAGE_OVERHEAD
        traced = tracing.wanted(self.service.settings)
        server = grpc.aio.server(
            interceptors=[ObservedRpcs(SERVICE, self.service.metrics, traced)],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 1),
            ],
        )
        inference = InferenceServicer(self.service)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)
        self._health = ReadinessHealth(inference.plane)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if server.add_insecure_port(self.address) == 0:
            raise OSError(f"cannot bind the gRPC port {self.address}")
        await server.start()
        self._server = server
        log.info("gRPC (Open Inference Protocol v2) on %s", self.address)

    async def stop(self, grace_s: float) -> None:
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
