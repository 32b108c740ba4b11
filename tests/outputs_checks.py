"""Checks of embeddings and class activation maps against independent references: Grad-CAM
by torch autograd, and the fp32 model's own outputs (shared by the runtime, service and
fine-tuning tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import torch
from PIL import Image

from resnet_service.config import RuntimeName, Settings
from resnet_service.core.feature_outputs import class_activation_map, heat_scale
from resnet_service.core.images import LOCAL_FILE_LIMITS, decode_and_preprocess
from resnet_service.core.runtime import ALL_OUTPUTS, FloatBatch, ServedModel
from resnet_service.model.bundle import instantiate, read_manifest, read_weights
from resnet_service.model.served import open_served_model

#: The issue's bar: Grad-CAM and our map, both ReLU'd and scaled to 0..1.
GRAD_CAM_ATOL: Final = 1e-4


def grad_cam(module: torch.nn.Module, x: torch.Tensor, target: int) -> FloatBatch:
    """Grad-CAM at ``layer4`` of one image by autograd, before its ReLU: the channel weights
    are the spatial mean of d logit[target] / d A (Selvaraju et al. 2017)."""
    kept: list[torch.Tensor] = []

    def keep(_: torch.nn.Module, __: object, output: torch.Tensor) -> None:
        output.retain_grad()
        kept.append(output)

    layer4: torch.nn.Module = module.layer4  # type: ignore[assignment]
    hook = layer4.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = module(x[None].requires_grad_(True))
            logits[0, target].backward()
    finally:
        hook.remove()
    (activations,) = kept
    assert activations.grad is not None
    weights = activations.grad.mean(dim=(2, 3), keepdim=True)
    out: FloatBatch = (weights * activations).sum(dim=1)[0].detach().numpy()
    return out


def assert_cam_is_grad_cam(model: ServedModel, reference: torch.nn.Module, x: FloatBatch) -> None:
    """Our map (any runtime's forward + the fp32 head) against autograd's Grad-CAM on the
    fp32 torch module, for its top class and its bottom one, on every image of ``x``; the
    runtime's logits and embedding are the module's too (a map can only be as right as the
    forward it comes from)."""
    assert model.head is not None
    outputs = model.runtime.forward(x, ALL_OUTPUTS)
    assert outputs.feature_map is not None
    assert outputs.embedding is not None
    with torch.inference_mode():
        expected = reference(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(outputs.logits, expected, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(
        outputs.embedding, outputs.feature_map.mean(axis=(2, 3)), rtol=1e-4, atol=1e-5
    )
    for row, logits in enumerate(expected):
        for target in (int(logits.argmax()), int(logits.argmin())):
            ours = class_activation_map(outputs.feature_map[row], model.head, target)
            theirs = grad_cam(reference, torch.from_numpy(x[row]), target)
            scale = float(np.abs(theirs).max())
            np.testing.assert_allclose(ours, theirs, atol=GRAD_CAM_ATOL * scale)
            np.testing.assert_allclose(heat_scale(ours), heat_scale(theirs), atol=GRAD_CAM_ATOL)


@dataclass(frozen=True)
class OutputAgreement:
    """int8 outputs against fp32's on the same images."""

    runtime: str
    embedding_cosine_median: float
    embedding_cosine_p5: float
    cam_pearson_median: float
    images: int


def _cosines(a: FloatBatch, b: FloatBatch) -> FloatBatch:
    out: FloatBatch = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return out


def _pearson(a: FloatBatch, b: FloatBatch) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def bundle_inputs(bundle: Path, files: list[Path]) -> FloatBatch:
    spec = read_manifest(bundle).preprocessing
    return np.stack([decode_and_preprocess(p.read_bytes(), LOCAL_FILE_LIMITS, spec) for p in files])


def fp32_bundle_module(bundle: Path) -> torch.nn.Module:
    manifest = read_manifest(bundle)
    return instantiate(manifest, read_weights(bundle, manifest)).eval()


def int8_outputs_agree(
    bundle: Path, cache: Path, runtime: RuntimeName, files: list[Path], truth: list[int]
) -> OutputAgreement:
    """The int8 model of ``runtime`` (built from ``bundle`` into ``cache``) against the fp32
    bundle: cosine of the embeddings, Pearson correlation of the true class's maps."""
    settings = Settings(
        bundle_path=bundle,
        runtime=runtime,
        precision="int8",
        model_cache_dir=cache,
        allow_downloads=False,
        inference_threads=1,
    )
    int8 = open_served_model(settings)
    assert int8.head is not None
    fp32 = open_served_model(settings.model_copy(update={"runtime": "torch", "precision": "fp32"}))
    assert fp32.head is not None
    x = bundle_inputs(bundle, files)
    got = _forward_all(int8, x)
    want = _forward_all(fp32, x)
    assert got.embedding is not None
    assert want.embedding is not None
    assert got.feature_map is not None
    assert want.feature_map is not None
    cosines = _cosines(got.embedding, want.embedding)
    pearsons = [
        _pearson(
            class_activation_map(got.feature_map[i], int8.head, t),
            class_activation_map(want.feature_map[i], fp32.head, t),
        )
        for i, t in enumerate(truth)
    ]
    return OutputAgreement(
        runtime=runtime,
        embedding_cosine_median=float(np.median(cosines)),
        embedding_cosine_p5=float(np.percentile(cosines, 5)),
        cam_pearson_median=float(np.median(pearsons)),
        images=len(files),
    )


@dataclass(frozen=True)
class _Outputs:
    embedding: FloatBatch | None
    feature_map: FloatBatch | None


def _forward_all(model: ServedModel, x: FloatBatch) -> _Outputs:
    """Every output over ``x`` in batches of 16, each copied before the next forward (a
    runtime may hand out its own buffers)."""
    model.runtime.bind_thread()
    embeddings, maps = [], []
    for start in range(0, len(x), 16):
        part = model.runtime.forward(x[start : start + 16], ALL_OUTPUTS)
        assert part.embedding is not None
        assert part.feature_map is not None
        embeddings.append(part.embedding.copy())
        maps.append(part.feature_map.copy())
    return _Outputs(np.concatenate(embeddings), np.concatenate(maps))


CORNERS: Final = ("top-left", "top-right", "bottom-left", "bottom-right")
#: Coloured squares on grey: the class is the colour, wherever the square is.
PATCH_COLOURS: Final = {"blue": (40, 60, 200), "green": (40, 170, 60), "red": (200, 40, 40)}


def coloured_patch(
    colour: str, canvas: int, side: int, left: int, top: int, rng: np.random.Generator
) -> Image.Image:
    """A noisy square of ``colour`` (jittered) on a noisy grey ``canvas``."""
    img = np.clip(rng.normal(128, 12, (canvas, canvas, 3)), 0, 255)
    shade = np.asarray(PATCH_COLOURS[colour]) + rng.normal(0, 20, 3)
    img[top : top + side, left : left + side] = np.clip(
        shade + rng.normal(0, 12, (side, side, 3)), 0, 255
    )
    return Image.fromarray(img.astype(np.uint8))


def write_patches(root: Path, canvas: int, per_class: int, rng: np.random.Generator) -> Path:
    """An ImageFolder of squares of random size (a quarter to half the side) and place."""
    for colour in PATCH_COLOURS:
        folder = root / colour
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = int(rng.integers(canvas // 4, canvas // 2 + 1))
            left, top = (int(v) for v in rng.integers(0, canvas - side + 1, 2))
            coloured_patch(colour, canvas, side, left, top, rng).save(folder / f"{i}.png")
    return root


def in_corner(colour: str, corner: str, canvas: int, rng: np.random.Generator) -> Image.Image:
    """A half-side square of ``colour`` filling one corner."""
    half = canvas // 2
    left = canvas - half if corner.endswith("right") else 0
    top = canvas - half if corner.startswith("bottom") else 0
    return coloured_patch(colour, canvas, half, left, top, rng)


def peak_corner(grid: FloatBatch) -> str:
    """The quadrant of the map's largest cell (a centre row or column counts for neither)."""
    row, col = np.unravel_index(int(np.argmax(grid)), grid.shape)
    h, w = grid.shape
    vertical = "top" if row < h // 2 else "bottom" if row >= (h + 1) // 2 else "middle"
    horizontal = "left" if col < w // 2 else "right" if col >= (w + 1) // 2 else "middle"
    return f"{vertical}-{horizontal}"
