"""Benchmark inputs: JPEGs at web, HD and phone sizes plus one PNG, made from real photos."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

SIZES = {"jpeg-500x375": (500, 375), "jpeg-1920x1080": (1920, 1080), "jpeg-4032x3024": (4032, 3024)}


@dataclass(frozen=True, slots=True)
class BenchImage:
    name: str
    data: bytes
    content_type: str
    size: tuple[int, int]


def _photo() -> Image.Image:
    """scikit-image's public-domain astronaut photo (a dev dependency), else a packaged one."""
    try:
        import skimage.data

        pixels = skimage.data.astronaut()  # type: ignore[no-untyped-call]
        return Image.fromarray(pixels).convert("RGB")
    except ImportError:
        from resnet_service.model.datasets import builtin_calibration_files

        return Image.open(builtin_calibration_files().files[0]).convert("RGB")


def bench_images(names: list[str] | None = None) -> dict[str, BenchImage]:
    """The named images (default: all), encoded in memory."""
    photo = _photo()
    out: dict[str, BenchImage] = {}
    for name, size in SIZES.items():
        buf = io.BytesIO()
        photo.resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        out[name] = BenchImage(name, buf.getvalue(), "image/jpeg", size)
    buf = io.BytesIO()
    photo.resize((500, 375), Image.Resampling.BICUBIC).save(buf, "PNG")
    out["png-500x375"] = BenchImage("png-500x375", buf.getvalue(), "image/png", (500, 375))
    return {k: v for k, v in out.items() if names is None or k in names}
