"""What a served model is, as data: bundle manifests, quantization records, provenance.

Torch-free on purpose: a serving worker on a torch-free runtime reads these (``/model``, the
``model`` block of responses) without importing torch; ``bundle.py`` adds the weights I/O.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from resnet_service.config import Precision
from resnet_service.core.errors import BundleInvalid
from resnet_service.core.images import PreprocessSpec
from resnet_service.core.model_info import Fidelity as Fidelity  # re-exported
from resnet_service.core.model_info import ModelInfo as ModelInfo  # re-exported
from resnet_service.core.model_info import QuantizationInfo as QuantizationInfo  # re-exported
from resnet_service.core.model_info import WeightsSource as WeightsSource  # re-exported

MANIFEST: Final = "bundle.json"
WEIGHTS: Final = "weights.pt"
LABELS: Final = "labels.json"
FORMAT_VERSION: Final = 1
#: Architectures a bundle may name (the builders live in ``architecture.py``, with torch).
ARCHITECTURES: Final = ("resnet18", "resnet50")


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


def read_labels(directory: Path, num_classes: int) -> list[str]:
    """The class names, one per output."""
    try:
        labels = json.loads((directory / LABELS).read_text())
    except (OSError, ValueError) as exc:
        raise BundleInvalid(f"{directory / LABELS} is unreadable: {exc}") from None
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise BundleInvalid(f"{directory / LABELS} must be a JSON list of strings")
    if len(labels) != num_classes:
        raise BundleInvalid(f"{len(labels)} labels for {num_classes} classes")
    return labels


def ensure_writable(directory: Path, what: str) -> None:
    """Fail early and clearly when ``directory`` (the model cache) cannot take a new entry.

    Probed by creating and removing a folder: permission bits alone do not tell (root ignores
    them; a read-only mount does not show in them)."""
    import tempfile

    from resnet_service.core.errors import CacheUnwritable

    try:
        directory.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=".write-probe-", dir=directory)).rmdir()
    except OSError as exc:
        raise CacheUnwritable(
            f"The model cache {directory} cannot be written ({exc.strerror}) and holds no "
            f"{what} for these settings. Point RESNET_SERVICE_MODEL_CACHE_DIR (--cache-dir) at a "
            "writable folder, or build the model ahead of time where the cache is writable "
            "(`resnet-service quantize` with the same settings) and ship that folder."
        ) from None
