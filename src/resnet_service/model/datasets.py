"""Image files the build steps read: calibration sets, held-out sets, a bundle's own splits.

Torch-free: a set's fingerprint (part of every cache key) is computed on the fast path, where
a served model is found in the cache without importing torch. Decoding goes through the
serving path (``core/images.py``), so calibration sees exactly what serving sees.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt

from resnet_service.core.errors import BundleInvalid, InputError
from resnet_service.core.images import LOCAL_FILE_LIMITS, PreprocessSpec, decode_and_preprocess

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: Final = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
MAX_CALIBRATION_IMAGES: Final = 256
#: Written by fine-tuning: the training and validation files with their class indices.
SPLITS_FILE: Final = "splits.json"


@dataclass(frozen=True, slots=True)
class ImageArrays:
    """Preprocessed images, (N, 3, H, W) float32, with where they came from."""

    array: npt.NDArray[np.float32]
    source: str
    #: Class indices aligned with ``array`` when the images are labelled.
    targets: npt.NDArray[np.int64] | None = None

    def __len__(self) -> int:
        return int(self.array.shape[0])


@dataclass(frozen=True, slots=True)
class ImageFiles:
    """Image files for calibration or evaluation; decoded only when needed (cache misses)."""

    files: tuple[Path, ...]
    source: str
    targets: tuple[int, ...] | None = None

    def fingerprint(self, spec: PreprocessSpec) -> str:
        """Hash of the preprocessing and every file's bytes: the cache key's calibration part."""
        digest = hashlib.sha256(spec.model_dump_json().encode())
        for path in self.files:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()

    def load_arrays(self, spec: PreprocessSpec) -> ImageArrays:
        """Decode through the serving path; unreadable files are skipped with a warning."""
        arrays: list[npt.NDArray[np.float32]] = []
        kept: list[int] = []
        for index, path in enumerate(self.files):
            try:
                arrays.append(decode_and_preprocess(path.read_bytes(), LOCAL_FILE_LIMITS, spec))
                kept.append(index)
            except (InputError, OSError) as exc:
                log.warning("skipped unreadable image %s: %s", path, getattr(exc, "detail", exc))
        if not arrays:
            raise BundleInvalid(f"no readable images in {self.source}")
        targets = (
            np.array([self.targets[i] for i in kept], dtype=np.int64)
            if self.targets is not None
            else None
        )
        return ImageArrays(np.stack(arrays), self.source, targets)


def _builtin(prefix: str, source: str) -> ImageFiles:
    folder = Path(str(resources.files("resnet_service.model") / "calibration"))
    return ImageFiles(tuple(sorted(folder.glob(f"{prefix}_*.jpg"))), source)


def builtin_calibration_files() -> ImageFiles:
    """The packaged calibration photos (scikit-image samples, public domain / CC0)."""
    return _builtin("calib", "builtin:scikit-image-photos")


def builtin_holdout_files() -> ImageFiles:
    """Packaged photos never used for calibration: the fidelity check runs on these."""
    return _builtin("holdout", "builtin:scikit-image-photos-holdout")


def builtin_photos() -> list[Path]:
    """Every packaged photo (calibration and held-out): what ``resnet-service samples`` copies."""
    return sorted(builtin_calibration_files().files + builtin_holdout_files().files)


def image_files(directory: Path) -> list[Path]:
    """Allow-listed image files below ``directory``, in a stable order."""
    return sorted(
        p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def directory_files(directory: Path, limit: int = MAX_CALIBRATION_IMAGES) -> ImageFiles:
    """Allow-listed images below ``directory``, at most ``limit`` spread over the whole folder
    (so every class of an ImageFolder is represented)."""
    files = image_files(directory)
    if not files:
        raise BundleInvalid(f"no images ({', '.join(IMAGE_SUFFIXES)}) below {directory}")
    return ImageFiles(tuple(spread(files, limit)), str(directory))


T = TypeVar("T")


def spread(items: list[T], limit: int) -> list[T]:
    """At most ``limit`` items, evenly spaced over the list (every class of a sorted folder)."""
    if len(items) <= limit:
        return items
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def bundle_splits(directory: Path) -> tuple[ImageFiles | None, ImageFiles | None]:
    """A fine-tuned bundle's own images: calibrate on its training split, measure fidelity
    (and accuracy) on its validation split. None where the files are gone."""
    path = directory / SPLITS_FILE
    if not path.is_file():
        return None, None
    try:
        splits = json.loads(path.read_text())
        train = [(Path(p), int(t)) for p, t in splits["train"] if Path(p).is_file()]
        val = [(Path(p), int(t)) for p, t in splits["val"] if Path(p).is_file()]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None, None
    train = spread(train, MAX_CALIBRATION_IMAGES)
    root = splits.get("root")
    calibration = ImageFiles(tuple(p for p, _ in train), f"{root} (train split)") if train else None
    seen = (
        ", which the served head was refitted on"
        if splits.get("head_fitted_on") == "train+val"
        else ""
    )
    holdout = (
        ImageFiles(
            tuple(p for p, _ in val), f"{root} (validation split{seen})", tuple(t for _, t in val)
        )
        if val
        else None
    )
    return calibration, holdout


def calibration_and_holdout(
    calibration_dir: Path | None, bundle: Path | None
) -> tuple[ImageFiles, ImageFiles]:
    """What int8 is calibrated on and fidelity measured on: a given folder, else a bundle's
    own splits, else the built-in photos."""
    own_calibration, own_holdout = bundle_splits(bundle) if bundle else (None, None)
    if calibration_dir is not None:
        calibration = directory_files(calibration_dir)
    else:
        calibration = own_calibration or builtin_calibration_files()
    return calibration, own_holdout or builtin_holdout_files()
