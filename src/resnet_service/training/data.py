"""ImageFolder datasets decoded through the serving path, with clear errors for bad data."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from resnet_service.core.errors import DatasetError, InputError
from resnet_service.core.images import LOCAL_FILE_LIMITS, PreprocessSpec, decode_rgb
from resnet_service.model.datasets import IMAGE_SUFFIXES, image_files


@dataclass(frozen=True, slots=True)
class Sample:
    path: Path
    target: int


@dataclass
class Dataset:
    """Decoded RGB images (shorter side already reduced) with their class indices."""

    root: Path
    classes: list[str]
    samples: list[Sample]
    images: list[Image.Image]
    skipped: list[str] = field(default_factory=list)
    fingerprint: str = ""

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(self.classes, 0)
        for sample in self.samples:
            out[self.classes[sample.target]] += 1
        return out

    def subset(self, indices: list[int]) -> Dataset:
        return Dataset(
            root=self.root,
            classes=self.classes,
            samples=[self.samples[i] for i in indices],
            images=[self.images[i] for i in indices],
            fingerprint=self.fingerprint,
        )

    def targets(self) -> list[int]:
        return [s.target for s in self.samples]


def scan_image_folder(
    root: Path, classes: list[str] | None = None
) -> tuple[list[str], list[Sample]]:
    """One sub-folder per class (sorted names), allow-listed image files inside each."""
    if not root.exists():
        raise DatasetError(f"{root} does not exist. Give a folder with one sub-folder per class.")
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder. Give a folder with one sub-folder per class.")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DatasetError(
            f"{root} has no class sub-folders. Put each class's images in its own sub-folder, "
            f"e.g. {root}/cat/1.jpg and {root}/dog/2.jpg."
        )
    if classes is None:
        if len(found) < 2:
            raise DatasetError(
                f"{root} has only one class ({found[0]}); a classifier needs at least two."
            )
        classes = found
    elif set(found) - set(classes):
        raise DatasetError(
            f"{root} has classes the training data lacks: {sorted(set(found) - set(classes))}"
        )
    samples: list[Sample] = []
    empty: list[str] = []
    for target, name in enumerate(classes):
        folder = root / name
        files = image_files(folder) if folder.is_dir() else []
        if not files:
            empty.append(name)
        samples.extend(Sample(path, target) for path in files)
    if empty:
        raise DatasetError(
            f"these classes have no images ({', '.join(IMAGE_SUFFIXES)}): {', '.join(empty)}"
        )
    return classes, samples


def _reduced(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Keep memory small: big photos are shrunk to twice the resize size (still > 256)."""
    limit = 2 * spec.resize_size
    if min(img.size) > limit:
        img = img.copy()
        img.thumbnail((limit * img.width // min(img.size), limit * img.height // min(img.size)))
    return img


def load_image_folder(
    root: Path, spec: PreprocessSpec, classes: list[str] | None = None
) -> Dataset:
    """Scan and decode; unreadable files are skipped and listed (fatal when a class is left
    with nothing)."""
    classes, samples = scan_image_folder(root, classes)
    kept: list[Sample] = []
    images: list[Image.Image] = []
    skipped: list[str] = []
    digest = hashlib.sha256()
    for sample in samples:
        data = sample.path.read_bytes()
        try:
            rgb = decode_rgb(data, LOCAL_FILE_LIMITS, spec)
        except InputError as exc:
            skipped.append(f"{sample.path}: {exc.detail}")
            continue
        kept.append(sample)
        images.append(_reduced(rgb, spec))
        digest.update(f"{classes[sample.target]}/{sample.path.relative_to(root)}:".encode())
        digest.update(hashlib.sha256(data).digest())
    dataset = Dataset(root, classes, kept, images, skipped, digest.hexdigest())
    left = dataset.counts()
    if not kept:
        raise DatasetError(f"no readable images in {root}; skipped:\n  " + "\n  ".join(skipped))
    if empty := [name for name, count in left.items() if count == 0]:
        raise DatasetError(
            f"no readable images left for classes {', '.join(empty)}; skipped:\n  "
            + "\n  ".join(skipped)
        )
    return dataset


def stratified_split(dataset: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Per class, hold out ``val_fraction`` (at least one image when the class has two)."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for index, sample in enumerate(dataset.samples):
        by_class.setdefault(sample.target, []).append(index)
    train: list[int] = []
    val: list[int] = []
    for target in sorted(by_class):
        indices = by_class[target]
        rng.shuffle(indices)
        n_val = round(len(indices) * val_fraction)
        n_val = min(max(n_val, 1 if len(indices) >= 2 else 0), len(indices) - 1)
        val.extend(indices[:n_val])
        train.extend(indices[n_val:])
    if not val:
        raise DatasetError("too few images for a validation split; add images or give --val-dir")
    return dataset.subset(sorted(train)), dataset.subset(sorted(val))
