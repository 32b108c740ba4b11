"""Settings -> the model a worker serves, on the runtime the settings name.

``prepare`` runs once per server start, before the workers (``serve``'s preflight, a child
process): it finds the built model in the cache, or builds it (torch), and says where it is.
``open_served_model`` is what a worker (or the CLI) calls to get a ready ``ServedModel``. For
OpenVINO and ONNX Runtime the whole path from a warm cache to a ready model is torch-free:
the source is identified by file hashes, the artifact is checked by its manifest and opened by
its runtime.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from pydantic import BaseModel

from resnet_service.config import Precision, RuntimeName, Settings
from resnet_service.core.errors import BundleInvalid, RuntimeUnavailable
from resnet_service.core.model_info import WeightsFound, loaded_model_info, measured_here
from resnet_service.core.runtime import ServedModel
from resnet_service.cpus import has_vnni, threads_per_worker
from resnet_service.locks import file_lock
from resnet_service.model.artifacts import (
    ArtifactManifest,
    artifact_key,
    cache_folder,
    find_cached,
    read_artifact,
    read_head,
)
from resnet_service.model.datasets import calibration_and_holdout
from resnet_service.model.hub import sha256_file
from resnet_service.model.manifest import LABELS, Fidelity, ensure_writable
from resnet_service.model.source import DownloadNeeded, ModelSource, resolve_source
from resnet_service.runtimes.packages import torch_version
from resnet_service.runtimes.registry import open_runtime, runtime_version

log = logging.getLogger(__name__)

#: Bump when the export or quantization recipe changes: old cache entries stop matching.
RECIPE_VERSION = 7  # 6: three graph outputs and head.npz; 7: OpenVINO without overflow fix


class Prepared(BaseModel):
    """What the preflight found or built."""

    name: str
    runtime: RuntimeName
    precision: Precision
    weights_sha256: str
    random_weights: bool
    artifact: str | None


@contextmanager
def needs_torch(what: str) -> Iterator[None]:
    """Imports of the torch side, turned into an error that says what to install."""
    try:
        yield
    except ImportError as exc:
        raise RuntimeUnavailable(
            f"{what} needs torch ({exc}): pip install 'resnet-service[build]', or build the "
            "model elsewhere (`resnet-service quantize --runtime R --out DIR`) and serve it "
            "with RESNET_SERVICE_ARTIFACT_PATH=DIR"
        ) from None


def _source(settings: Settings) -> ModelSource:
    try:
        return resolve_source(settings)
    except DownloadNeeded:
        with needs_torch("downloading the weights"):
            from resnet_service.model.export import downloaded_source

        return downloaded_source(settings)


def _key_parts(
    settings: Settings, source: ModelSource, fingerprint: str | None
) -> dict[str, object]:
    return {
        "recipe": RECIPE_VERSION,
        "runtime": settings.runtime,
        "runtime_version": runtime_version(settings.runtime),
        "torch": torch_version(),  # the exporter
        "precision": settings.precision,
        "source_sha256": source.weights_sha256,
        "architecture": source.architecture,
        "num_classes": source.num_classes,
        "preprocessing": source.spec.model_dump(),
        "calibration": fingerprint,
        # A bundle's labels live in the built model: two bundles of the same weights with
        # other labels are two entries.
        "labels_sha256": _labels_sha256(source),
        # ONNX Runtime int8 is built with 7-bit weights on hosts without VNNI (build.py).
        "reduce_range": settings.runtime == "onnxruntime" and not has_vnni(),
    }


def _labels_sha256(source: ModelSource) -> str | None:
    if source.bundle is None:
        return None
    try:
        return sha256_file(source.bundle / LABELS)
    except OSError:
        return None


def find_or_build(settings: Settings) -> Path:
    """The cached OpenVINO/ONNX model for ``settings``, built first on a miss."""
    source = _source(settings)
    calibration, holdout = calibration_and_holdout(settings.calibration_dir, source.bundle)
    fingerprint = calibration.fingerprint(source.spec) if settings.precision == "int8" else None
    key = artifact_key(_key_parts(settings, source, fingerprint))
    folder = cache_folder(
        settings.model_cache_dir, settings.runtime, settings.precision, source.architecture, key
    )
    if find_cached(folder, source.weights_sha256) is not None:
        log.info("%s %s model found in the cache: %s", settings.runtime, settings.precision, folder)
        return folder
    ensure_writable(settings.model_cache_dir, f"{settings.runtime} {settings.precision} model")
    with needs_torch(f"building the {settings.runtime} {settings.precision} model"):
        from resnet_service.model.export import build_artifact, labels_of

    with _build_lock(folder):  # workers loading one new version build it once
        if find_cached(folder, source.weights_sha256) is not None:
            return folder
        build_artifact(
            settings,
            source,
            labels_of(source),
            folder,
            key,
            (calibration, fingerprint) if fingerprint else None,
            holdout,
        )
    return folder


def _build_lock(folder: Path) -> AbstractContextManager[None]:
    """One builder per cache entry across processes (an flock beside the entry): the second
    waits, then finds the first one's build."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    return file_lock(folder.parent / f".{folder.name}.lock")


