"""Static post-training int8 quantization, its fidelity check and its on-disk cache.

Eager-mode PTQ: conv+bn+relu fused, per-channel weight observers, histogram activation
observers, on the x86 quantized engine. The qconfig is oneDNN's (8-bit activations) on CPUs
with VNNI: the x86 and fbgemm defaults use ``reduce_range`` (7-bit activations), measured at
6.1% logit error against 3.9% for oneDNN's, at the same speed. Without VNNI (AVX2 only) 8-bit
activations overflow the kernels' int16 sums, so there it is the x86 one
(``architecture.host_qconfig``); the cache key names the choice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import torch
from torch import nn

from resnet_service.core.errors import BundleInvalid
from resnet_service.core.images import PreprocessSpec
from resnet_service.model.architecture import (
    QUANTIZED_ENGINE,
    build_prepared,
    convert_prepared,
    host_qconfig,
)
from resnet_service.model.bundle import (
    BundleManifest,
    Fidelity,
    QuantizationInfo,
    instantiate,
    read_manifest,
    read_weights,
    write_bundle,
)
from resnet_service.model.datasets import ImageFiles
from resnet_service.model.fidelity import compare
from resnet_service.model.weights import StateDict

log = logging.getLogger(__name__)

CACHE_FORMAT: Final = 1


@dataclass(frozen=True, slots=True)
class ImageSet:
    """Preprocessed images with where they came from."""

    tensor: torch.Tensor
    source: str
    #: Class indices aligned with ``tensor`` when the images are labelled.
    targets: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.tensor.shape[0])


def load_image_set(files: ImageFiles, spec: PreprocessSpec) -> ImageSet:
    """Decode ``files`` through the serving path into one tensor."""
    arrays = files.load_arrays(spec)
    targets = torch.from_numpy(arrays.targets) if arrays.targets is not None else None
    return ImageSet(torch.from_numpy(arrays.array), arrays.source, targets)


def _batches(tensor: torch.Tensor, size: int = 16) -> list[torch.Tensor]:
    return list(torch.split(tensor, size))


def quantize_static(
    architecture: str, num_classes: int, state_dict: StateDict, calibration: ImageSet
) -> nn.Module:
    """fp32 weights -> calibrated int8 network."""
    model = build_prepared(architecture, num_classes, state_dict, host_qconfig())
    with torch.inference_mode():
        for batch in _batches(calibration.tensor):
            model(batch)
    return convert_prepared(model)


def measure_fidelity(fp32: nn.Module, int8: nn.Module, images: ImageSet) -> Fidelity:
    """Top-1 agreement, max |p_int8 - p_fp32| and mean relative logit error on ``images``."""
    with torch.inference_mode():
        ref = torch.cat([fp32(b) for b in _batches(images.tensor)]).float().numpy()
        got = torch.cat([int8(b) for b in _batches(images.tensor)]).float().numpy()
    targets = images.targets.numpy() if images.targets is not None else None
    return compare(ref, got, images.source, targets)


def cache_key(source_sha256: str, architecture: str, num_classes: int, calibration: str) -> str:
    """Everything that changes the int8 result, hashed: a new input means a new cache entry."""
    parts = {
        "format": CACHE_FORMAT,
        "source_sha256": source_sha256,
        "architecture": architecture,
        "num_classes": num_classes,
        "engine": QUANTIZED_ENGINE,
        "qconfig": host_qconfig(),
        "calibration": calibration,
        "torch": torch.__version__.split("+")[0],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def load_cached(directory: Path, source_sha256: str) -> tuple[nn.Module, BundleManifest] | None:
    """A cached int8 bundle, or None when absent; corrupt or mismatched entries are removed."""
    if not directory.exists():
        return None
    try:
        manifest = read_manifest(directory)
        quant = manifest.quantization
        if manifest.precision != "int8" or quant is None:
            raise BundleInvalid("not an int8 bundle")
        if quant.source_weights_sha256 != source_sha256:
            raise BundleInvalid("made from other weights")
        return instantiate(manifest, read_weights(directory, manifest)), manifest
    except BundleInvalid as exc:
        log.warning("int8 cache %s rejected (%s); rebuilding", directory, exc.detail)
        shutil.rmtree(directory, ignore_errors=True)
        return None


def quantize_to_bundle(
    *,
    fp32_model: nn.Module,
    manifest: BundleManifest,
    state_dict: StateDict,
    labels: list[str],
    calibration: ImageSet,
    calibration_fingerprint: str,
    holdout: ImageSet,
    out_dir: Path,
) -> tuple[nn.Module, BundleManifest]:
    """Calibrate, convert, measure fidelity and write the int8 bundle to ``out_dir``."""
    started = time.perf_counter()
    int8 = quantize_static(manifest.architecture, manifest.num_classes, state_dict, calibration)
    seconds = time.perf_counter() - started
    fidelity = measure_fidelity(fp32_model, int8, holdout)
    quant = QuantizationInfo(
        method="static_ptq",
        engine=QUANTIZED_ENGINE,
        qconfig=host_qconfig(),
        calibration_source=calibration.source,
        calibration_images=len(calibration),
        calibration_fingerprint=calibration_fingerprint,
        source_weights_sha256=manifest.weights_sha256,
        seconds=round(seconds, 3),
        fidelity=fidelity,
    )
    int8_manifest = manifest.model_copy(
        update={"precision": "int8", "quantization": quant, "name": f"{manifest.name}-int8"}
    )
    written = write_bundle(out_dir, int8_manifest, int8.state_dict(), labels)
    log.info(
        "quantized in %.2fs: top-1 agreement %.3f, max prob diff %.4f on %d held-out images",
        seconds,
        fidelity.top1_agreement,
        fidelity.max_abs_prob_diff,
        fidelity.images,
    )
    return int8, written
