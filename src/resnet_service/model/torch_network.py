"""Settings -> a ready network: resolve weights or a bundle, quantize (or hit the cache)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights

from resnet_service import logs
from resnet_service.config import Settings
from resnet_service.core.errors import BundleInvalid
from resnet_service.core.model_info import (
    ModelInfo,
    WeightsFound,
    WeightsSource,
    loaded_model_info,
)
from resnet_service.core.runtime import ServedModel
from resnet_service.cpus import threads_per_worker
from resnet_service.model.architecture import QUANTIZED_ENGINE, build_fp32
from resnet_service.model.bundle import (
    MANIFEST,
    BundleManifest,
    QuantizationInfo,
    instantiate,
    read_labels,
    read_manifest,
    read_weights,
    write_bundle,
)
from resnet_service.model.datasets import (
    ImageFiles,
    builtin_calibration_files,
    builtin_holdout_files,
    bundle_splits,
    directory_files,
)
from resnet_service.model.hub import hub_checkpoint_path
from resnet_service.model.manifest import ensure_writable
from resnet_service.model.quantize import (
    cache_key,
    load_cached,
    load_image_set,
    quantize_to_bundle,
)
from resnet_service.model.weights import (
    FP32_WEIGHTS,
    INT8_WEIGHTS,
    ResolvedWeights,
    find_in_hub_or_download,
    resolve_fp32_weights,
)
from resnet_service.runtimes.torch_runtime import TorchRuntime, head_of

log = logging.getLogger(__name__)


IMAGENET_NAME = "resnet18-imagenet1k"


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet category names that ship inside torchvision."""
    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _imagenet_manifest(weights: ResolvedWeights) -> BundleManifest:
    return BundleManifest(
        name=IMAGENET_NAME,
        architecture="resnet18",
        num_classes=1000,
        precision="fp32",
        weights_sha256=weights.sha256,
        random_weights=weights.source is WeightsSource.RANDOM,
        provenance={
            "source": "torchvision ResNet18_Weights.IMAGENET1K_V1",
            "acc@1": FP32_WEIGHTS.meta["_metrics"]["ImageNet-1K"]["acc@1"],
            "weights_source": weights.source.value,
        },
    )


def _calibration(settings: Settings, given: ImageFiles | None) -> ImageFiles:
    if settings.calibration_dir is not None:
        return directory_files(settings.calibration_dir)
    return given or builtin_calibration_files()


def _int8_from_fp32(
    settings: Settings,
    manifest: BundleManifest,
    state_dict: dict[str, torch.Tensor],
    labels: list[str],
    *,
    calibration: ImageFiles | None = None,
    holdout: ImageFiles | None = None,
) -> tuple[nn.Module, BundleManifest, Path]:
    """Quantize fp32 weights, or load the cached int8 result of an earlier identical run."""
    spec = manifest.preprocessing
    calibration_files = _calibration(settings, calibration)
    fingerprint = calibration_files.fingerprint(spec)
    key = cache_key(
        manifest.weights_sha256, manifest.architecture, manifest.num_classes, fingerprint
    )
    cache_dir = settings.model_cache_dir / f"int8-{manifest.architecture}-{key}"
    cached = load_cached(cache_dir, manifest.weights_sha256)
    if cached is not None:
        log.info("int8 model loaded from cache %s", cache_dir)
        return cached[0], cached[1], cache_dir
    ensure_writable(settings.model_cache_dir, "int8 model")
    calibration_set = load_image_set(calibration_files, spec)
    log.info(
        "quantizing to int8 (%d calibration images from %s)",
        len(calibration_set),
        calibration_set.source,
    )
    fp32 = build_fp32(manifest.architecture, manifest.num_classes)
    fp32.load_state_dict(state_dict)
    module, int8_manifest = quantize_to_bundle(
        fp32_model=fp32,
        manifest=manifest,
        state_dict=state_dict,
        labels=labels,
        calibration=calibration_set,
        calibration_fingerprint=fingerprint,
        holdout=load_image_set(holdout or builtin_holdout_files(), spec),
        out_dir=cache_dir,
    )
    return module, int8_manifest, cache_dir


def _official_int8(settings: Settings) -> ResolvedWeights | None:
    """torchvision's own int8 ResNet18 (fbgemm-calibrated), preferred over quantizing ourselves:
    from the hub cache, or downloaded when no fp32 file is on disk either."""
    if settings.weights_path is not None:
        return None
    int8_on_disk = hub_checkpoint_path(INT8_WEIGHTS.url).is_file()
    fp32_on_disk = hub_checkpoint_path(FP32_WEIGHTS.url).is_file()
    if int8_on_disk or not fp32_on_disk:
        return find_in_hub_or_download(INT8_WEIGHTS.url, settings.allow_downloads)
    return None


