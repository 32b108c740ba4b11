"""PyTorch eager runtime: the int8 (x86 engine, static PTQ) or fp32 module, on the engine thread."""

from __future__ import annotations

from typing import Final

import numpy as np
import torch
from torch import nn

from resnet_service.config import Precision, RuntimeName
from resnet_service.core.runtime import FloatBatch


class TorchRuntime:
    """An ``nn.Module`` in eval mode run under ``inference_mode`` with a fixed thread count."""

    name: Final[RuntimeName] = "torch"

    def __init__(self, module: nn.Module, precision: Precision, threads: int) -> None:
        self.module = module.eval()
        self.precision: Precision = precision
        self.threads = threads

    @staticmethod
    def version() -> str:
        return torch.__version__

    def bind_thread(self) -> None:
        # OpenMP's thread count is per OS thread: set it on the thread that runs the model.
        torch.set_num_threads(self.threads)

    def infer(self, batch: FloatBatch) -> FloatBatch:
        with torch.inference_mode():
            logits = self.module(torch.from_numpy(np.ascontiguousarray(batch)))
        out: FloatBatch = logits.float().numpy()
        return out

    def close(self) -> None:
        """Nothing to release: the module goes with the process."""
