"""Test data made here: weights, photos and images in every mode (no network, no hub)."""

from __future__ import annotations

import io
from functools import cache
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image
from torchvision.models import resnet18

from resnet_service.core.images import ImageLimits, PreprocessSpec, decode_and_preprocess

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
LIMITS = ImageLimits(max_bytes=64 * 1024 * 1024, max_pixels=40_000_000)
SPEC = PreprocessSpec()


@cache
def photo(name: str) -> Image.Image:
    """A real photo that scikit-image ships (public domain / CC0)."""
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def encode(img: Image.Image, fmt: str = "JPEG", **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def jpeg_of(name: str, size: tuple[int, int] = (500, 375), quality: int = 90) -> bytes:
    """A real photo as a JPEG of the given size."""
    return encode(photo(name).resize(size, Image.Resampling.BICUBIC), "JPEG", quality=quality)


@cache
def seeded_state_dict(seed: int = 1234) -> dict[str, torch.Tensor]:
    """Seeded random ResNet18 weights with BatchNorm statistics re-estimated on real photos,
    so activations are not degenerate (a stand-in for ImageNet weights, which we cannot fetch)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = resnet18()
    torch.random.set_rng_state(generator_state)
    batch = torch.stack(
        [
            torch.from_numpy(decode_and_preprocess(jpeg_of(name, size), LIMITS, SPEC))
            for name in PHOTOS
            for size in ((500, 375), (375, 500), (640, 480))
        ]
    )
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(batch)
    state: dict[str, torch.Tensor] = model.eval().state_dict()
    return state


def write_weights(path: Path) -> Path:
    """Save the test weights where a test wants them (a temp dir or the hub cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(seeded_state_dict(), path)
    return path


def fp32_model() -> torch.nn.Module:
    model: torch.nn.Module = resnet18()
    model.load_state_dict(seeded_state_dict())
    return model.eval()


def mode_image(mode: str, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A synthetic image in any Pillow mode, with structure (gradients) rather than flat colour."""
    w, h = size
    x = np.linspace(0, 1, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 1, h)[:, None].repeat(w, 1)
    rgb = (np.stack([x, y, 1 - x * y], axis=-1) * 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    if mode in ("RGB",):
        return img
    if mode == "I;16":
        arr16 = (x * 65535).astype(np.uint16)
        return Image.fromarray(arr16)
    if mode == "RGBA":
        rgba = img.convert("RGBA")
        rgba.putalpha(Image.fromarray((y * 255).astype(np.uint8)))
        return rgba
    if mode == "LA":
        la = img.convert("LA")
        la.putalpha(Image.fromarray((y * 255).astype(np.uint8)))
        return la
    return img.convert(mode)
