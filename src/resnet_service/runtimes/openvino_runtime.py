"""OpenVINO runtime: an IR (``model.xml`` + ``model.bin``) compiled for the CPU, torch-free.

int8 IRs come from NNCF post-training quantization (``model/build.py``). One stream, a fixed
number of inference threads, no core pinning (with one worker per core, pinning would put the
workers' threads on the same cores), and f32 inference precision: on CPUs with bf16 units
OpenVINO would otherwise run "fp32" models in bf16, which is not what fp32 promises.

Served images arrive as 8-bit NHWC pixels: the mean/std normalisation and the layout change
are added in front of the network with OpenVINO's PrePostProcessor at load time (the artifact
on disk is unchanged), so they run inside the compiled graph instead of as numpy passes on
the decode thread. The float (NCHW, normalised) model for preprocessed tensors (OIP FP32
inputs) is compiled only when one first arrives: most replicas never need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import numpy as np

from resnet_service.config import Precision, RuntimeName
from resnet_service.core.images import Pixels, PreprocessSpec
from resnet_service.core.runtime import FloatBatch
from resnet_service.runtimes.packages import import_runtime


def _openvino() -> Any:
    return import_runtime("openvino")


def openvino_version() -> str:
    version: str = _openvino().__version__
    return version.split("-")[0]


def _with_pixel_input(model: Any, spec: PreprocessSpec) -> Any:
    """The network behind a uint8 NHWC input: to f32, minus mean, over std, to NCHW."""
    ov = _openvino()
    ppp = ov.preprocess.PrePostProcessor(model)
    tensor = ppp.input().tensor()
    tensor.set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    ppp.input().model().set_layout(ov.Layout("NCHW"))
    steps = ppp.input().preprocess()
    steps.convert_element_type(ov.Type.f32)
    steps.mean([255.0 * m for m in spec.mean]).scale([255.0 * s for s in spec.std])
    return ppp.build()


class OpenVinoRuntime:
    """A compiled OpenVINO model and one infer request (used from the engine thread only).

    With ``pixels`` (the model's preprocessing spec), ``infer_pixels`` takes 8-bit images."""

    name: Final[RuntimeName] = "openvino"

    def __init__(
        self,
        model_xml: Path,
        precision: Precision,
        threads: int,
        pixels: PreprocessSpec | None = None,
    ) -> None:
        self._core = _openvino().Core()
        self._model_xml = model_xml
        self.precision: Precision = precision
        self.threads = threads
        self._float: tuple[Any, Any] | None = None
        self._pixels: tuple[Any, Any] | None = None
        if pixels is None:
            self._float = self._compile(self._core.read_model(str(model_xml)))
        else:
            model = _with_pixel_input(self._core.read_model(str(model_xml)), pixels)
            self._pixels = self._compile(model)

    def _compile(self, model: Any) -> tuple[Any, Any]:
        compiled = self._core.compile_model(
            model,
            "CPU",
            {
                "INFERENCE_NUM_THREADS": self.threads,
                "NUM_STREAMS": 1,
                "PERFORMANCE_HINT": "LATENCY",
                "ENABLE_CPU_PINNING": False,
                "INFERENCE_PRECISION_HINT": "f32",
            },
        )
        return compiled.output(0), compiled.create_infer_request()

    @staticmethod
    def version() -> str:
        return openvino_version()

    @property
    def takes_pixels(self) -> bool:
        return self._pixels is not None

    def bind_thread(self) -> None:
        """OpenVINO's threads are fixed when the model is compiled."""

    def infer(self, batch: FloatBatch) -> FloatBatch:
        if self._float is None:  # first preprocessed input: compile the plain network now
            self._float = self._compile(self._core.read_model(str(self._model_xml)))
        return self._run(self._float, np.ascontiguousarray(batch))

    def infer_pixels(self, batch: Pixels) -> FloatBatch:
        """N x H x W x 3 uint8 images -> logits (the normalisation runs in the graph)."""
        assert self._pixels is not None, "opened without a pixel input"
        return self._run(self._pixels, np.ascontiguousarray(batch))

    @staticmethod
    def _run(compiled: tuple[Any, Any], batch: Any) -> FloatBatch:
        output, request = compiled
        result = request.infer({0: batch})
        out: FloatBatch = np.asarray(result[output], dtype=np.float32)
        return out

    def close(self) -> None:
        self._float = self._pixels = None