def _load_official_int8(weights: ResolvedWeights) -> tuple[nn.Module, BundleManifest]:
    manifest = BundleManifest(
        name=f"{IMAGENET_NAME}-int8",
        architecture="resnet18",
        num_classes=1000,
        precision="int8",
        weights_sha256=weights.sha256,
        quantization=QuantizationInfo(method="official", engine=QUANTIZED_ENGINE, qconfig="fbgemm"),
        provenance={
            "source": "torchvision ResNet18_QuantizedWeights.IMAGENET1K_FBGEMM_V1",
            "acc@1": INT8_WEIGHTS.meta["_metrics"]["ImageNet-1K"]["acc@1"],
            "weights_source": weights.source.value,
        },
    )
    return instantiate(manifest, weights.state_dict), manifest


def _load_imagenet(
    settings: Settings,
) -> tuple[nn.Module, BundleManifest, ResolvedWeights, Path | None]:
    labels = imagenet_labels()
    official = _official_int8(settings) if settings.precision == "int8" else None
    if official is not None:
        module, manifest = _load_official_int8(official)
        return module, manifest, official, None
    weights = resolve_fp32_weights(
        settings.weights_path,
        allow_downloads=settings.allow_downloads,
        allow_random=settings.allow_random_weights,
    )
    manifest = _imagenet_manifest(weights)
    if settings.precision == "fp32":
        return instantiate(manifest, weights.state_dict), manifest, weights, None
    module, int8_manifest, cache_dir = _int8_from_fp32(
        settings, manifest, weights.state_dict, labels
    )
    return module, int8_manifest, weights, cache_dir


def _load_bundle(
    settings: Settings, directory: Path
) -> tuple[nn.Module, BundleManifest, list[str], Path | None]:
    manifest = read_manifest(directory)
    labels = read_labels(directory, manifest.num_classes)
    state_dict = read_weights(directory, manifest)
    if manifest.precision == "int8" or settings.precision == "fp32":
        if manifest.precision == "int8" and settings.precision == "fp32":
            raise BundleInvalid(
                f"{directory} holds an int8 model; serve it with precision=int8 or give its "
                "fp32 source bundle"
            )
        return instantiate(manifest, state_dict), manifest, labels, None
    calibration, holdout = bundle_splits(directory)
    module, int8_manifest, cache_dir = _int8_from_fp32(
        settings, manifest, state_dict, labels, calibration=calibration, holdout=holdout
    )
    return module, int8_manifest, labels, cache_dir


def load_model(settings: Settings) -> ServedModel:
    """Resolve, build (or load from cache) and return the model the settings ask for."""
    logs.adopt("torch")  # torch installed its own stderr handler on import
    started = time.perf_counter()
    threads = threads_per_worker(settings.inference_threads, settings.workers or 1)
    # Building runs a forward pass here: keep torch's pools to the worker's share of CPUs.
    torch.set_num_threads(threads)
    if settings.bundle_path is not None:
        module, manifest, labels, cache_dir = _load_bundle(settings, settings.bundle_path)
        found = WeightsFound(
            WeightsSource.BUNDLE, manifest.weights_sha256, path=str(settings.bundle_path)
        )
    else:
        module, manifest, weights, cache_dir = _load_imagenet(settings)
        labels = imagenet_labels()
        found = WeightsFound(
            weights.source,
            weights.sha256,
            path=str(weights.path) if weights.path else None,
            matches_published_hash=weights.matches_published_hash,
        )
    runtime = TorchRuntime(module, manifest.precision, threads)
    info = loaded_model_info(
        manifest,
        runtime=runtime.name,
        runtime_version=runtime.version(),
        weights=found,
        fidelity=None,
        int8_cache=str(cache_dir) if cache_dir else None,
        started=started,
    )
    return ServedModel(
        runtime=runtime,
        labels=labels,
        spec=manifest.preprocessing,
        info=info,
        head=head_of(module),
    )


def torch_int8_bundle(settings: Settings) -> tuple[ModelInfo, Path]:
    """The int8 torch model for ``settings`` as a bundle folder: the quantization cache entry,
    or torchvision's official int8 weights written once into the cache beside it."""
    model = load_model(settings)
    info = model.info
    if info.int8_cache:
        return info, Path(info.int8_cache)
    folder = settings.model_cache_dir / f"int8-official-{info.weights_sha256[:16]}"
    if not (folder / MANIFEST).is_file():
        ensure_writable(settings.model_cache_dir, "int8 model")
        manifest = BundleManifest(
            name=info.name,
            architecture=info.architecture,
            num_classes=info.num_classes,
            precision="int8",
            weights_sha256=info.weights_sha256,
            quantization=info.quantization,
            provenance=info.provenance,
        )
        assert isinstance(model.runtime, TorchRuntime)
        write_bundle(folder, manifest, model.runtime.module.state_dict(), model.labels)
    return info, folder
