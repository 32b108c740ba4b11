"""What a served model is, as the core and every face see it: provenance, how it was quantized,
how closely it follows its fp32 source. Plain data (pydantic), torch-free."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from resnet_service.config import Precision, RuntimeName
from resnet_service.cpus import cpu_name, isa_in_effect

log = logging.getLogger(__name__)


class WeightsSource(StrEnum):
    """How the served weights were found; reported by /model and in logs."""

    EXPLICIT_PATH = "explicit_path"
    HUB_CACHE = "hub_cache"
    DOWNLOAD = "download"
    BUNDLE = "bundle"
    RANDOM = "random"


class MeasuredOn(BaseModel):
    """A host's CPU and the oneDNN instruction-set level its int8 kernels ran at: int8
    numbers measured at one level do not carry to another (the runtimes pick other kernels)."""

    cpu: str
    isa: str = Field(description="oneDNN level (ONEDNN_MAX_CPU_ISA names, lower case).")


def measured_here() -> MeasuredOn:
    """This host, as a fidelity figure records where it was measured."""
    return MeasuredOn(cpu=cpu_name(), isa=isa_in_effect())


class Fidelity(BaseModel):
    """How closely a built model follows its fp32 torch source on held-out images."""

    images: int = Field(ge=0)
    top1_agreement: float = Field(ge=0, le=1)
    max_abs_prob_diff: float = Field(ge=0, le=1)
    mean_abs_logit_rel_error: float = Field(ge=0)
    image_source: str
    fp32_accuracy: float | None = Field(None, description="When the images have labels.")
    int8_accuracy: float | None = Field(
        None, description="Accuracy of the built model (int8, or fp32 on another runtime)."
    )
    measured_on: MeasuredOn | None = Field(
        None, description="Where these figures were measured (absent: before this was kept)."
    )


class QuantizationInfo(BaseModel):
    """How an int8 model was made."""

    method: Literal["static_ptq", "official", "nncf_ptq", "ort_static_qdq"]
    engine: str
    qconfig: str
    calibration_source: str | None = None
    calibration_images: int = 0
    calibration_fingerprint: str | None = None
    source_weights_sha256: str | None = None
    seconds: float | None = None
    fidelity: Fidelity | None = None


class ModelInfo(BaseModel):
    """What is being served and how it was made; shown by ``/model`` and ``info``."""

    name: str
    architecture: str
    num_classes: int
    precision: Precision
    runtime: RuntimeName
    runtime_version: str
    weights_source: WeightsSource
    weights_path: str | None
    weights_sha256: str
    weights_matches_published_hash: bool | None
    random_weights: bool
    quantization: QuantizationInfo | None
    fidelity: Fidelity | None = Field(
        None, description="Agreement with the fp32 torch model (runtimes other than torch)."
    )
    int8_cache: str | None
    provenance: dict[str, Any]
    load_seconds: float


class Described(Protocol):
    """What a model's manifest (a bundle or a built artifact) says about the model itself."""

    @property
    def name(self) -> str: ...
    @property
    def architecture(self) -> str: ...
    @property
    def num_classes(self) -> int: ...
    @property
    def precision(self) -> Precision: ...
    @property
    def random_weights(self) -> bool: ...
    @property
    def quantization(self) -> QuantizationInfo | None: ...
    @property
    def provenance(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class WeightsFound:
    """Where the weights came from, as this process found them."""

    source: WeightsSource
    sha256: str
    path: str | None = None
    matches_published_hash: bool | None = None


def loaded_model_info(
    manifest: Described,
    *,
    runtime: RuntimeName,
    runtime_version: str,
    weights: WeightsFound,
    fidelity: Fidelity | None,
    int8_cache: str | None,
    started: float,
) -> ModelInfo:
    """The one way a ModelInfo is made (every runtime): the manifest's description plus how
    this process found and loaded the model; logged once, as every load is."""
    info = ModelInfo(
        name=manifest.name,
        architecture=manifest.architecture,
        num_classes=manifest.num_classes,
        precision=manifest.precision,
        runtime=runtime,
        runtime_version=runtime_version,
        weights_source=weights.source,
        weights_path=weights.path,
        weights_sha256=weights.sha256,
        weights_matches_published_hash=weights.matches_published_hash,
        random_weights=manifest.random_weights,
        quantization=manifest.quantization,
        fidelity=fidelity,
        int8_cache=int8_cache,
        provenance=manifest.provenance,
        load_seconds=round(time.perf_counter() - started, 3),
    )
    log.info(
        "model %s (%s, %s %s) from %s, sha256 %s..., loaded in %.2fs%s",
        info.name,
        info.precision,
        info.runtime,
        info.runtime_version,
        info.weights_source.value,
        info.weights_sha256[:12],
        info.load_seconds,
        " [RANDOM WEIGHTS]" if info.random_weights else "",
    )
    return info
