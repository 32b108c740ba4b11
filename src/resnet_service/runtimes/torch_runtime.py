"""PyTorch eager runtime: the int8 (x86 engine, static PTQ) or fp32 module, on the engine thread.

``forward`` runs torchvision's ResNet stage by stage (the same modules its ``forward`` calls,
in the same order) so the pooled features and the last stage's map come out of the very pass
that gives the logits; int8 tensors are dequantized only when they are asked for.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import torch
from torch import nn

from resnet_service.config import Precision, RuntimeName
from resnet_service.core.runtime import (
    ALL_OUTPUTS,
    LOGITS_ONLY,
    FloatBatch,
    Forward,
    Head,
    Output,
    Wants,
)


def _float(tensor: torch.Tensor) -> FloatBatch:
    plain = tensor.dequantize() if tensor.is_quantized else tensor
    out: FloatBatch = plain.float().numpy()
    return out


def resnet_outputs(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(logits, pooled features, last stage's map) of a torchvision ResNet, fp32 or int8
    (its quant stub in front; outputs may be quantized tensors)."""
    m: Any = module  # torchvision's ResNet (attributes typed as Tensor | Module)
    quant = getattr(m, "quant", None)
    if quant is not None:
        x = quant(x)
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    feature_map = m.layer4(m.layer3(m.layer2(m.layer1(x))))
    embedding = torch.flatten(m.avgpool(feature_map), 1)
    logits = m.fc(embedding)
    dequant = getattr(m, "dequant", None)
    return (dequant(logits) if dequant is not None else logits), embedding, feature_map


def head_of(module: nn.Module) -> Head:
    """The classifier's fp32 weights (dequantized from an int8 ``Linear``)."""
    fc: Any = module.fc  # nn.Linear, or a quantized Linear whose weight() is a method
    weight = fc.weight() if callable(fc.weight) else fc.weight
    bias = fc.bias() if callable(fc.bias) else fc.bias
    return Head(
        weight=np.ascontiguousarray(_float(weight.detach())),
        bias=np.ascontiguousarray(_float(bias.detach())),
    )


class TorchRuntime:
    """An ``nn.Module`` in eval mode run under ``inference_mode`` with a fixed thread count."""

    name: Final[RuntimeName] = "torch"

    def __init__(self, module: nn.Module, precision: Precision, threads: int) -> None:
        self.module = module.eval()
        self.precision: Precision = precision
        self.threads = threads
        # A torchvision ResNet yields every output; any other module, its logits.
        is_resnet = all(hasattr(module, part) for part in ("layer4", "avgpool", "fc"))
        self.outputs: Wants = ALL_OUTPUTS if is_resnet else LOGITS_ONLY

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

    def forward(self, batch: FloatBatch, wants: Wants) -> Forward:
        if wants <= LOGITS_ONLY:
            return Forward(self.infer(batch))
        with torch.inference_mode():
            logits, embedding, feature_map = resnet_outputs(
                self.module, torch.from_numpy(np.ascontiguousarray(batch))
            )
            return Forward(
                logits=_float(logits),
                embedding=_float(embedding) if Output.EMBEDDING in wants else None,
                feature_map=_float(feature_map) if Output.FEATURE_MAP in wants else None,
            )

    def close(self) -> None:
        """Nothing to release: the module goes with the process."""
