"""A model repository on disk, read: ``DIR/<model>/<version>/`` and ``DIR/<model>/config.json``.

Triton's layout, with what ``serve`` already accepts as a version: a bundle (``bundle.json``,
from ``finetune``), a built model (``artifact.json``, from ``quantize --out``) or a small
``model.json`` naming fp32 weights. Versions are positive integers; anything else in a model's
folder (``.3.tmp``, ``3.partial``) is ignored, so a publisher writes a version under a
temporary name and renames it into place. Torch-free: workers read this.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from resnet_service.config import Precision, RuntimeName, Settings
from resnet_service.core.errors import BundleInvalid
from resnet_service.model.artifacts import ARTIFACT_MANIFEST
from resnet_service.model.manifest import MANIFEST as BUNDLE_MANIFEST
from resnet_service.model.tag_rules_file import RULES_FILE

MODEL_CONFIG: Final = "config.json"
WEIGHTS_CONFIG: Final = "model.json"
#: Model names become URL path parts and metric labels: short, plain.
NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_VERSION_PATTERN: Final = re.compile(r"^[1-9][0-9]{0,8}$")

VersionKind = Literal["bundle", "artifact", "weights"]


class Latest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_versions: int = Field(1, ge=1, le=100)


class Specific(BaseModel):
    model_config = ConfigDict(extra="forbid")
    versions: list[int] = Field(min_length=1)


class VersionPolicy(BaseModel):
    """Triton's version policy: one of ``latest`` (the N highest), ``all`` or ``specific``."""

    model_config = ConfigDict(extra="forbid")
    latest: Latest | None = None
    all: dict[str, object] | None = None
    specific: Specific | None = None

    def choose(self, versions: list[int]) -> list[int]:
        """The versions to serve among those on disk, highest first."""
        ordered = sorted(versions, reverse=True)
        if self.all is not None:
            return ordered
        if self.specific is not None:
            return [v for v in ordered if v in self.specific.versions]
        return ordered[: (self.latest or Latest()).num_versions]


class ShadowConfig(BaseModel):
    """``shadow`` in a model's config: run a fraction of its requests on another version too,
    compare the answers (never returned), and stop that version's traffic share when they
    agree too little."""

    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1)
    fraction: float = Field(0.1, gt=0, le=1)
    #: The stop rule: top-1 agreement below this over a full window (None: no rule).
    min_agreement: float | None = Field(None, ge=0, le=1)
    window: int = Field(200, ge=10, le=100_000)


class ModelConfig(BaseModel):
    """``DIR/<model>/config.json``: every field optional; the replica's settings fill in."""

    model_config = ConfigDict(extra="forbid")
    version_policy: VersionPolicy = VersionPolicy()
    runtime: RuntimeName | None = None
    precision: Precision | None = None
    max_batch_size: int | None = Field(None, ge=1, le=256)
    max_batch_wait_ms: float | None = Field(None, ge=0, le=1000)
    queue_capacity: int | None = Field(None, ge=1, le=100_000)
    default_top_k: int | None = Field(None, ge=1, le=1000)
    #: Display names of labels (``{"n01440764": "tench"}``); unnamed labels stay as they are.
    display_names: dict[str, str] = Field(default_factory=dict)
    #: Models on demand: keep this model loaded (loaded at start, never evicted or expired).
    pinned: bool = False
    #: Weights of versions for requests that name none (``{"2": 90, "1": 10}``: a canary).
    traffic: dict[int, float] = Field(default_factory=dict)
    shadow: ShadowConfig | None = None

    @field_validator("traffic")
    @classmethod
    def _weights(cls, traffic: dict[int, float]) -> dict[int, float]:
        if any(version < 1 for version in traffic):
            raise ValueError("traffic names versions by number (1 and up)")
        if any(weight < 0 for weight in traffic.values()):
            raise ValueError("traffic weights must not be negative")
        if traffic and sum(traffic.values()) <= 0:
            raise ValueError("traffic weights must not all be 0")
        return traffic


class WeightsConfig(BaseModel):
    """``model.json`` in a version folder: fp32 torchvision-layout weights to build from."""

    model_config = ConfigDict(extra="forbid")
    #: A ``.pth`` state_dict, relative to the version folder or absolute; absent: the
    #: published ImageNet weights (hub cache or download, as the replica's settings allow).
    weights_path: str | None = None
    allow_random_weights: bool = False


@dataclass(frozen=True, slots=True)
class VersionDir:
    """One version folder as found on disk."""

    model: str
    version: int
    path: Path
    kind: VersionKind
    #: Changes when the folder is replaced (inode and mtime): a new build, not the same one.
    stamp: str


@dataclass(frozen=True, slots=True)
class RepositoryModel:
    """One model folder: its config (or why it is unreadable) and its versions on disk."""

    name: str
    config: ModelConfig
    versions: tuple[VersionDir, ...]
    problem: str | None = None

    def wanted(self) -> list[VersionDir]:
        """The versions its policy serves, and those its traffic split and shadow name,
        highest first."""
        if self.problem is not None:
            return []
        shadow = self.config.shadow.version if self.config.shadow is not None else None
        # The policy chooses among the others: a shadow never serves in their place.
        served = [v.version for v in self.versions if v.version != shadow]
        chosen = set(self.config.version_policy.choose(served)) | set(self.config.traffic)
        if shadow is not None:
            chosen.add(shadow)
        return sorted(
            (v for v in self.versions if v.version in chosen),
            key=lambda v: v.version,
            reverse=True,
        )


