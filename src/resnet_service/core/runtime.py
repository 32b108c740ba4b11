"""The seam the engine runs behind (the runtimes implement it), and the model it serves."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

from resnet_service.config import Precision, RuntimeName
from resnet_service.core.images import Pixels, PreprocessSpec
from resnet_service.core.model_info import ModelInfo

FloatBatch = npt.NDArray[np.float32]


class Output(StrEnum):
    """What one forward of the served graph can yield (``/classify`` needs only the logits)."""

    LOGITS = "logits"
    #: The pooled features before the classifier: N x D (512 for ResNet18).
    EMBEDDING = "embedding"
    #: The last stage's activations before pooling: N x D x h x w (7 x 7 at 224 pixels).
    FEATURE_MAP = "feature_map"


Wants = frozenset[Output]
LOGITS_ONLY: Final[Wants] = frozenset({Output.LOGITS})
#: What a graph built by this version yields (older artifacts yield the logits only).
ALL_OUTPUTS: Final[Wants] = frozenset(Output)


@dataclass(frozen=True, slots=True)
class Forward:
    """The outputs of one forward over a batch; only those asked for are set. They may be
    views of the runtime's own buffers, valid until its next forward: copy what you keep."""

    logits: FloatBatch
    embedding: FloatBatch | None = None
    feature_map: FloatBatch | None = None


@dataclass(frozen=True, slots=True)
class Head:
    """The classifier layer after global average pooling (fp32): the class activation map of
    class ``c`` is ``weight[c] . feature_map / (h * w)``, its cells summing to the logit minus
    ``bias[c]`` (for a GAP + linear head this is exactly Grad-CAM at the last stage)."""

    weight: FloatBatch  # classes x D
    bias: FloatBatch  # classes

    @property
    def embedding_size(self) -> int:
        return int(self.weight.shape[1])


class Runtime(Protocol):
    """A loaded network: ``infer`` maps an (N, 3, H, W) float32 batch to (N, classes) logits.

    ``infer`` is called from one thread only (the engine's), after ``bind_thread`` ran there.
    """

    @property
    def name(self) -> RuntimeName: ...

    @property
    def precision(self) -> Precision: ...

    @property
    def threads(self) -> int: ...

    def bind_thread(self) -> None:
        """Per-thread set-up on the engine thread (torch's intra-op thread count is per thread)."""

    def infer(self, batch: FloatBatch) -> FloatBatch: ...

    @property
    def outputs(self) -> Wants:
        """What ``forward`` can yield (``LOGITS_ONLY`` for a graph built before there were
        more outputs)."""

    def forward(self, batch: FloatBatch, wants: Wants) -> Forward:
        """``infer`` with the extra outputs ``wants`` names (a subset of ``outputs``)."""

    def close(self) -> None: ...


class PixelRuntime(Runtime, Protocol):
    """A runtime that also takes 8-bit N x H x W x 3 images, normalising them in its graph."""

    @property
    def takes_pixels(self) -> bool: ...

    def infer_pixels(self, batch: Pixels) -> FloatBatch: ...

    def forward_pixels(self, batch: Pixels, wants: Wants) -> Forward: ...


def pixel_input(runtime: Runtime) -> PixelRuntime | None:
    """The runtime as a ``PixelRuntime`` when it was opened to take 8-bit images, else None."""
    if getattr(runtime, "takes_pixels", False):
        return runtime  # type: ignore[return-value]
    return None


@dataclass(frozen=True, slots=True)
class ServedModel:
    """A runtime with the labels, preprocessing and provenance of the model it runs."""

    runtime: Runtime
    labels: list[str]
    spec: PreprocessSpec
    info: ModelInfo
    #: The classifier's weights, for class activation maps (None: the model has none to give).
    head: Head | None = None
