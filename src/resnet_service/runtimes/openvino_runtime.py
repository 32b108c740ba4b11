"""OpenVINO runtime: an IR (``model.xml`` + ``model.bin``) compiled for the CPU, torch-free.

int8 IRs come from NNCF post-training quantization (``model/export.py``). One stream, a fixed
number of inference threads, no core pinning (with one worker per core, pinning would put the
workers' threads on the same cores), and f32 inference precision: on CPUs with bf16 units
OpenVINO would otherwise run "fp32" models in bf16, which is not what fp32 promises.

Served images arrive as 8-bit NHWC pixels: the mean/std normalisation and the layout change
are added in front of the network with OpenVINO's PrePostProcessor at load time (the artifact
on disk is unchanged), so they run inside the compiled graph instead of as numpy passes on
the decode thread. The float (NCHW, normalised) model for preprocessed tensors (OIP FP32
inputs) is compiled only when one first arrives: most replicas never need it.

A model built by this version has three outputs (logits, embedding, feature map). The infer
request shares its output buffers (``share_outputs``): nothing is copied but what a caller
asked for, so ``/classify`` pays for the logits only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import numpy as np

from resnet_service.config import Precision, RuntimeName
from resnet_service.core.images import Pixels, PreprocessSpec
from resnet_service.core.runtime import LOGITS_ONLY, FloatBatch, Forward, Output, Wants
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
        self._float: _Compiled | None = None
        self._pixels: _Compiled | None = None
        if pixels is None:
            self._float = self._compile(self._core.read_model(str(model_xml)))
        else:
            model = _with_pixel_input(self._core.read_model(str(model_xml)), pixels)
            self._pixels = self._compile(model)

    def _compile(self, model: Any) -> _Compiled:
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
        return _Compiled(compiled)

    @staticmethod
    def version() -> str:
        return openvino_version()

    @property
    def takes_pixels(self) -> bool:
        return self._pixels is not None

    @property
    def outputs(self) -> Wants:
        compiled = self._pixels or self._float
        assert compiled is not None
        return frozenset(compiled.ports)

    def bind_thread(self) -> None:
        """OpenVINO's threads are fixed when the model is compiled."""

    def infer(self, batch: FloatBatch) -> FloatBatch:
        """Logits of a preprocessed batch (a copy: ``forward``'s are the request's buffers)."""
        return self.forward(batch, LOGITS_ONLY).logits.copy()

    def forward(self, batch: FloatBatch, wants: Wants) -> Forward:
        if self._float is None:  # first preprocessed input: compile the plain network now
            self._float = self._compile(self._core.read_model(str(self._model_xml)))
        return self._float.run(np.ascontiguousarray(batch), wants)

    def infer_pixels(self, batch: Pixels) -> FloatBatch:
        """N x H x W x 3 uint8 images -> logits (the normalisation runs in the graph)."""
        return self.forward_pixels(batch, LOGITS_ONLY).logits.copy()

    def forward_pixels(self, batch: Pixels, wants: Wants) -> Forward:
        assert self._pixels is not None, "opened without a pixel input"
        return self._pixels.run(np.ascontiguousarray(batch), wants)

    def close(self) -> None:
        self._float = self._pixels = None


class _Compiled:
    """A compiled model, its infer request and its output ports by what they yield."""

    def __init__(self, compiled: Any) -> None:
        self.request = compiled.create_infer_request()
        outputs = compiled.outputs
        named = {o: port for port in outputs for o in Output if o.value in port.get_names()}
        #: A model from before the extra outputs has one, the logits, whatever its name.
        self.ports: dict[Output, Any] = {Output.LOGITS: outputs[0]} | named

    def run(self, batch: Any, wants: Wants) -> Forward:
        result = self.request.infer({0: batch}, share_outputs=True)

        def get(output: Output) -> FloatBatch | None:
            if output not in wants or output not in self.ports:
                return None
            value: FloatBatch = np.asarray(result[self.ports[output]], dtype=np.float32)
            return value

        logits: FloatBatch = np.asarray(result[self.ports[Output.LOGITS]], dtype=np.float32)
        return Forward(logits, get(Output.EMBEDDING), get(Output.FEATURE_MAP))
