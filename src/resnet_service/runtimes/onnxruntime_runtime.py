"""ONNX Runtime: an ONNX model (fp32, or int8 as QDQ from static quantization) on the CPU
execution provider, torch-free.

Sequential execution with a fixed number of intra-op threads and no inter-op pool, and no
spin-waiting: ONNX Runtime's threads otherwise spin between batches, burning the CPU that the
decode threads and the other workers need (a measured choice: see the benchmark).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import numpy as np

from resnet_service.config import Precision, RuntimeName
from resnet_service.core.runtime import FloatBatch
from resnet_service.runtimes.packages import import_runtime


def _onnxruntime() -> Any:
    return import_runtime("onnxruntime")


def onnxruntime_version() -> str:
    version: str = _onnxruntime().__version__
    return version


class OnnxRuntime:
    """An ``InferenceSession`` (used from the engine thread only)."""

    name: Final[RuntimeName] = "onnxruntime"

    def __init__(self, model_onnx: Path, precision: Precision, threads: int) -> None:
        ort = _onnxruntime()
        self.precision: Precision = precision
        self.threads = threads
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            str(model_onnx), options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name

    @staticmethod
    def version() -> str:
        return onnxruntime_version()

    def bind_thread(self) -> None:
        """ONNX Runtime's threads are fixed when the session is made."""

    def infer(self, batch: FloatBatch) -> FloatBatch:
        (logits,) = self._session.run(None, {self._input: np.ascontiguousarray(batch)})
        out: FloatBatch = np.asarray(logits, dtype=np.float32)
        return out

    def close(self) -> None:
        self._session = None
