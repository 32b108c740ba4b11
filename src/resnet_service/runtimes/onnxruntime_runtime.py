"""ONNX Runtime: an ONNX model (fp32, or int8 as QDQ from static quantization) on the CPU
execution provider, torch-free.

Sequential execution with a fixed number of intra-op threads and no inter-op pool, and no
spin-waiting: ONNX Runtime's threads otherwise spin between batches, burning the CPU that the
decode threads and the other workers need (a measured choice: see the benchmark).

A model built by this version has three outputs (logits, embedding, feature map); a run
fetches only the ones asked for, so ``/classify`` copies nothing more than the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import numpy as np

from resnet_service.config import Precision, RuntimeName
from resnet_service.core.runtime import LOGITS_ONLY, FloatBatch, Forward, Output, Wants
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
        names = [o.name for o in self._session.get_outputs()]
        #: A model from before the extra outputs has one, the logits, whatever its name.
        self._names = {Output.LOGITS: names[0]} | {
            output: output.value for output in Output if output.value in names
        }
        self.outputs: Wants = frozenset(self._names)

    @staticmethod
    def version() -> str:
        return onnxruntime_version()

    def bind_thread(self) -> None:
        """ONNX Runtime's threads are fixed when the session is made."""

    def infer(self, batch: FloatBatch) -> FloatBatch:
        return self.forward(batch, LOGITS_ONLY).logits

    def forward(self, batch: FloatBatch, wants: Wants) -> Forward:
        asked = [Output.LOGITS] + [o for o in (Output.EMBEDDING, Output.FEATURE_MAP) if o in wants]
        values = self._session.run(
            [self._names[o] for o in asked], {self._input: np.ascontiguousarray(batch)}
        )
        got = {o: np.asarray(v, dtype=np.float32) for o, v in zip(asked, values, strict=True)}
        return Forward(
            logits=got[Output.LOGITS],
            embedding=got.get(Output.EMBEDDING),
            feature_map=got.get(Output.FEATURE_MAP),
        )

    def close(self) -> None:
        self._session = None
