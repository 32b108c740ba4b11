"""Image-classification tasks made on the spot (no download): the fine-tuning suite's data.

Each writer makes an ImageFolder ``root/train/<class>/*.png`` (what ``finetune`` is given)
and ``root/test/<class>/*.png`` (held out: no choice of the recipe ever sees it), from a seed,
so every run of a task is the same images. The kinds are those a user brings and a recipe
must not lose on:

- ``shapes``: a disc, square or triangle of random size, colour, place and rotation on a
  random background (the task the old default lost to the probe on);
- ``ellipses``: fine-grained variations of one object (an ellipse whose axes are in ratio
  1, 1.7 or 2.8, at any angle, size, place and colour);
- ``digits-10``: scikit-learn's handwritten digits with only 10 training images per class;
- ``textures-5to1``: crops of three scikit-image texture photos, classes 5:1:1 in training
  (balanced test), train and test crops from disjoint bands of each photo;
- ``grey-marks``: single-channel (mode ``L``) PNGs of a ring, a disc or a cross;
- ``stripes`` and ``photo-crops``: the two earlier quality tasks (gratings at three
  orientations; balanced texture crops).

``UNTUNED`` holds tasks no choice of the recipe was tuned on (issue 34), kept out of ``make
test``: ``stray-lines`` (a filled disc, square or triangle of random size, place and colour
among 2-4 stray lines, 40 + 20 images a class), ``stray-lines-few`` (the same, 10 training
images a class), ``stars`` (other shapes: pentagon, hexagon, five-pointed star), ``colours``
(the class is the fill's colour family, the shape is random) and ``sizes`` (the class is the
size band).

Images are small (``side`` pixels) because the suite fine-tunes at 64 px to stay short.

``python -m resnet_bench.tasks shapes DIR [--seed N]`` writes one to try ``finetune`` with (the
README's recipe for your own classes).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIDE = 80


@dataclass(frozen=True)
class TaskData:
    """Where a written task lies."""

    train: Path
    test: Path


def _save(root: Path, split: str, label: str, index: int, image: Image.Image) -> None:
    folder = root / split / label
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / f"{index}.png")


def _write(
    root: Path,
    counts: dict[str, tuple[int, int]],
    draw: Callable[[str, str, np.random.Generator], Image.Image],
    seed: int,
) -> TaskData:
    """``counts[label] = (train, test)`` images of each class, drawn by ``draw``."""
    rng = np.random.default_rng(seed)
    for label, (train, test) in counts.items():
        for i in range(train + test):
            split = "train" if i < train else "test"
            _save(root, split, label, i, draw(label, split, rng))
    return TaskData(root / "train", root / "test")


def _noisy(image: Image.Image, rng: np.random.Generator, sigma: float = 8.0) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float64)
    noisy = np.clip(pixels + rng.normal(0, sigma, pixels.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy, mode=image.mode)


def _contrasting(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A foreground and background colour at least 80 grey levels apart in luminance."""
    while True:
        fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        weights = np.array([0.299, 0.587, 0.114])
        if abs(float(fg @ weights - bg @ weights)) >= 80:
            return tuple(int(v) for v in fg), tuple(int(v) for v in bg)


def _polygon(
    sides: int, centre: tuple[float, float], radius: float, turn: float
) -> list[tuple[float, float]]:
    angles = turn + 2 * np.pi * np.arange(sides) / sides
    return [(centre[0] + radius * np.cos(a), centre[1] + radius * np.sin(a)) for a in angles]


def _placed(rng: np.random.Generator, low: float, high: float) -> tuple[tuple[float, float], float]:
    """A random radius in [low, high] of the side and a centre that keeps the shape inside."""
    radius = rng.uniform(low, high) * SIDE
    centre = (rng.uniform(radius, SIDE - radius), rng.uniform(radius, SIDE - radius))
    return centre, radius


def draw_shape(label: str, _split: str, rng: np.random.Generator) -> Image.Image:
    fg, bg = _contrasting(rng)
    image = Image.new("RGB", (SIDE, SIDE), bg)
    pen = ImageDraw.Draw(image)
    (cx, cy), r = _placed(rng, 0.12, 0.4)
    turn = rng.uniform(0, 2 * np.pi)
    if label == "disc":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    else:
        pen.polygon(_polygon(4 if label == "square" else 3, (cx, cy), r, turn), fill=fg)
    return _noisy(image, rng)


ASPECTS = {"round": 1.0, "oval": 1.7, "long": 2.8}


