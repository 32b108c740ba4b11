"""A model bundle: one directory holding everything needed to serve a model.

``bundle.json`` (the manifest below), ``weights.pt`` (a state_dict, loaded with
``weights_only=True``) and ``labels.json``. Fine-tuning writes one, quantization writes one
(the int8 cache is a bundle too), and the service serves one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from resnet_service.core.errors import BundleInvalid
from resnet_service.model.architecture import (
    build_fp32,
    build_int8_skeleton,
    quiet_quantization_warnings,
)
from resnet_service.model.artifacts import ARTIFACT_MANIFEST, staged
from resnet_service.model.manifest import LABELS as LABELS  # re-exported
from resnet_service.model.manifest import MANIFEST as MANIFEST  # re-exported
from resnet_service.model.manifest import WEIGHTS as WEIGHTS  # re-exported
from resnet_service.model.manifest import BundleManifest as BundleManifest  # re-exported
from resnet_service.model.manifest import Fidelity as Fidelity  # re-exported
from resnet_service.model.manifest import QuantizationInfo as QuantizationInfo  # re-exported
from resnet_service.model.manifest import read_labels as read_labels  # re-exported
from resnet_service.model.manifest import read_manifest as read_manifest  # re-exported
from resnet_service.model.weights import StateDict, load_state_dict_file, sha256_file


def write_bundle(
    directory: Path, manifest: BundleManifest, state_dict: StateDict, labels: list[str]
) -> BundleManifest:
    """Write atomically (a temp dir renamed into place); returns the manifest with the sha256."""
    if len(labels) != manifest.num_classes:
        raise BundleInvalid(f"{len(labels)} labels for {manifest.num_classes} classes")
    refuse_to_overwrite(directory)
    with staged(directory) as tmp:
        torch.save(state_dict, tmp / WEIGHTS)
        final = manifest.model_copy(update={"weights_sha256": sha256_file(tmp / WEIGHTS)})
        (tmp / LABELS).write_text(json.dumps(labels, ensure_ascii=False, indent=0))
        (tmp / MANIFEST).write_text(final.model_dump_json(indent=2))
    return final


def refuse_to_overwrite(directory: Path) -> None:
    """A bundle may replace a bundle or fill an empty folder, never clobber anything else
    (``--out data`` must not wipe the training data)."""
    is_model = (directory / MANIFEST).is_file() or (directory / ARTIFACT_MANIFEST).is_file()
    if directory.exists() and (
        not directory.is_dir() or (any(directory.iterdir()) and not is_model)
    ):
        raise BundleInvalid(
            f"{directory} exists and is not a model bundle; choose an empty or new folder"
        )


def copy_bundle(source: Path, directory: Path) -> None:
    """Replace ``directory`` with a copy of the bundle (or built model) at ``source`` (same
    rules as writing)."""
    refuse_to_overwrite(directory)
    if directory.exists():
        shutil.rmtree(directory)
    shutil.copytree(source, directory)


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
