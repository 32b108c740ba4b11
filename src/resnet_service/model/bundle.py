"""A model bundle: one directory holding everything needed to serve a model.

``bundle.json`` (the manifest below), ``weights.pt`` (a state_dict, loaded with
``weights_only=True``) and ``labels.json``. Fine-tuning writes one, quantization writes one
(the int8 cache is a bundle too), and the service serves one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Final, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from resnet_service.config import Precision
from resnet_service.errors import BundleInvalid
from resnet_service.images import PreprocessSpec
from resnet_service.model.architecture import (
    ARCHITECTURES,
    build_fp32,
    build_int8_skeleton,
    quiet_quantization_warnings,
)
from resnet_service.model.weights import StateDict, load_state_dict_file, sha256_file

MANIFEST: Final = "bundle.json"
WEIGHTS: Final = "weights.pt"
LABELS: Final = "labels.json"
FORMAT_VERSION: Final = 1


class Fidelity(BaseModel):
    """How closely the int8 model follows its fp32 source on held-out images."""

    images: int = Field(ge=0)
    top1_agreement: float = Field(ge=0, le=1)
    max_abs_prob_diff: float = Field(ge=0, le=1)
    mean_abs_logit_rel_error: float = Field(ge=0)
    image_source: str
    fp32_accuracy: float | None = Field(None, description="When the images have labels.")
    int8_accuracy: float | None = None


class QuantizationInfo(BaseModel):
    """How an int8 model was made."""

    method: Literal["static_ptq", "official"]
    engine: str
    qconfig: str
    calibration_source: str | None = None
    calibration_images: int = 0
    calibration_fingerprint: str | None = None
    source_weights_sha256: str | None = None
    seconds: float | None = None
    fidelity: Fidelity | None = None


class BundleManifest(BaseModel):
    """The contents of ``bundle.json``."""

    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = FORMAT_VERSION
    name: str = Field(min_length=1, max_length=200)
    architecture: str
    num_classes: int = Field(ge=2, le=100_000)
    precision: Precision
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    preprocessing: PreprocessSpec = PreprocessSpec()
    random_weights: bool = False
    quantization: QuantizationInfo | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)


def write_bundle(
    directory: Path, manifest: BundleManifest, state_dict: StateDict, labels: list[str]
) -> BundleManifest:
    """Write atomically (a temp dir renamed into place); returns the manifest with the sha256."""
    if len(labels) != manifest.num_classes:
        raise BundleInvalid(f"{len(labels)} labels for {manifest.num_classes} classes")
    refuse_to_overwrite(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        torch.save(state_dict, tmp / WEIGHTS)
        final = manifest.model_copy(update={"weights_sha256": sha256_file(tmp / WEIGHTS)})
        (tmp / LABELS).write_text(json.dumps(labels, ensure_ascii=False, indent=0))
        (tmp / MANIFEST).write_text(final.model_dump_json(indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def refuse_to_overwrite(directory: Path) -> None:
    """A bundle may replace a bundle or fill an empty folder, never clobber anything else
    (``--out data`` must not wipe the training data)."""
    if directory.exists() and (
        not directory.is_dir()
        or (any(directory.iterdir()) and not (directory / MANIFEST).is_file())
    ):
        raise BundleInvalid(
            f"{directory} exists and is not a model bundle; choose an empty or new folder"
        )


def copy_bundle(source: Path, directory: Path) -> None:
    """Replace ``directory`` with a copy of the bundle at ``source`` (same rules as writing)."""
    refuse_to_overwrite(directory)
    if directory.exists():
        shutil.rmtree(directory)
    shutil.copytree(source, directory)


def read_manifest(directory: Path) -> BundleManifest:
    """Parse and validate ``bundle.json``."""
    path = directory / MANIFEST
    try:
        manifest = BundleManifest.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise BundleInvalid(f"{directory} is not a model bundle: {MANIFEST} is missing") from None
    except (OSError, ValidationError, ValueError) as exc:
        raise BundleInvalid(f"{path} is invalid: {exc}") from None
    if manifest.architecture not in ARCHITECTURES:
        raise BundleInvalid(f"{path}: unsupported architecture {manifest.architecture!r}")
    return manifest


def read_labels(directory: Path, manifest: BundleManifest) -> list[str]:
    """The class names, one per output."""
    try:
        labels = json.loads((directory / LABELS).read_text())
    except (OSError, ValueError) as exc:
        raise BundleInvalid(f"{directory / LABELS} is unreadable: {exc}") from None
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise BundleInvalid(f"{directory / LABELS} must be a JSON list of strings")
    if len(labels) != manifest.num_classes:
        raise BundleInvalid(f"{len(labels)} labels for {manifest.num_classes} classes")
    return labels


def read_weights(directory: Path, manifest: BundleManifest) -> StateDict:
    """The state_dict, after checking its sha256 against the manifest (corruption guard)."""
    path = directory / WEIGHTS
    if not path.is_file():
        raise BundleInvalid(f"{path} is missing")
    digest = sha256_file(path)
    if digest != manifest.weights_sha256:
        raise BundleInvalid(
            f"{path} sha256 {digest[:12]}... does not match the manifest's "
            f"{manifest.weights_sha256[:12]}...: the file is corrupt or was replaced"
        )
    with quiet_quantization_warnings():
        return load_state_dict_file(path)


def instantiate(manifest: BundleManifest, state_dict: StateDict) -> torch.nn.Module:
    """Build the network the manifest describes and load its weights (eval mode)."""
    if manifest.precision == "int8":
        qconfig = manifest.quantization.qconfig if manifest.quantization else "x86"
        model = build_int8_skeleton(manifest.architecture, manifest.num_classes, qconfig)
    else:
        model = build_fp32(manifest.architecture, manifest.num_classes)
    try:
        with quiet_quantization_warnings():
            model.load_state_dict(state_dict)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise BundleInvalid(f"weights do not fit {manifest.architecture}: {exc}") from None
    return model.eval()
