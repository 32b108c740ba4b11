"""OpenVINO runtime: an IR (``model.xml`` + ``model.bin``) compiled for the CPU, torch-free.

int8 IRs come from NNCF post-training quantization (``model/build.py``). One stream, a fixed
number of inference threads, no core pinning (with one worker per core, pinning would put the
workers' threads on the same cores), and f32 inference precision: on CPUs with bf16 units
OpenVINO would otherwise run "fp32" models in bf16, which is not what fp32 promises.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import numpy as np

from resnet_service.config import Precision, RuntimeName
from resnet_service.runtimes.base import FloatBatch, import_runtime


def _openvino() -> Any:
    return import_runtime("openvino")


def openvino_version() -> str:
    version: str = _openvino().__version__
    return version.split("-")[0]


class OpenVinoRuntime:
    """A compiled OpenVINO model and one infer request (used from the engine thread only)."""

    name: Final[RuntimeName] = "openvino"

    def __init__(self, model_xml: Path, precision: Precision, threads: int) -> None:
        ov = _openvino()
        self.precision: Precision = precision
        self.threads = threads
        self._compiled = ov.Core().compile_model(
            str(model_xml),
            "CPU",
            {
                "INFERENCE_NUM_THREADS": threads,
                "NUM_STREAMS": 1,
                "PERFORMANCE_HINT": "LATENCY",
                "ENABLE_CPU_PINNING": False,
                "INFERENCE_PRECISION_HINT": "f32",
            },
        )
        self._output = self._compiled.output(0)
        self._request = self._compiled.create_infer_request()

    @staticmethod
    def version() -> str:
        return openvino_version()

    def bind_thread(self) -> None:
        """OpenVINO's threads are fixed when the model is compiled."""

    def infer(self, batch: FloatBatch) -> FloatBatch:
        result = self._request.infer({0: np.ascontiguousarray(batch)})
        out: FloatBatch = np.asarray(result[self._output], dtype=np.float32)
        return out

    def close(self) -> None:
        self._request = None
        self._compiled = None