def draw_ellipse(label: str, _split: str, rng: np.random.Generator) -> Image.Image:
    fg, bg = _contrasting(rng)
    big = 4 * SIDE  # drawn large and rotated, then reduced: smooth edges at any angle
    image = Image.new("RGB", (big, big), bg)
    major = rng.uniform(0.25, 0.45) * big
    minor = major / ASPECTS[label]
    ImageDraw.Draw(image).ellipse(
        (big / 2 - major, big / 2 - minor, big / 2 + major, big / 2 + minor), fill=fg
    )
    image = image.rotate(rng.uniform(0, 180), fillcolor=bg)
    room = int(big / 2 - major)
    shift = (int(rng.integers(-room, room + 1)), int(rng.integers(-room, room + 1)))
    image = image.rotate(0, translate=shift, fillcolor=bg)
    return _noisy(image.resize((SIDE, SIDE), Image.Resampling.BILINEAR), rng)


def draw_grey_mark(label: str, _split: str, rng: np.random.Generator) -> Image.Image:
    ink, paper = (int(v) for v in rng.permutation([rng.integers(0, 90), rng.integers(165, 256)]))
    image = Image.new("L", (SIDE, SIDE), paper)
    pen = ImageDraw.Draw(image)
    (cx, cy), r = _placed(rng, 0.18, 0.42)
    width = max(2, round(r * rng.uniform(0.2, 0.35)))
    if label == "disc":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=ink)
    elif label == "ring":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), outline=ink, width=width)
    else:
        pen.line((cx - r, cy, cx + r, cy), fill=ink, width=width)
        pen.line((cx, cy - r, cx, cy + r), fill=ink, width=width)
    return _noisy(image.rotate(rng.uniform(0, 90), fillcolor=paper), rng)


ORIENTATIONS = {"diagonal": np.pi / 4, "horizontal": np.pi / 2, "vertical": 0.0}


