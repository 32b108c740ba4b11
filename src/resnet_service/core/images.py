"""The input contract: image bytes -> an upright RGB image -> a normalised 3x224x224 array.

Matches ``ResNet18_Weights.IMAGENET1K_V1.transforms()`` (resize the shorter side to 256 with
antialiased bilinear, centre-crop 224, ImageNet mean/std): the resize and crop are the very
torchvision functions the reference calls on a PIL image, so the exact path differs from it only
by float rounding. The fast path (what the service runs) differs in two measured ways, each
within ``FAST_PATH_TOLERANCE`` of the reference (tested): large JPEGs are scaled down by DCT
while decoding (``draft``), and only the source region under the centre crop is resampled
(Pillow's ``resize(box=...)``: the same filter and scale, half the pixels of a 500x375 photo;
its own float rounding moves a pixel by at most one 8-bit level, measured over random sizes).

The served path stops at 8-bit pixels (``decode_to_pixels``: 224x224x3 uint8, a quarter of the
float array's bytes); the mean/std normalisation runs batched on the engine thread, inside the
compiled graph where the runtime can take 8-bit input (OpenVINO's PrePostProcessor), else with
``normalise_pixels``.

Nothing here imports torch: a serving worker on a torch-free runtime stays small. The resize and
crop below are the very Pillow calls torchvision makes for a PIL image (``F_pil.resize``,
``center_crop``'s rounding), so the result is bit-identical to the reference (tested). Pillow
releases the GIL while it decodes and resizes, so the decode pool runs beside the model.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import warnings
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from resnet_service.core.errors import (
    EmptyUpload,
    ImageTooLarge,
    UndecodableImage,
    UnsupportedImage,
    UploadTooLarge,
)

Tensor3 = npt.NDArray[np.float32]
#: 8-bit RGB pixels, height x width x 3 (one image) or N x height x width x 3 (a batch).
Pixels = npt.NDArray[np.uint8]

ALLOWED_DESCRIPTION: Final = "JPEG, PNG, WebP, BMP or GIF"
#: Largest accepted long:short side ratio: beyond it, resizing the short side to 256 would
#: build an enormous intermediate image (a 1x40M strip would become 256x10G).
MAX_ASPECT_RATIO: Final = 32.0
#: The fast JPEG path keeps at least this many pixels on the short side before the resize.
FAST_PATH_MIN_SHORT_SIDE: Final = 512
#: Max abs difference (normalised units) allowed between the fast JPEG path and the reference.
FAST_PATH_TOLERANCE: Final = 0.25
#: Max abs difference of the exact path (float rounding only).
EXACT_TOLERANCE: Final = 1e-5

_SIGNATURES: Final = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
# Formats we recognise only to name them in the error message.
_KNOWN_UNSUPPORTED: Final = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
)


class PreprocessSpec(BaseModel):
    """How images become model input; stored in every model bundle."""

    model_config = ConfigDict(frozen=True)

    resize_size: int = Field(256, ge=8, le=4096)
    crop_size: int = Field(224, ge=8, le=4096)
    interpolation: Literal["bilinear", "bicubic", "nearest", "lanczos"] = "bilinear"
    #: Pillow always antialiases when it downsizes (as torchvision does for PIL images).
    antialias: Literal[True] = True
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @model_validator(mode="after")
    def _crop_fits(self) -> PreprocessSpec:
        if self.crop_size > self.resize_size:
            raise ValueError("crop_size must not exceed resize_size")
        return self


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """Input caps: bytes before decoding, pixels from the header before decoding."""

    max_bytes: int
    max_pixels: int


#: For image files we read ourselves (calibration, training data, benchmark inputs).
LOCAL_FILE_LIMITS: Final = ImageLimits(max_bytes=256 * 1024 * 1024, max_pixels=40_000_000)


def sniff_format(data: bytes) -> str:
    """Decide the format from the content's magic bytes; raise ``UnsupportedImage`` otherwise."""
    for magic, fmt in _SIGNATURES:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    raise UnsupportedImage(
        f"This file is not an image we can read ({describe_unsupported(data)}). "
        f"Send {ALLOWED_DESCRIPTION}."
    )


def describe_unsupported(data: bytes) -> str:
    """A short human name for content we refuse, for error messages."""
    for magic, name in _KNOWN_UNSUPPORTED:
        if data.startswith(magic):
            return name
    if data[4:8] == b"ftyp":
        brand = data[8:12].decode("ascii", "replace").strip()
        return {"heic": "HEIC", "heix": "HEIC", "mif1": "HEIF", "avif": "AVIF"}.get(
            brand, f"ISO media '{brand}'"
        )
    head = data[:256].lstrip().lower()
    if head.startswith((b"<svg", b"<?xml")):
        return "SVG/XML"
    if head.startswith((b"<!doctype html", b"<html")):
        return "HTML"
    try:
        data[:64].decode("utf-8")
    except UnicodeDecodeError:
        return "unknown binary data"
    return "text"


