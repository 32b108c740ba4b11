"""The seam the engine runs behind (the runtimes implement it), and the model it serves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from resnet_service.config import Precision, RuntimeName
from resnet_service.core.images import Pixels, PreprocessSpec
from resnet_service.core.model_info import ModelInfo

FloatBatch = npt.NDArray[np.float32]


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

    def close(self) -> None: ...


class PixelRuntime(Runtime, Protocol):
    """A runtime that also takes 8-bit N x H x W x 3 images, normalising them in its graph."""

    @property
    def takes_pixels(self) -> bool: ...

    def infer_pixels(self, batch: Pixels) -> FloatBatch: ...


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