def _kind(path: Path) -> VersionKind | None:
    if (path / ARTIFACT_MANIFEST).is_file():
        return "artifact"
    if (path / BUNDLE_MANIFEST).is_file():
        return "bundle"
    if (path / WEIGHTS_CONFIG).is_file():
        return "weights"
    return None


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_ino}:{st.st_mtime_ns}"


def read_config(folder: Path) -> ModelConfig:
    file = folder / MODEL_CONFIG
    if not file.exists():
        return ModelConfig()
    try:
        return ModelConfig.model_validate_json(file.read_text())
    except (OSError, ValidationError, ValueError) as exc:
        raise BundleInvalid(f"{file} is invalid: {exc}") from None


def read_model(folder: Path) -> RepositoryModel:
    """One model folder; a bad config is reported, not raised (the others still serve)."""
    versions = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not (entry.is_dir() and _VERSION_PATTERN.match(entry.name)):
            continue  # temporary names, files: not (yet) a version
        path = Path(entry.path)
        kind = _kind(path)
        if kind is not None:
            versions.append(VersionDir(folder.name, int(entry.name), path, kind, _stamp(path)))
    try:
        config = read_config(folder)
    except BundleInvalid as exc:
        return RepositoryModel(folder.name, ModelConfig(), tuple(versions), exc.detail)
    return RepositoryModel(folder.name, config, tuple(versions))


def scan(root: Path) -> dict[str, RepositoryModel]:
    """Every model folder of the repository, by name (folders with other names are skipped)."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise BundleInvalid(f"cannot read the model repository {root}: {exc.strerror}") from None
    return {
        e.name: read_model(Path(e.path))
        for e in entries
        if e.is_dir() and NAME_PATTERN.match(e.name)
    }


def _weights_update(version: VersionDir) -> dict[str, object]:
    file = version.path / WEIGHTS_CONFIG
    try:
        config = WeightsConfig.model_validate_json(file.read_text())
    except (OSError, ValidationError, ValueError) as exc:
        raise BundleInvalid(f"{file} is invalid: {exc}") from None
    update: dict[str, object] = {"allow_random_weights": config.allow_random_weights}
    if config.weights_path is not None:
        weights = version.path / config.weights_path
        if not weights.is_file():
            raise BundleInvalid(f"{file} names {config.weights_path}, which does not exist")
        update["weights_path"] = weights
    return update


def version_rules_file(version: VersionDir) -> Path:
    """Where a version's tag rules file is, or would be once written."""
    return version.path / RULES_FILE


def version_settings(base: Settings, model: RepositoryModel, version: VersionDir) -> Settings:
    """The replica's settings as they apply to one version: its source, and what the model's
    config overrides (set explicitly, so that building and loading treat them as choices)."""
    # Explicit Nones: a worker's environment names the repository, which a version is not.
    update: dict[str, object] = {
        "model_repository": None,
        "repository_control": "none",
        "model_memory_budget_mb": None,
        "model_idle_ttl_s": None,
    }
    # A version's tag rules live in its folder, whatever its kind (the replica's file is not
    # every model's).
    rules = version_rules_file(version)
    update["tag_rules"] = rules if rules.is_file() else None
    if version.kind == "artifact":
        update["artifact_path"] = version.path
    elif version.kind == "bundle":
        update["bundle_path"] = version.path
    else:
        update.update(_weights_update(version))
    config = model.config
    overridable = ("runtime", "precision", "max_batch_size", "max_batch_wait_ms")
    for name in (*overridable, "queue_capacity", "default_top_k"):
        if (value := getattr(config, name)) is not None:
            update[name] = value
    fields = {**base.model_dump(exclude_unset=True), **update}
    try:
        return Settings(**fields)
    except ValidationError as exc:
        raise BundleInvalid(f"{model.name} version {version.version}: {exc}") from None


def publish_version(source: Path, root: Path, name: str, version: int | None = None) -> Path:
    """Copy a bundle or built model into ``root/name/<next version>`` atomically: copied under
    a temporary name, then renamed into place, so ``poll`` never sees half a version."""
    import shutil

    if not NAME_PATTERN.match(name):
        raise BundleInvalid(f"model name {name!r}: letters, digits, '_', '.', '-' (at most 64)")
    if _kind(source) not in ("bundle", "artifact"):
        raise BundleInvalid(f"{source} is neither a bundle (bundle.json) nor a built model")
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    have = [v.version for v in read_model(folder).versions]
    number = version or max(have, default=0) + 1
    final = folder / str(number)
    if final.exists():
        raise BundleInvalid(f"{final} exists: versions are never overwritten, publish a new one")
    staging = folder / f".{number}.{os.getpid()}.tmp"
    shutil.copytree(source, staging)
    os.rename(staging, final)
    return final
