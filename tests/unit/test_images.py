"""The input contract: formats, modes, limits, errors and parity with torchvision's reference."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Final

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import ResNet18_Weights

from resnet_service.core.errors import (
    EmptyUpload,
    ImageTooLarge,
    UndecodableImage,
    UnsupportedImage,
    UploadTooLarge,
)
from resnet_service.core.images import (
    EXACT_TOLERANCE,
    FAST_PATH_TOLERANCE,
    ImageLimits,
    crop_resized,
    decode_and_preprocess,
    decode_rgb,
    decode_to_pixels,
    normalise_pixels,
    sniff_format,
    to_rgb,
)
from tests.harness import LIMITS, PHOTOS, SPEC, encode, jpeg_of, mode_image, photo
from tests.weights import fp32_model

REFERENCE = ResNet18_Weights.IMAGENET1K_V1.transforms()


def reference(rgb: Image.Image) -> np.ndarray:
    out: np.ndarray = REFERENCE(rgb).numpy()
    return out


# --- parity --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
def test_exact_path_matches_reference_on_real_photos(name: str, fmt: str) -> None:
    data = encode(photo(name).resize((500, 375)), fmt)
    rgb = decode_rgb(data, LIMITS, SPEC, fast=False)
    ours = decode_and_preprocess(data, LIMITS, SPEC, fast=False)
    assert ours.shape == (3, 224, 224)
    assert ours.dtype == np.float32
    assert np.abs(ours - reference(rgb)).max() <= EXACT_TOLERANCE


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "I;16", "YCbCr"])
def test_every_mode_matches_reference_after_rgb_conversion(mode: str) -> None:
    img = mode_image(mode, (300, 200))
    fmt = {"CMYK": "JPEG", "YCbCr": "JPEG"}.get(mode, "PNG")
    data = encode(img, fmt)
    rgb = decode_rgb(data, LIMITS, SPEC, fast=False)
    assert rgb.mode == "RGB"
    assert rgb.size == (300, 200)
    ours = decode_and_preprocess(data, LIMITS, SPEC, fast=False)
    assert np.abs(ours - reference(rgb)).max() <= EXACT_TOLERANCE


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("size", [(1920, 1080), (4032, 3024)])
def test_fast_jpeg_path_within_tolerance_and_same_top5(name: str, size: tuple[int, int]) -> None:
    data = jpeg_of(name, size)
    exact_rgb = decode_rgb(data, LIMITS, SPEC, fast=False)
    fast = decode_and_preprocess(data, LIMITS, SPEC, fast=True)
    ref = reference(exact_rgb)
    diff = np.abs(fast - ref)
    assert diff.max() <= FAST_PATH_TOLERANCE
    assert diff.mean() <= 0.01
    model = fp32_model()
    with torch.inference_mode():
        logits = model(torch.from_numpy(np.stack([ref, fast])))
    top5 = logits.topk(5, dim=1).indices
    assert top5[0, 0] == top5[1, 0]
    assert len(set(top5[0].tolist()) & set(top5[1].tolist())) >= 4


#: One 8-bit level in normalised units (the smallest std), plus float rounding.
ONE_LEVEL: Final = 1 / (255 * min(SPEC.std)) + EXACT_TOLERANCE


@pytest.mark.parametrize("seed", range(3))
def test_crop_region_resampling_is_within_one_level_of_the_full_resize(seed: int) -> None:
    """The fast path resamples only the crop's source region: the same filter centres and
    supports, Pillow's own rounding moving a pixel by at most one level (noise images: the
    worst case for a filter)."""
    rng = np.random.default_rng(seed)
    for _ in range(15):
        width, height = (int(v) for v in rng.integers(64, 1400, size=2))
        if max(width, height) > 4 * min(width, height):
            continue
        img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        exact = np.asarray(crop_resized(img, SPEC, fast=False)).astype(np.int16)
        fast = np.asarray(crop_resized(img, SPEC, fast=True)).astype(np.int16)
        assert fast.shape == exact.shape == (224, 224, 3)
        assert np.abs(fast - exact).max() <= 1, (width, height)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_fast_path_on_small_photos_keeps_the_reference_s_answer(fmt: str) -> None:
    fast, refs = [], []
    for name in PHOTOS:
        data = encode(photo(name).resize((500, 375)), fmt)
        fast.append(decode_and_preprocess(data, LIMITS, SPEC, fast=True))
        refs.append(reference(decode_rgb(data, LIMITS, SPEC, fast=False)))
        assert np.abs(fast[-1] - refs[-1]).max() <= ONE_LEVEL
    with torch.inference_mode():
        logits = fp32_model()(torch.from_numpy(np.stack(refs + fast)))
    top1 = logits.argmax(1).tolist()
    assert top1[: len(PHOTOS)] == top1[len(PHOTOS) :]


def test_served_pixels_are_the_preprocessed_image_before_normalisation() -> None:
    data = jpeg_of("coffee", (500, 375))
    pixels = decode_to_pixels(data, LIMITS, SPEC)
    assert pixels.dtype == np.uint8
    assert pixels.shape == (224, 224, 3)
    np.testing.assert_array_equal(
        normalise_pixels(pixels, SPEC), decode_and_preprocess(data, LIMITS, SPEC)
    )
    batch = normalise_pixels(np.stack([pixels, pixels[::-1]]), SPEC)
    assert batch.shape == (2, 3, 224, 224)
    np.testing.assert_array_equal(batch[1], normalise_pixels(pixels[::-1], SPEC))


# --- mode conversion -----------------------------------------------------------------------
def test_sixteen_bit_is_rescaled_not_clipped() -> None:
    arr = np.array([[0, 257 * 100, 65535, 32768]], dtype=np.uint16)
    rgb = to_rgb(Image.fromarray(arr))
    assert np.asarray(rgb)[0, :, 0].tolist() == [0, 100, 255, 128]
    as_int32 = to_rgb(Image.fromarray(arr.astype(np.int32)))  # mode "I"
    assert np.asarray(as_int32)[0, :, 0].tolist() == [0, 100, 255, 128]
    png = decode_rgb(encode(Image.fromarray(arr), "PNG"), LIMITS, SPEC)
    assert np.asarray(png)[0, :, 0].tolist() == [0, 100, 255, 128]


def test_alpha_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (4, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    out = np.asarray(decode_rgb(encode(rgba, "PNG"), LIMITS, SPEC))
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent -> white
    assert out[0, 1].tolist() == [255, 0, 0]  # opaque stays
    assert 120 <= out[0, 2, 0] <= 135  # half-transparent black -> mid grey


def test_palette_transparency_is_composited_on_white() -> None:
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    out = np.asarray(decode_rgb(encode(pal, "PNG", transparency=0), LIMITS, SPEC))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    out = decode_rgb(encode(img, "JPEG", exif=exif.tobytes(), quality=95), LIMITS, SPEC)
    assert out.size == (20, 40)
    top = np.asarray(out)[2, 10]
    assert top[0] > 200
    assert top[2] < 60


def test_gif_first_frame() -> None:
    frames = [Image.new("RGB", (30, 30), color) for color in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = np.asarray(decode_rgb(buf.getvalue(), LIMITS, SPEC))
    assert out[15, 15, 0] > 200
    assert out[15, 15, 1] < 60


# --- format allow-list and errors ----------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        (b"\xff\xd8\xff\xe0", "JPEG"),
        (b"\x89PNG\r\n\x1a\n", "PNG"),
        (b"GIF89a", "GIF"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "WEBP"),
        (b"BM\x00\x00", "BMP"),
    ],
)
def test_sniff_allowed(data: bytes, fmt: str) -> None:
    assert sniff_format(data) == fmt


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b"\x00\x00\x00\x18ftypheic\x00\x00", "HEIC"),
        (b"II*\x00\x08\x00", "TIFF"),
        (b"%PDF-1.7", "PDF"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"),
        (b"hello world", "text"),
    ],
)
def test_unsupported_formats_are_named(data: bytes, named: str) -> None:
    with pytest.raises(UnsupportedImage, match=named) as info:
        decode_and_preprocess(data, LIMITS, SPEC)
    assert "JPEG, PNG, WebP" in info.value.detail


def test_tiff_is_refused_even_though_pillow_reads_it() -> None:
    with pytest.raises(UnsupportedImage):
        decode_and_preprocess(encode(photo("coffee"), "TIFF"), LIMITS, SPEC)


def test_empty_upload() -> None:
    with pytest.raises(EmptyUpload):
        decode_and_preprocess(b"", LIMITS, SPEC)


def test_byte_cap() -> None:
    data = jpeg_of("coffee")
    with pytest.raises(UploadTooLarge, match=str(len(data) - 1)):
        decode_and_preprocess(data, ImageLimits(len(data) - 1, 10**7), SPEC)


@pytest.mark.parametrize("fast", [True, False])
def test_truncated_jpeg_is_undecodable_in_the_user_s_words(fast: bool) -> None:
    data = jpeg_of("astronaut")
    with pytest.raises(UndecodableImage, match="cut short") as refused:
        decode_and_preprocess(data[: len(data) // 2], LIMITS, SPEC, fast=fast)
    assert "not processed" not in refused.value.detail  # Pillow's words, not the file's


def test_garbage_after_magic_is_undecodable() -> None:
    with pytest.raises(UndecodableImage):
        decode_and_preprocess(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, LIMITS, SPEC)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a size; no pixel data (never decoded)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


def test_pixel_cap_checked_from_header_before_decoding() -> None:
    with pytest.raises(ImageTooLarge, match="8000x8000"):
        decode_and_preprocess(_png_header_only(8000, 8000), LIMITS, SPEC)


def test_pillow_bomb_guard_stays_on() -> None:
    assert Image.MAX_IMAGE_PIXELS is not None
    with pytest.raises(ImageTooLarge):
        decode_and_preprocess(_png_header_only(100_000, 100_000), ImageLimits(10**6, 10**12), SPEC)


def test_extreme_aspect_ratio_refused() -> None:
    with pytest.raises(UnsupportedImage, match="1000x10"):
        decode_and_preprocess(encode(Image.new("RGB", (1000, 10)), "PNG"), LIMITS, SPEC)


def test_tiny_image_is_fine() -> None:
    out = decode_and_preprocess(encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), LIMITS, SPEC)
    assert out.shape == (3, 224, 224)
