"""Protocol-neutral tensors of the Open Inference Protocol, and the BYTES wire format.

In the binary forms (HTTP's binary tensor extension, gRPC's raw contents) a BYTES tensor is
its elements in row-major order, each prefixed with its length as a 4-byte little-endian
unsigned integer. Written here (a few lines) rather than taken from tritonclient, a client
library the server should not depend on.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from resnet_service.core import priority
from resnet_service.core.errors import InvalidInferRequest
from resnet_service.core.priority import Priority
from resnet_service.core.runtime import FloatBatch

_LENGTH: Final = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class InputTensor:
    """One input: BYTES elements (encoded images) or an FP32 array."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    elements: list[bytes] | None = None
    array: FloatBatch | None = None


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    #: The classification extension: return the top ``k`` as "score:index:label" strings.
    classification: int | None = None
    binary: bool = False
    #: ``cam``'s class (its parameter ``target``); None: the request's, else the top class.
    target: int | None = None


@dataclass(frozen=True, slots=True)
class InferRequest:
    model_name: str
    model_version: str
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None
    id: str | None = None
    #: Request-level ``binary_data_output``: every output in binary form.
    binary_output: bool = False
    #: Request-level ``target`` parameter: ``cam``'s class for outputs that name none.
    target: int | None = None
    #: Request-level ``priority`` parameter; None leaves the transport's class.
    priority: Priority | None = None


@dataclass(frozen=True, slots=True)
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    array: FloatBatch | None = None
    elements: list[bytes] = field(default_factory=list)
    binary: bool = False

    def raw(self) -> bytes:
        """The binary form: FP32 little-endian row-major, or length-prefixed BYTES."""
        if self.array is not None:
            return np.ascontiguousarray(self.array, dtype="<f4").tobytes()
        return serialize_bytes(self.elements)


@dataclass(frozen=True, slots=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[OutputTensor]
    id: str | None = None


def serialize_bytes(elements: list[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def deserialize_bytes(raw: bytes, count: int, what: str) -> list[bytes]:
    """``count`` length-prefixed elements from ``raw``, nothing left over."""
    elements: list[bytes] = []
    offset = 0
    for index in range(count):
        if offset + 4 > len(raw):
            raise InvalidInferRequest(
                f"{what}: the binary data ends before element {index} (of {count})"
            )
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInferRequest(
                f"{what}: element {index} claims {length} bytes but the data ends first"
            )
        elements.append(raw[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise InvalidInferRequest(
            f"{what}: {len(raw) - offset} bytes left over after {count} elements (shape and "
            "data disagree)"
        )
    return elements


def fp32_from_raw(raw: bytes, shape: tuple[int, ...], what: str) -> FloatBatch:
    """An FP32 array from little-endian row-major bytes, checked against ``shape``."""
    expected = int(np.prod(shape)) * 4
    if len(raw) != expected:
        raise InvalidInferRequest(
            f"{what}: {len(raw)} bytes of data for shape {list(shape)} (FP32 needs {expected})"
        )
    return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)


def priority_parameter(value: object) -> Priority | None:
    """The request's ``priority`` parameter (absent: None), as a 400 when it is not a class."""
    if value is None:
        return None
    try:
        return priority.from_parameter(value)
    except ValueError as exc:
        raise InvalidInferRequest(f"The request's parameter {exc}") from None
