"""Built models for the torch-free runtimes (OpenVINO IR, ONNX), cached on disk.

An artifact is a folder: ``artifact.json`` (what it is, how it was made, the sha256 of each
file, its measured fidelity), ``labels.json``, the model files and ``head.npz`` (the
classifier's fp32 weights, for class activation maps; absent from older artifacts). Its cache key covers
everything that changes the result: the source weights' sha256, the runtime and its version,
the precision, the preprocessing, the calibration images and the quantization settings.
Entries are written atomically (a temp folder renamed into place) and checked on load: a
corrupt entry, or one made from other weights, is rejected (and rebuilt when the cache is
writable). Torch-free: serving processes only read these.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from resnet_service.config import Precision, RuntimeName
from resnet_service.core.errors import BundleInvalid
from resnet_service.core.images import PreprocessSpec
from resnet_service.core.runtime import Head
from resnet_service.model.hub import sha256_file
from resnet_service.model.manifest import (
    LABELS,
    Fidelity,
    QuantizationInfo,
    WeightsSource,
    read_labels,
)

log = logging.getLogger(__name__)

ARTIFACT_MANIFEST: Final = "artifact.json"
FORMAT_VERSION: Final = 1
#: The model file each runtime loads (OpenVINO's weights sit beside it in ``model.bin``).
MODEL_FILES: Final[dict[str, str]] = {"openvino": "model.xml", "onnxruntime": "model.onnx"}
HEAD_FILE: Final = "head.npz"


class ArtifactManifest(BaseModel):
    """The contents of ``artifact.json``."""

    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = FORMAT_VERSION
    key: str
    runtime: RuntimeName
    runtime_version: str
    precision: Precision
    name: str
    architecture: str
    num_classes: int = Field(ge=2)
    preprocessing: PreprocessSpec
    random_weights: bool
    weights_source: WeightsSource
    weights_matches_published_hash: bool | None = None
    source_weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    files: dict[str, str] = Field(description="File name -> sha256.")
    quantization: QuantizationInfo | None = None
    fidelity: Fidelity | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)
    build_seconds: float = 0.0

    @property
    def model_file(self) -> str:
        return MODEL_FILES[self.runtime]


def artifact_key(parts: dict[str, Any]) -> str:
    """Everything that changes the built model, hashed."""
    payload = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def cache_folder(
    cache_dir: Path, runtime: str, precision: str, architecture: str, key: str
) -> Path:
    return cache_dir / f"{runtime}-{precision}-{architecture}-{key}"


def read_artifact(directory: Path) -> tuple[ArtifactManifest, list[str]]:
    """The manifest and labels of an artifact, every file's sha256 checked."""
    path = directory / ARTIFACT_MANIFEST
    try:
        manifest = ArtifactManifest.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise BundleInvalid(
            f"{directory} is not a built model: {ARTIFACT_MANIFEST} is missing"
        ) from None
    except (OSError, ValidationError, ValueError) as exc:
        raise BundleInvalid(f"{path} is invalid: {exc}") from None
    if manifest.model_file not in manifest.files:
        raise BundleInvalid(f"{path} lists no {manifest.model_file}")
    for name, expected in manifest.files.items():
        file = directory / name
        if not file.is_file():
            raise BundleInvalid(f"{file} is missing")
        if sha256_file(file) != expected:
            raise BundleInvalid(f"{file} does not match its sha256: corrupt or replaced")
    return manifest, read_labels(directory, manifest.num_classes)


def find_cached(directory: Path, source_sha256: str) -> tuple[ArtifactManifest, list[str]] | None:
    """A valid cached artifact made from ``source_sha256``, or None (a bad entry is removed
    when it can be: it will be rebuilt)."""
    if not directory.exists():
        return None
    try:
        manifest, labels = read_artifact(directory)
        if manifest.source_weights_sha256 != source_sha256:
            raise BundleInvalid("made from other weights")
    except BundleInvalid as exc:
        log.warning("cached model %s rejected (%s); rebuilding", directory, exc.detail)
        shutil.rmtree(directory, ignore_errors=True)
        return None
    return manifest, labels


@contextmanager
def staged(directory: Path) -> Iterator[Path]:
    """A temp folder beside ``directory`` that replaces it when the block succeeds (an atomic
    rename: readers see the old entry or the new one, never half of one)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield tmp
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def seal(folder: Path, manifest: ArtifactManifest, labels: list[str]) -> ArtifactManifest:
    """Write the labels and the manifest, with the sha256 of every file in ``folder``."""
    (folder / LABELS).write_text(json.dumps(labels, ensure_ascii=False, indent=0))
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
    final = manifest.model_copy(update={"files": files})
    (folder / ARTIFACT_MANIFEST).write_text(final.model_dump_json(indent=2))
    return final


def write_head(folder: Path, head: Head) -> None:
    """The classifier's fp32 weights beside the model (sealed with the other files)."""
    with (folder / HEAD_FILE).open("wb") as out:
        np.savez(out, weight=head.weight, bias=head.bias)


def read_head(folder: Path, manifest: ArtifactManifest) -> Head | None:
    """The classifier's weights (checked by ``read_artifact``), or None for an artifact built
    before they were kept. Plain arrays only: pickles are refused."""
    if HEAD_FILE not in manifest.files:
        return None
    try:
        with np.load(folder / HEAD_FILE, allow_pickle=False) as saved:
            weight, bias = saved["weight"].astype(np.float32), saved["bias"].astype(np.float32)
    except (OSError, KeyError, ValueError) as exc:
        raise BundleInvalid(f"{folder / HEAD_FILE} is unreadable: {exc}") from None
    if weight.shape != (manifest.num_classes, weight.shape[-1]) or bias.shape != (
        manifest.num_classes,
    ):
        raise BundleInvalid(
            f"{folder / HEAD_FILE} holds a {weight.shape} classifier for "
            f"{manifest.num_classes} classes"
        )
    return Head(weight=weight, bias=bias)
