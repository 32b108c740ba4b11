"""Open a built model file with the runtime it was built for, without importing torch."""

from __future__ import annotations

from pathlib import Path

from resnet_service.config import Precision, RuntimeName
from resnet_service.core.errors import RuntimeUnavailable
from resnet_service.core.images import PreprocessSpec
from resnet_service.core.runtime import Runtime
from resnet_service.runtimes.packages import torch_version


def runtime_version(name: RuntimeName) -> str:
    """The installed version of a runtime (part of every artifact's cache key)."""
    if name == "openvino":
        from resnet_service.runtimes.openvino_runtime import openvino_version

        return openvino_version()
    if name == "onnxruntime":
        from resnet_service.runtimes.onnxruntime_runtime import onnxruntime_version

        return onnxruntime_version()
    return torch_version()


def open_runtime(
    name: RuntimeName,
    precision: Precision,
    model_file: Path,
    threads: int,
    pixels: PreprocessSpec | None = None,
) -> Runtime:
    """A ready runtime for an OpenVINO IR or an ONNX file (torch loads modules elsewhere);
    with ``pixels``, one that takes 8-bit images where the runtime can (OpenVINO)."""
    if name == "openvino":
        from resnet_service.runtimes.openvino_runtime import OpenVinoRuntime

        return OpenVinoRuntime(model_file, precision, threads, pixels)
    if name == "onnxruntime":
        from resnet_service.runtimes.onnxruntime_runtime import OnnxRuntime

        return OnnxRuntime(model_file, precision, threads)
    raise RuntimeUnavailable(f"the {name} runtime does not open model files")
