"""The options of ``resnet-service finetune``, with their defaults, written once: the CLI's
flags take their defaults and choices from here (no torch is imported to parse them)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

TrainPart = Literal["auto", "head", "layer4", "all"]
BnChoice = Literal["auto", "yes", "no"]
#: Extra random training views: none, crops, or crops and mirrors.
Augment = Literal["none", "crop", "crop-flip"]
TRAIN_PARTS: tuple[str, ...] = get_args(TrainPart)
BN_CHOICES: tuple[str, ...] = get_args(BnChoice)
AUGMENTS: tuple[str, ...] = get_args(Augment)


@dataclass
class FinetuneConfig:
    """Options of ``resnet-service finetune`` (lengths in optimiser steps)."""

    data_dir: Path
    out_dir: Path
    val_dir: Path | None = None
    val_fraction: float = 0.2
    train: TrainPart = "auto"
    recalibrate_bn: BnChoice = "auto"
    augment: Augment = "crop"
    augmented_views: int = 4
    image_size: int = 224
    epochs: int = 6
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 1e-4
    min_steps: int = 100
    patience: int = 100
    eval_every: int = 10
    time_budget: float = 600.0
    seed: int = 0
    name: str | None = None
    progress: bool = True


def defaults() -> dict[str, Any]:
    """Each option's default, by field name (the CLI's flags use these)."""
    return {f.name: f.default for f in fields(FinetuneConfig)}
