"""What the core answers: one image's Top-k, its timings and, when asked, its embedding and
class activation map; and the Top-k rule every face shares (ties in class-index order)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from resnet_service.core.engine import Probabilities
from resnet_service.core.feature_outputs import CropBox
from resnet_service.core.runtime import FloatBatch
from resnet_service.core.tag_rules import Tag


@dataclass(frozen=True, slots=True)
class Timings:
    """Where one request's time went, in seconds."""

    decode_s: float
    queue_s: float
    inference_s: float
    total_s: float


@dataclass(frozen=True, slots=True)
class Prediction:
    """Top-k of one input, best first."""

    indices: list[int]
    scores: list[float]
    labels: list[str]
    batch_size: int


@dataclass(frozen=True, slots=True)
class Classification:
    """One image's Top-k with its timings (and every class's probability, for protocols that
    return them)."""

    prediction: Prediction
    timings: Timings
    probabilities: Probabilities
    #: Answered from the response cache (no decode, no forward).
    cached: bool = False
    #: Set when asked for: the pooled features and the last stage's map (``core.feature_outputs``).
    embedding: FloatBatch | None = None
    feature_map: FloatBatch | None = None
    #: The upright (width, height) of the image as sent (None for a preprocessed array).
    size: tuple[int, int] | None = None
    #: The tags its model's rules give it, best first (``core.tag_rules``).
    tags: tuple[Tag, ...] = ()


@dataclass(frozen=True, slots=True)
class Explanation:
    """One image's Top-k and the class activation map of ``target`` (``core.feature_outputs``)."""

    classification: Classification
    target: int
    #: h x w: each cell's contribution to the target's logit.
    grid: FloatBatch
    #: The map over the model's crop, as a PNG (with alpha) of ``side`` x ``side`` pixels.
    heatmap_png: bytes
    side: int
    #: Where that crop lies in the image as sent (None for a preprocessed array).
    crop_box: CropBox | None


def top_k(probabilities: Probabilities, k: int) -> tuple[list[int], list[float]]:
    """The ``k`` most probable classes, best first; exact ties (frequent with int8 logits) in
    class-index order, so every face and every run gives the same answer. A stable sort of
    1000 scores costs ~20 µs, nothing next to decoding."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return order.tolist(), probabilities[order].astype(float).tolist()
