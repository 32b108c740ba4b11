"""Does the default recipe learn? Three small image tasks, default options, served over HTTP.

Each task is an ImageFolder made here (no download): scikit-learn's digits (in
``test_finetune.py``, with the bundle and API checks), stripes at three orientations with
random colours, periods and phases (generated), and crops of three scikit-image texture photos
(training crops from the top three quarters of each photo, test crops from the bottom quarter,
so no test pixel was seen in training). On each, with ``finetune``'s default options (only the
image size is reduced, to keep the test short):

- validation accuracy >= the scikit-learn logistic-regression probe on the same frozen
  features and the same split, where the probe is recomputed *here*, independently of the
  product, from the bundle's ``splits.json`` and the base weights (and must agree with the
  figure in ``report.json``);
- the int8 model served over HTTP is within 3 points of the fp32 bundle on held-out images.

The trunk is *seeded random* ResNet18 weights (no ImageNet weights offline); random features
are much weaker than ImageNet ones, so the absolute accuracies are modest. Run with ``-s`` to
print each task's figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from tests.process.test_finetune import TaskFigures, evaluate_bundle, run_default_finetune, show

IMAGE_SIDE = 80
TRAIN_PER_CLASS = 60
TEST_PER_CLASS = 40


@dataclass(frozen=True)
class Task:
    name: str
    classes: tuple[str, ...]


def _save(root: Path, split: str, label: str, index: int, pixels: np.ndarray) -> None:
    folder = root / split / label
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(folder / f"{index}.png")


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random hue on a dark/light pair with enough contrast to see the pattern."""
    dark, light = rng.uniform(0, 90), rng.uniform(165, 255)
    fg, bg = dark + (light - dark) * rng.uniform(0, 1, 3), np.full(3, light)
    return (bg, fg) if rng.random() < 0.5 else (fg, bg)


ORIENTATIONS = {"diagonal": np.pi / 4, "horizontal": np.pi / 2, "vertical": 0.0}


def stripes(orientation: str, rng: np.random.Generator) -> np.ndarray:
    """A noisy square-wave grating; ``diagonal`` is either diagonal, others within 9 deg."""
    theta = ORIENTATIONS[orientation] + rng.uniform(-0.15, 0.15)
    if orientation == "diagonal" and rng.random() < 0.5:
        theta += np.pi / 2
    period = rng.uniform(6, 16)
    yy, xx = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE].astype(np.float64)
    along = xx * np.cos(theta) + yy * np.sin(theta)
    mask = np.sin(2 * np.pi * (along + rng.uniform(0, period)) / period) > 0
    fg, bg = _colours(rng)
    img = np.where(mask[..., None], fg, bg) + rng.normal(0, 10, (IMAGE_SIDE, IMAGE_SIDE, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_stripes(root: Path, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    for label in sorted(ORIENTATIONS):
        for i in range(TRAIN_PER_CLASS + TEST_PER_CLASS):
            split = "train" if i < TRAIN_PER_CLASS else "test"
            _save(root, split, label, i, stripes(label, rng))
    return root / "train", root / "test"


PHOTOS = ("brick", "grass", "gravel")


def write_photo_crops(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Square crops (48-112 px, a random quarter turn, brightness/contrast jitter) of three
    scikit-image texture photos; train and test come from disjoint bands of each photo."""
    rng = np.random.default_rng(seed)
    for label in PHOTOS:
        photo = getattr(skimage.data, label)()
        height, width = photo.shape[:2]
        cut = height * 3 // 4
        for i in range(TRAIN_PER_CLASS + TEST_PER_CLASS):
            split = "train" if i < TRAIN_PER_CLASS else "test"
            side = int(rng.integers(48, 112))
            low, high = (0, cut - side) if split == "train" else (cut, height - side)
            y, x = int(rng.integers(low, high + 1)), int(rng.integers(0, width - side + 1))
            crop = np.rot90(photo[y : y + side, x : x + side], int(rng.integers(4)))
            crop = crop.astype(np.float64) * rng.uniform(0.7, 1.3) + rng.uniform(-30, 30)
            small = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize(
                (IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BILINEAR
            )
            _save(root, split, label, i, np.asarray(small.convert("RGB")))
    return root / "train", root / "test"


WRITERS = {"stripes": write_stripes, "photo-crops": write_photo_crops}


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~35 s alone; several times that on cores another job is using
@pytest.mark.parametrize("task", sorted(WRITERS))
def test_default_recipe_beats_the_probe_and_serves_int8(
    task: str, weights_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train_dir, test_dir = WRITERS[task](tmp_path / task)
    summary = run_default_finetune(train_dir, tmp_path / "bundle", tmp_path, weights_file, capsys)
    figures: TaskFigures = evaluate_bundle(
        task, summary, tmp_path / "bundle", test_dir, tmp_path, weights_file, capsys
    )
    show(figures, capsys)
    assert figures.val_accuracy >= figures.probe_val_accuracy
    assert abs(figures.int8_http_test_accuracy - figures.fp32_test_accuracy) <= 0.03
    assert figures.fp32_test_accuracy > 1.5 / 3  # chance is 1/3: the model has learned
