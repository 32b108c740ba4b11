"""``quantize``: settings -> an int8 model in a folder that ``serve`` accepts, one shape for
every runtime. OpenVINO and ONNX Runtime build an artifact (``--artifact``); torch writes an
int8 bundle (``--bundle``); both come from the model cache, built there on a miss."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from resnet_service.config import RuntimeName, Settings
from resnet_service.core.model_info import Fidelity, QuantizationInfo
from resnet_service.model.artifacts import read_artifact
from resnet_service.model.served import find_or_build, needs_torch


class Int8Built(BaseModel):
    """What ``quantize`` made and how: the folder, its kind and its figures."""

    name: str
    runtime: RuntimeName
    runtime_version: str
    weights_sha256: str = Field(description="Of the fp32 (or official int8) source weights.")
    random_weights: bool
    int8_cache: Path = Field(description="The cache entry: a folder `serve` accepts as is.")
    serve_with: Literal["--bundle", "--artifact"]
    seconds: float = Field(description="Building it (or loading it from the cache: torch).")
    quantization: QuantizationInfo | None
    fidelity: Fidelity | None = Field(description="Agreement with the fp32 torch model.")


def build_int8(settings: Settings) -> Int8Built:
    """The int8 model for ``settings.runtime``, from the cache or built into it."""
    settings = settings.model_copy(update={"precision": "int8"})
    if settings.runtime == "torch":
        with needs_torch("the torch runtime"):
            from resnet_service.model.torch_network import torch_int8_bundle

        info, folder = torch_int8_bundle(settings)
        quant = info.quantization
        return Int8Built(
            name=info.name,
            runtime="torch",
            runtime_version=info.runtime_version,
            weights_sha256=info.weights_sha256,
            random_weights=info.random_weights,
            int8_cache=folder,
            serve_with="--bundle",
            seconds=info.load_seconds,
            quantization=quant,
            fidelity=quant.fidelity if quant else None,  # torch keeps it with its recipe
        )
    folder = find_or_build(settings)
    manifest, _ = read_artifact(folder)
    return Int8Built(
        name=manifest.name,
        runtime=manifest.runtime,
        runtime_version=manifest.runtime_version,
        weights_sha256=manifest.source_weights_sha256,
        random_weights=manifest.random_weights,
        int8_cache=folder,
        serve_with="--artifact",
        seconds=manifest.build_seconds,
        quantization=manifest.quantization,
        fidelity=manifest.fidelity,
    )