def effective(settings: Settings) -> Settings:
    """An int8 torch bundle (``quantize --bundle``'s output) runs on torch unless another
    runtime was asked for explicitly (then building refuses it, saying why)."""
    if settings.bundle_path is None or "runtime" in settings.model_fields_set:
        return settings
    from resnet_service.model.manifest import read_manifest

    if read_manifest(settings.bundle_path).precision == "int8":
        log.info("%s is an int8 torch bundle: serving it on torch", settings.bundle_path)
        return settings.model_copy(update={"runtime": "torch"})
    return settings


def prepare(settings: Settings) -> Prepared:
    """Build (or verify) what ``open_served_model`` will load, so workers only load it."""
    settings = effective(settings)
    if settings.runtime == "torch" and settings.artifact_path is None:
        with needs_torch("the torch runtime"):
            from resnet_service.model.torch_network import load_model

        info = load_model(settings).info
        return Prepared(
            name=info.name,
            runtime="torch",
            precision=info.precision,
            weights_sha256=info.weights_sha256,
            random_weights=info.random_weights,
            artifact=None,
        )
    folder = settings.artifact_path or find_or_build(settings)
    manifest, _ = read_artifact(folder)
    return Prepared(
        name=manifest.name,
        runtime=manifest.runtime,
        precision=manifest.precision,
        weights_sha256=manifest.source_weights_sha256,
        random_weights=manifest.random_weights,
        artifact=str(folder),
    )


def load_artifact(folder: Path, settings: Settings) -> ServedModel:
    """Open a built OpenVINO/ONNX model: torch-free."""
    started = time.perf_counter()
    manifest, labels = read_artifact(folder)
    _check_matches(manifest, settings, folder)
    threads = threads_per_worker(settings.inference_threads, settings.workers or 1)
    runtime = open_runtime(
        manifest.runtime,
        manifest.precision,
        folder / manifest.model_file,
        threads,
        pixels=manifest.preprocessing,
    )
    info = loaded_model_info(
        manifest,
        runtime=manifest.runtime,
        runtime_version=manifest.runtime_version,
        weights=WeightsFound(
            source=manifest.weights_source,
            sha256=manifest.source_weights_sha256,
            matches_published_hash=manifest.weights_matches_published_hash,
        ),
        fidelity=manifest.fidelity,
        int8_cache=str(folder),
        started=started,
    )
    _warn_if_measured_elsewhere(manifest.precision, manifest.fidelity)
    return ServedModel(
        runtime=runtime,
        labels=labels,
        spec=manifest.preprocessing,
        info=info,
        head=read_head(folder, manifest),
    )


def _warn_if_measured_elsewhere(precision: Precision, fidelity: Fidelity | None) -> None:
    """An int8 artifact's fidelity holds for the instruction-set level it was measured at; a
    cache shared by hosts of other kinds serves it unmeasured here (``/model`` says both)."""
    here = measured_here()
    there = fidelity.measured_on if fidelity is not None else None
    if precision == "int8" and there is not None and there.isa != here.isa:
        log.warning(
            "int8 fidelity was measured at %s (%s); this host runs at %s (%s), where the "
            "runtime picks other kernels: run `quantize` here to measure it",
            there.isa,
            there.cpu,
            here.isa,
            here.cpu,
        )


def _check_matches(manifest: ArtifactManifest, settings: Settings, folder: Path) -> None:
    """An explicit artifact decides runtime and precision; a conflicting setting is an error."""
    for field, have in (("runtime", manifest.runtime), ("precision", manifest.precision)):
        wanted = getattr(settings, field)
        if field in settings.model_fields_set and wanted != have:
            raise BundleInvalid(
                f"{folder} is a {manifest.runtime} {manifest.precision} model, but "
                f"RESNET_SERVICE_{field.upper()}={wanted}; unset it or give a matching model"
            )


def open_served_model(settings: Settings, artifact: Path | None = None) -> ServedModel:
    """Load (building first where needed) the model for ``settings.runtime``."""
    settings = effective(settings)
    if settings.runtime == "torch" and settings.artifact_path is None:
        with needs_torch("the torch runtime"):
            from resnet_service.model.torch_network import load_model

        return load_model(settings)
    folder = artifact or settings.artifact_path or find_or_build(settings)
    return load_artifact(folder, settings)