def draw_stripes(label: str, _split: str, rng: np.random.Generator) -> Image.Image:
    """A noisy square-wave grating; ``diagonal`` is either diagonal, others within 9 deg."""
    theta = ORIENTATIONS[label] + rng.uniform(-0.15, 0.15)
    if label == "diagonal" and rng.random() < 0.5:
        theta += np.pi / 2
    period = rng.uniform(6, 16)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float64)
    along = xx * np.cos(theta) + yy * np.sin(theta)
    mask = np.sin(2 * np.pi * (along + rng.uniform(0, period)) / period) > 0
    dark, light = rng.uniform(0, 90), rng.uniform(165, 255)
    fg, bg = dark + (light - dark) * rng.uniform(0, 1, 3), np.full(3, light)
    if rng.random() < 0.5:
        fg, bg = bg, fg
    pixels = np.where(mask[..., None], fg, bg) + rng.normal(0, 10, (SIDE, SIDE, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


PHOTOS = ("brick", "grass", "gravel")


def draw_photo_crop(label: str, split: str, rng: np.random.Generator) -> Image.Image:
    """A square crop (48-112 px, a random quarter turn, brightness/contrast jitter) of a
    scikit-image texture photo: training crops from its top three quarters, test crops from
    the bottom quarter, so no test pixel was seen in training."""
    import skimage.data

    photo = getattr(skimage.data, label)()
    height, width = photo.shape[:2]
    cut = height * 3 // 4
    side = int(rng.integers(48, 112))
    low, high = (0, cut - side) if split == "train" else (cut, height - side)
    y, x = int(rng.integers(low, high + 1)), int(rng.integers(0, width - side + 1))
    crop = np.rot90(photo[y : y + side, x : x + side], int(rng.integers(4)))
    crop = crop.astype(np.float64) * rng.uniform(0.7, 1.3) + rng.uniform(-30, 30)
    small = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize(
        (SIDE, SIDE), Image.Resampling.BILINEAR
    )
    return small.convert("RGB")


def write_digits(root: Path, seed: int, per_class_train: int, per_class_test: int) -> TaskData:
    """scikit-learn's 8x8 handwritten digits as 32x32 grey PNGs, a seeded choice of images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))
    seen: dict[int, int] = {}
    for i in order:
        target = int(digits.target[i])
        n = seen.get(target, 0)
        seen[target] = n + 1
        if n >= per_class_train + per_class_test:
            continue
        pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
        image = Image.fromarray(pixels).resize((32, 32), Image.Resampling.BILINEAR)
        _save(root, "train" if n < per_class_train else "test", str(target), int(i), image)
    return TaskData(root / "train", root / "test")


def _balanced(labels: tuple[str, ...], train: int, test: int) -> dict[str, tuple[int, int]]:
    return dict.fromkeys(labels, (train, test))


WRITERS: dict[str, Callable[[Path, int], TaskData]] = {
    "shapes": lambda root, seed: _write(
        root, _balanced(("disc", "square", "triangle"), 60, 40), draw_shape, seed
    ),
    "ellipses": lambda root, seed: _write(
        root, _balanced(tuple(sorted(ASPECTS)), 60, 40), draw_ellipse, seed
    ),
    "digits-10": lambda root, seed: write_digits(root, seed, 10, 30),
    "textures-5to1": lambda root, seed: _write(
        root,
        {"brick": (100, 40), "grass": (20, 40), "gravel": (20, 40)},
        draw_photo_crop,
        seed,
    ),
    "grey-marks": lambda root, seed: _write(
        root, _balanced(("cross", "disc", "ring"), 60, 40), draw_grey_mark, seed
    ),
    "stripes": lambda root, seed: _write(
        root, _balanced(tuple(sorted(ORIENTATIONS)), 60, 40), draw_stripes, seed
    ),
    "photo-crops": lambda root, seed: _write(
        root, _balanced(PHOTOS, 60, 40), draw_photo_crop, seed
    ),
}

#: The five kinds the issue names; ``stripes`` and ``photo-crops`` join them in the suite.
NEW_KINDS = ("shapes", "ellipses", "digits-10", "textures-5to1", "grey-marks")

FAMILIES = {"red": (210, 45, 45), "green": (45, 170, 60), "blue": (50, 70, 215)}
SIZE_BANDS = {"small": (0.07, 0.13), "medium": (0.16, 0.24), "large": (0.28, 0.42)}
STRAY_SHAPES = ("disc", "square", "triangle")


def _stray_lines(pen: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
    for _ in range(int(rng.integers(2, 5))):
        ends = [tuple(float(v) for v in rng.uniform(0, SIDE, 2)) for _ in range(2)]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        pen.line(ends, fill=colour, width=int(rng.integers(1, 4)))


def _filled(
    pen: ImageDraw.ImageDraw,
    shape: str,
    centre: tuple[float, float],
    r: float,
    colour: tuple[int, ...],
    turn: float,
) -> None:
    cx, cy = centre
    if shape == "disc":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "star":
        angles = turn + np.pi * np.arange(10) / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        pen.polygon(
            list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles), strict=True)),
            fill=colour,
        )
    else:
        sides = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}[shape]
        pen.polygon(_polygon(sides, centre, r, turn), fill=colour)


def draw_among_lines(kind: str) -> Callable[[str, str, np.random.Generator], Image.Image]:
    """A filled shape among stray lines on a random background; what the label fixes (the
    shape, its colour family or its size band) depends on ``kind``."""

    def draw(label: str, _split: str, rng: np.random.Generator) -> Image.Image:
        image = Image.new("RGB", (SIDE, SIDE), tuple(int(c) for c in rng.integers(0, 256, 3)))
        pen = ImageDraw.Draw(image)
        _stray_lines(pen, rng)
        centre, r = _placed(rng, *SIZE_BANDS.get(label, (0.12, 0.35)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if kind == "colours":
            jitter = rng.integers(-30, 31, 3)
            colour = tuple(
                int(np.clip(c + j, 0, 255)) for c, j in zip(FAMILIES[label], jitter, strict=True)
            )
        shape = label if kind == "shapes" else STRAY_SHAPES[int(rng.integers(3))]
        _filled(pen, shape, centre, r, colour, rng.uniform(0, 2 * np.pi))
        return image

    return draw


UNTUNED: dict[str, Callable[[Path, int], TaskData]] = {
    "stray-lines": lambda root, seed: _write(
        root, _balanced(STRAY_SHAPES, 40, 20), draw_among_lines("shapes"), seed
    ),
    "stray-lines-few": lambda root, seed: _write(
        root, _balanced(STRAY_SHAPES, 10, 20), draw_among_lines("shapes"), seed
    ),
    "stars": lambda root, seed: _write(
        root, _balanced(("hexagon", "pentagon", "star"), 40, 20), draw_among_lines("shapes"), seed
    ),
    "colours": lambda root, seed: _write(
        root, _balanced(tuple(FAMILIES), 40, 20), draw_among_lines("colours"), seed
    ),
    "sizes": lambda root, seed: _write(
        root, _balanced(tuple(SIZE_BANDS), 40, 20), draw_among_lines("sizes"), seed
    ),
}
TASKS = {**WRITERS, **UNTUNED}


def write_task(name: str, root: Path, seed: int = 0) -> TaskData:
    return TASKS[name](root, seed)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m resnet_bench.tasks", description="write a task as an ImageFolder"
    )
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("dir", type=Path, help="writes DIR/train/<class>/ and DIR/test/<class>/")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = write_task(args.task, args.dir, args.seed)
    classes = sorted(p.name for p in data.train.iterdir())
    print(
        f"{args.task}: {', '.join(classes)} in {data.train} (training) and {data.test} (held out)"
    )


if __name__ == "__main__":
    main()
