"""Which model to serve, decided without torch: where its weights are, their sha256, its
preprocessing and provenance.

This is what keys every cached artifact, so a serving process (or the supervisor's preflight)
can find an artifact it only has to load, with no torch import. Building one needs torch:
that happens only on a cache miss (``build.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from resnet_service.config import Precision, Settings
from resnet_service.core.errors import BundleInvalid, WeightsUnavailable
from resnet_service.core.images import PreprocessSpec
from resnet_service.model.hub import (
    FP32_URL,
    how_to_provide_weights,
    hub_checkpoint_path,
    published_hash_prefix,
    random_weights_sha256,
    sha256_file,
)
from resnet_service.model.manifest import WEIGHTS, WeightsSource, read_manifest

IMAGENET_NAME: Final = "resnet18-imagenet1k"
#: ImageNet-1K top-1 of torchvision's ResNet18_Weights.IMAGENET1K_V1 (its published metric).
IMAGENET_ACC1: Final = 69.758


@dataclass(frozen=True, slots=True)
class ModelSource:
    """The weights a served model comes from, identified without loading them."""

    name: str
    architecture: str
    num_classes: int
    weights_sha256: str
    weights_source: WeightsSource
    weights_path: Path | None
    precision: Precision
    spec: PreprocessSpec = field(default_factory=PreprocessSpec)
    random_weights: bool = False
    matches_published_hash: bool | None = None
    bundle: Path | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


class DownloadNeeded(Exception):
    """No weights on disk but a download is allowed: the (torch) build step fetches them."""


def _imagenet(path: Path, source: WeightsSource, url: str | None) -> ModelSource:
    digest = sha256_file(path)
    prefix = published_hash_prefix(url) if url else None
    return ModelSource(
        name=IMAGENET_NAME,
        architecture="resnet18",
        num_classes=1000,
        weights_sha256=digest,
        weights_source=source,
        weights_path=path,
        precision="fp32",
        matches_published_hash=digest.startswith(prefix) if prefix else None,
        provenance={
            "source": "torchvision ResNet18_Weights.IMAGENET1K_V1",
            "acc@1": IMAGENET_ACC1,
            "weights_source": source.value,
        },
    )


def _random() -> ModelSource:
    return ModelSource(
        name=IMAGENET_NAME,
        architecture="resnet18",
        num_classes=1000,
        weights_sha256=random_weights_sha256(),
        weights_source=WeightsSource.RANDOM,
        weights_path=None,
        precision="fp32",
        random_weights=True,
        provenance={
            "source": "seeded random weights (development only)",
            "weights_source": "random",
        },
    )


def _bundle(directory: Path) -> ModelSource:
    manifest = read_manifest(directory)
    if not (directory / WEIGHTS).is_file():
        raise BundleInvalid(f"{directory / WEIGHTS} is missing")
    return ModelSource(
        name=manifest.name,
        architecture=manifest.architecture,
        num_classes=manifest.num_classes,
        weights_sha256=manifest.weights_sha256,
        weights_source=WeightsSource.BUNDLE,
        weights_path=directory / WEIGHTS,
        precision=manifest.precision,
        spec=manifest.preprocessing,
        random_weights=manifest.random_weights,
        bundle=directory,
        provenance=manifest.provenance,
    )


def resolve_source(settings: Settings) -> ModelSource:
    """The model ``settings`` ask for, in the documented order: a bundle; else ImageNet
    weights from an explicit path, the torch hub cache, a download, or (development only)
    seeded random weights. ``DownloadNeeded`` when only a download can provide them."""
    if settings.bundle_path is not None:
        return _bundle(settings.bundle_path)
    if settings.weights_path is not None:
        return _imagenet(settings.weights_path, WeightsSource.EXPLICIT_PATH, None)
    cached = hub_checkpoint_path(FP32_URL)
    if cached.is_file():
        return _imagenet(cached, WeightsSource.HUB_CACHE, FP32_URL)
    if settings.allow_downloads:
        raise DownloadNeeded(FP32_URL)
    if settings.allow_random_weights:
        return _random()
    raise WeightsUnavailable(how_to_provide_weights(downloads_allowed=False))
