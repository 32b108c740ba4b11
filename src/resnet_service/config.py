"""One settings class for the service, the CLI and the tests (env prefix ``RESNET_SERVICE_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from PIL import Image
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "RESNET_SERVICE_"
Precision = Literal["int8", "fp32"]


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "resnet-service"


class Settings(BaseSettings):
    """Every knob of resnet-service; each field is bounded and refused at start-up when invalid."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, frozen=True
    )

    # --- model -----------------------------------------------------------------------------
    weights_path: Path | None = Field(
        None,
        description="ResNet18 fp32 state_dict (.pth) to serve; first in the resolution order, "
        "before the torch hub cache and a download.",
    )
    bundle_path: Path | None = Field(
        None,
        description="A model bundle directory (e.g. written by `resnet-service finetune`) to "
        "serve instead of the default ImageNet model.",
    )
    model_cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Where quantized (int8) models are cached, keyed by the fp32 weights' "
        "sha256 and the quantization settings.",
    )
    precision: Precision = Field("int8", description="Inference precision: int8 or fp32.")
    calibration_dir: Path | None = Field(
        None,
        description="Images to calibrate int8 quantization on; default: the built-in set "
        "(or a bundle's own training images).",
    )
    allow_downloads: bool = Field(
        True, description="Download the official weights (hash-checked) when none are on disk."
    )
    allow_random_weights: bool = Field(
        False,
        description="DEVELOPMENT ONLY: serve seeded random weights when no weights can be found. "
        "Every prediction then says random_weights=true.",
    )

    # --- engine ----------------------------------------------------------------------------
    torch_threads: int = Field(
        0,
        ge=0,
        le=256,
        description="Torch intra-op threads per worker; 0 = usable CPUs (affinity and cgroup "
        "quota) divided by the number of workers.",
    )
    decode_threads: int = Field(
        0, ge=0, le=256, description="Image decode threads per worker; 0 = same as torch threads."
    )
    max_batch_size: int = Field(16, ge=1, le=256, description="Largest micro-batch.")
    max_batch_wait_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="How long a forming batch may wait for more requests once others are "
        "already queued; a lone request never waits.",
    )
    queue_capacity: int = Field(
        256, ge=1, le=100_000, description="Requests waiting for the model; beyond it: 503."
    )
    request_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Deadline per request; queued work past it is dropped."
    )

    # --- input limits ----------------------------------------------------------------------
    max_upload_bytes: int = Field(
        20 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024, description="Largest accepted image."
    )
    max_pixels: int = Field(
        40_000_000,
        ge=1,
        le=Image.MAX_IMAGE_PIXELS or 89_478_485,
        description="Largest accepted width*height, checked from the header before decoding "
        "(below Pillow's own decompression-bomb limit, which stays on).",
    )
    default_top_k: int = Field(5, ge=1, le=1000, description="top_k when a request gives none.")
    max_top_k: int = Field(
        1000, ge=1, le=100_000, description="Largest top_k (also capped by the class count)."
    )
    max_batch_files: int = Field(
        64, ge=1, le=1024, description="Most images in one /classify/batch request."
    )
    max_batch_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        le=4 * 1024 * 1024 * 1024,
        description="Largest /classify/batch request body, all images together.",
    )

    max_buffered_upload_bytes: int = Field(
        512 * 1024 * 1024,
        ge=1024 * 1024,
        le=64 * 1024 * 1024 * 1024,
        description="Upload bytes held in memory by all requests together; beyond it new "
        "uploads get 503 (bounds memory under many concurrent uploads).",
    )

    # --- HTTP ------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", min_length=1, description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0 = any free port).")
    workers: int = Field(
        0,
        ge=0,
        le=64,
        description="Worker processes of `serve`, each with its own engine and CPUs/N torch "
        "threads; 0 = one per usable CPU (the layout the benchmark found fastest), at most 8.",
    )
    auth_token: SecretStr | None = Field(
        None, description="When set, inference routes require `Authorization: Bearer <token>`."
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, le=3600, description="On SIGTERM, time given to finish accepted requests."
    )
    drain_delay_s: float = Field(
        0.0,
        ge=0,
        le=600,
        description="On SIGTERM, how long to keep accepting requests with /readyz at 503 "
        "(lets a load balancer take the pod out first), before the graceful stop.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )

    @field_validator("weights_path", "bundle_path", "calibration_dir")
    @classmethod
    def _must_exist(cls, value: Path | None) -> Path | None:
        if value is not None and not value.exists():
            raise ValueError(f"path does not exist: {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_top_k > self.max_top_k:
            raise ValueError("default_top_k must not exceed max_top_k")
        if self.max_buffered_upload_bytes < max(self.max_batch_bytes, self.max_upload_bytes):
            raise ValueError(
                "max_buffered_upload_bytes must be at least max_batch_bytes and max_upload_bytes"
            )
        if self.weights_path is not None and self.bundle_path is not None:
            raise ValueError("give weights_path or bundle_path, not both")
        return self


class SettingsError(Exception):
    """Start-up refused: the message names every invalid setting and its environment variable."""


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment plus explicit overrides (CLI flags)."""
    clean = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**clean)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(part) for part in err["loc"]) or "settings"
            env = f" (env {ENV_PREFIX}{field.upper()})" if err["loc"] else ""
            lines.append(f"  {field}{env}: {err['msg']}")
        raise SettingsError("invalid settings:\n" + "\n".join(lines)) from None