def open_image(data: bytes, limits: ImageLimits) -> tuple[Image.Image, str]:
    """Open (not yet decode) allow-listed image bytes, enforcing byte and pixel caps."""
    if not data:
        raise EmptyUpload("The upload is empty. Send the image file's bytes.")
    if len(data) > limits.max_bytes:
        raise UploadTooLarge(
            f"The upload is {len(data)} bytes; the limit is {limits.max_bytes} bytes."
        )
    fmt = sniff_format(data)
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(
            "The image header claims far more pixels than allowed (decompression-bomb guard); "
            f"the limit is {limits.max_pixels} pixels. Downscale it before sending."
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise UndecodableImage(
            f"The file starts like a {fmt} image but its header could not be read. "
            "It may be corrupt or truncated."
        ) from None
    width, height = img.size
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"The image is {width}x{height} = {width * height} pixels; the limit is "
            f"{limits.max_pixels}. Downscale it before sending."
        )
    if width < 1 or height < 1 or max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise UnsupportedImage(
            f"The image is {width}x{height}; sides more than {MAX_ASPECT_RATIO:g}:1 apart are "
            "not supported. Crop it closer to a square."
        )
    return img, fmt


def _apply_fast_jpeg_path(img: Image.Image, spec: PreprocessSpec) -> None:
    """Let libjpeg scale large JPEGs down by DCT (1/2..1/8) while decoding."""
    min_side = max(FAST_PATH_MIN_SHORT_SIDE, 2 * spec.resize_size)
    width, height = img.size
    short = min(width, height)
    if short < 2 * min_side:
        return
    scale = min_side / short
    img.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: 16-bit rescaled (not clipped), transparency composited on white."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit samples (PNG opens as I;16 or I): rescale 0..65535 to 0..255.
        # Integer math (4 bytes/pixel, not float64's 8): round(v / 257), clipped to 0..255.
        arr = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
        gray = ((arr + 128) // 257).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        return img.convert("L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img if mode == "RGB" else img.convert("RGB")


#: EXIF orientations that turn the stored image by a quarter (width and height swap).
_QUARTER_TURNS: Final = frozenset({5, 6, 7, 8})


def _upright_size(img: Image.Image) -> tuple[int, int]:
    """The stored image's (width, height) as it is shown: after its EXIF orientation."""
    width, height = img.size
    with contextlib.suppress(OSError, SyntaxError, ValueError, KeyError, TypeError):
        if img.getexif().get(0x0112) in _QUARTER_TURNS:
            return height, width
    return width, height


def _undecodable(fmt: str, exc: BaseException) -> str:
    """What went wrong in the user's words (Pillow's, such as "truncated (5 bytes not
    processed)", describe its decoder, not the file)."""
    said = str(exc).lower()
    if "truncated" in said or isinstance(exc, EOFError):
        return (
            f"The {fmt} image ends before its picture does: the file is cut short (an "
            "interrupted upload, download or copy?). Send the whole file."
        )
    return (
        f"The {fmt} image's data is damaged and cannot be decoded, though its header is "
        "readable. Re-export or re-copy the file."
    )


def decode_upright(
    data: bytes, limits: ImageLimits, spec: PreprocessSpec, *, fast: bool = True
) -> tuple[Image.Image, tuple[int, int]]:
    """Bytes -> upright RGB image (EXIF orientation applied), refusing anything unsafe, with
    the upright size of the image as sent (the fast JPEG path may decode it smaller)."""
    img, fmt = open_image(data, limits)
    size = _upright_size(img)
    if fast and fmt == "JPEG":
        _apply_fast_jpeg_path(img, spec)
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise UndecodableImage(_undecodable(fmt, exc)) from None
    # In place: no copy when there is nothing to rotate. A broken EXIF block must not sink a
    # readable image, so its errors are ignored.
    with contextlib.suppress(OSError, SyntaxError, ValueError, KeyError, TypeError):
        ImageOps.exif_transpose(img, in_place=True)
    return to_rgb(img), size


def decode_rgb(
    data: bytes, limits: ImageLimits, spec: PreprocessSpec, *, fast: bool = True
) -> Image.Image:
    """Bytes -> upright RGB image (EXIF orientation applied), refusing anything unsafe."""
    return decode_upright(data, limits, spec, fast=fast)[0]


_PIL_FILTERS: Final = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the shorter side at ``short_side``: torchvision's arithmetic
    (``_compute_resized_output_size``: the long side truncated, not rounded)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(short_side * long / short)
    return (short_side, new_long) if width <= height else (new_long, short_side)


def center_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """The centred ``crop``x``crop`` box, rounded as torchvision's ``center_crop`` does."""
    top = round((height - crop) / 2.0)
    left = round((width - crop) / 2.0)
    return left, top, left + crop, top + crop


def crop_resized(rgb: Image.Image, spec: PreprocessSpec, *, fast: bool = False) -> Image.Image:
    """Resize (shorter side to ``resize_size``) and centre-crop ``crop_size``, as the reference.

    ``fast`` resamples only the crop's source region, at the same scale: the box is the crop
    mapped back through the resize, so every output pixel has the same centre and filter
    support as in the full resize (within Pillow's float rounding)."""
    resample = _PIL_FILTERS[spec.interpolation]
    if not fast:
        size = resized_size(rgb.width, rgb.height, spec.resize_size)
        return rgb.resize(size, resample).crop(center_crop_box(*size, spec.crop_size))
    box = crop_source_box(rgb.width, rgb.height, spec)
    return rgb.resize((spec.crop_size, spec.crop_size), resample, box=box)


def crop_source_box(
    width: int, height: int, spec: PreprocessSpec
) -> tuple[float, float, float, float]:
    """The region of a ``width`` x ``height`` image that the model sees, in its own pixels
    (left, top, right, bottom): the centre crop mapped back through the resize."""
    size = resized_size(width, height, spec.resize_size)
    left, top, right, bottom = center_crop_box(size[0], size[1], spec.crop_size)
    sx, sy = width / size[0], height / size[1]
    return (left * sx, top * sy, right * sx, bottom * sy)


def preprocess(rgb: Image.Image, spec: PreprocessSpec, *, fast: bool = False) -> Tensor3:
    """RGB image -> normalised CHW float32, the same ops as ``IMAGENET1K_V1.transforms()``."""
    return normalise(crop_resized(rgb, spec, fast=fast), spec)


@functools.cache
def _scale_offset(
    mean: tuple[float, float, float], std: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    std_arr = np.asarray(std, dtype=np.float32)
    scale = (1.0 / (255.0 * std_arr)).astype(np.float32)[:, None, None]
    offset = (np.asarray(mean, dtype=np.float32) / std_arr)[:, None, None]
    return scale, offset


def normalise(rgb: Image.Image, spec: PreprocessSpec) -> Tensor3:
    """RGB image (already model-sized) -> CHW float32 with the spec's mean/std."""
    out: Tensor3 = normalise_pixels(np.asarray(rgb), spec)
    return out


def normalise_pixels(pixels: Pixels, spec: PreprocessSpec) -> npt.NDArray[np.float32]:
    """HWC (or NHWC) uint8 -> CHW (or NCHW) float32 with the spec's mean/std.

    ``x * (1 / (255 * std)) - mean / std`` in place on one float copy: the same values as
    ``(x / 255 - mean) / std`` within float rounding (< 1e-6), at ~3/4 of the time."""
    scale, offset = _scale_offset(spec.mean, spec.std)
    channels_first = (2, 0, 1) if pixels.ndim == 3 else (0, 3, 1, 2)
    out = pixels.transpose(channels_first).astype(np.float32)
    out *= scale
    out -= offset
    return out


def decode_to_pixels(
    data: bytes, limits: ImageLimits, spec: PreprocessSpec, *, fast: bool = True
) -> Pixels:
    """The served input contract: bytes -> model-sized HWC uint8 pixels (not yet normalised)."""
    return decode_sized(data, limits, spec, fast=fast)[0]


def decode_sized(
    data: bytes, limits: ImageLimits, spec: PreprocessSpec, *, fast: bool = True
) -> tuple[Pixels, tuple[int, int]]:
    """``decode_to_pixels`` and the upright (width, height) of the image as sent."""
    rgb, size = decode_upright(data, limits, spec, fast=fast)
    pixels: Pixels = np.asarray(crop_resized(rgb, spec, fast=fast))
    return pixels, size


def decode_and_preprocess(
    data: bytes, limits: ImageLimits, spec: PreprocessSpec, *, fast: bool = True
) -> Tensor3:
    """The whole input contract: bytes -> model-ready CHW float32 array."""
    return normalise_pixels(decode_to_pixels(data, limits, spec, fast=fast), spec)


def install_bomb_guard() -> None:
    """Make Pillow's decompression-bomb *warning* an error, so oversized images are refused.

    Our pixel cap sits below Pillow's limit, so this only matters if settings raise it; the
    filter is process-wide (``warnings`` is not thread-local), so it is installed once at start.
    """
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
