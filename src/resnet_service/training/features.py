"""The frozen part of ResNet18, run once: cached activations for every training view.

Fine-tuning trains only the end of the network (the head, or ``layer4`` and the head). The
part in front of it never changes, so its outputs are computed once per image view and kept:
every later step (fitting the head to convergence, choosing its regularisation, training the
last block for many epochs) reads the cache instead of re-running the network. With
augmentation the cache holds a fixed number of random views per image, drawn once, which is
what makes augmented training affordable on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from resnet_service.core.images import PreprocessSpec, normalise, preprocess
from resnet_service.training.options import Augment

#: Images per forward pass when filling the cache: bounded memory at 224x224.
BATCH = 64


@dataclass(frozen=True)
class Trunk:
    """ResNet18 cut in three: ``stem`` (conv1 .. layer3), ``block`` (layer4), ``pool``
    (average pool + flatten). They share modules with the network they came from."""

    stem: nn.Module
    block: nn.Module
    pool: nn.Module

    def features(self, cached_stem: torch.Tensor) -> torch.Tensor:
        """Penultimate (512-d) features from stem activations, without gradients."""
        with torch.no_grad():
            return torch.cat([self.pool(self.block(x)) for x in torch.split(cached_stem, BATCH)])


def split_trunk(model: nn.Module) -> Trunk:
    """The three parts of a torchvision ResNet (their modules, not copies)."""
    m: Any = model
    stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3)
    return Trunk(stem=stem, block=m.layer4, pool=nn.Sequential(m.avgpool, nn.Flatten(1)))


@dataclass
class ViewCache:
    """Stem activations of each image's views: ``views[k][i]`` is view ``k`` of image ``i``.
    View 0 is always the serving preprocessing (what validation and the served model see);
    views 1.. are augmented."""

    views: list[torch.Tensor]
    targets: torch.Tensor

    @property
    def num_images(self) -> int:
        return len(self.targets)


def augmenter(spec: PreprocessSpec, augment: Augment) -> Callable[[Image.Image], np.ndarray]:
    """One random training view: a crop of 50-100% of the area (and a mirror with
    ``crop-flip``), at the model's input size and normalisation."""
    steps: list[Any] = [
        transforms.RandomResizedCrop(spec.crop_size, scale=(0.5, 1.0), antialias=True)
    ]
    if augment == "crop-flip":
        steps.append(transforms.RandomHorizontalFlip())
    pipeline = transforms.Compose(steps)
    return lambda img: normalise(pipeline(img), spec)


def _batches(images: Sequence[Image.Image]) -> Iterator[Sequence[Image.Image]]:
    for start in range(0, len(images), BATCH):
        yield images[start : start + BATCH]


def run_batched(
    module: nn.Module, images: Sequence[Image.Image], view: Callable[[Image.Image], np.ndarray]
) -> torch.Tensor:
    """Preprocess batch by batch and run a frozen module (eval mode, no gradients): the images
    never all sit in memory as float tensors at once, only the module's outputs do."""
    module.eval()
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for batch in _batches(images):
            out.append(module(torch.from_numpy(np.stack([view(img) for img in batch]))))
    return torch.cat(out)


def cache_views(
    stem: nn.Module,
    images: Sequence[Image.Image],
    targets: Sequence[int],
    spec: PreprocessSpec,
    augment: Augment = "none",
    augmented_views: int = 0,
    seed: int = 0,
) -> ViewCache:
    """The serving view, plus ``augmented_views`` random views when ``augment`` asks."""
    cache = ViewCache(
        [run_batched(stem, images, lambda img: preprocess(img, spec))], torch.tensor(list(targets))
    )
    add_views(cache, stem, images, spec, augment, augmented_views, seed)
    return cache


def add_views(
    cache: ViewCache,
    stem: nn.Module,
    images: Sequence[Image.Image],
    spec: PreprocessSpec,
    augment: Augment,
    augmented_views: int,
    seed: int = 0,
) -> None:
    """Append ``augmented_views`` random views of every image (none when ``augment`` is
    "none"); drawn from a seeded generator, so a run is repeatable."""
    if augment == "none" or augmented_views <= 0:
        return
    torch.manual_seed(seed)  # torchvision's random transforms draw from torch's generator
    view = augmenter(spec, augment)
    cache.views.extend(run_batched(stem, images, view) for _ in range(augmented_views))


def recalibrate_bn(model: nn.Module, images: Sequence[Image.Image], spec: PreprocessSpec) -> None:
    """Re-estimate every BatchNorm's running statistics on ``images`` (an exact average over
    all of them, not a moving one), so activations are normalised for *these* images rather
    than for the trunk's training domain. Leaves the model in eval mode."""
    saved: dict[nn.BatchNorm2d, float | None] = {}
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            saved[module] = module.momentum
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for batch in _batches(images):
            model(torch.from_numpy(np.stack([preprocess(img, spec) for img in batch])))
    for module, momentum in saved.items():
        module.momentum = momentum
    model.eval()
