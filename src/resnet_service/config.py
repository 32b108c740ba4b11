"""One settings class for the service, the CLI and the tests (env prefix ``RESNET_SERVICE_``)."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal

from PIL import Image
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "RESNET_SERVICE_"
Precision = Literal["int8", "fp32"]
RuntimeName = Literal["torch", "openvino", "onnxruntime"]
RUNTIMES: tuple[RuntimeName, ...] = ("torch", "openvino", "onnxruntime")


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "resnet-service"


#: The settings that name a file or folder: empty means unset, given means it must exist.
_PATHS: Final = (
    "weights_path",
    "bundle_path",
    "calibration_dir",
    "artifact_path",
    "model_repository",
    "tag_rules",
)


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
    artifact_path: Path | None = Field(
        None,
        description="A built OpenVINO or ONNX Runtime model folder (`quantize --runtime R --out "
        "DIR`) to serve as it is: its runtime and precision apply, no weights are needed.",
    )
    tag_rules: Path | None = Field(
        None,
        description="A tag rules file (YAML) for the served model; default: tags.yml beside "
        "the model (in its bundle, built model or repository version folder), else the "
        "package's rules for the ImageNet model; other models get no tags.",
    )
    tags: bool = Field(
        True, description="Give tags from the models' rules (false: no tags, no rules read)."
    )
    model_repository: Path | None = Field(
        None,
        description="A model repository: DIR/<model>/<version>/ holds a bundle, a built model or "
        "a model.json naming weights, with an optional DIR/<model>/config.json (version policy, "
        "runtime, precision, batching). Several models and versions per replica; instead of "
        "weights_path, bundle_path and artifact_path.",
    )
    repository_control: Literal["none", "poll", "explicit"] = Field(
        "none",
        description="How the repository changes while serving: none (read at start), poll "
        "(new or removed version directories are noticed every repository_poll_s), explicit "
        "(the OIP repository extension loads and unloads; needs admin_token).",
    )
    repository_poll_s: float = Field(
        2.0, gt=0, le=3600, description="How often `poll` looks at the repository."
    )
    model_memory_budget_mb: float | None = Field(
        None,
        gt=0,
        le=1_000_000,
        description="Models on demand: the resident memory (MiB) a worker's loaded models may "
        "take. A repository's models are then available without being loaded: the first "
        "request for one loads it (requests wait within their deadline), and the least "
        "recently used unpinned model is unloaded to make room. Unset: every model loads at "
        "start and stays (unless model_idle_ttl_s is set).",
    )
    model_idle_ttl_s: float | None = Field(
        None,
        gt=0,
        le=30 * 86400,
        description="Models on demand: unload a model no request used for this long (pinned "
        "models stay); the next request loads it again. Unset: never.",
    )
    default_model: str | None = Field(
        None,
        description="The model of requests that name none (and of /model); default: the only "
        "model of the repository at start, kept when others are published (with several and "
        "none named, such requests are a 400 that lists them).",
    )
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token of the OIP repository control routes (index, load, unload); they "
        "are off without it.",
    )
    model_cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Where quantized (int8) models are cached, keyed by the fp32 weights' "
        "sha256 and the quantization settings.",
    )
    precision: Precision = Field("int8", description="Inference precision: int8 or fp32.")
    runtime: RuntimeName = Field(
        "openvino",
        description="Inference runtime: openvino (NNCF int8 / fp32 IR; the default, fastest "
        "here at equal fidelity, see the benchmark), onnxruntime (QDQ int8 / fp32) or torch "
        "(eager). Built models are made ahead of the workers and cached.",
    )
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
    inference_threads: int = Field(
        0,
        ge=0,
        le=256,
        description="Inference threads per worker (torch intra-op, OpenVINO, ONNX Runtime); "
        "0 = usable CPUs (affinity and cgroup quota) divided by the number of workers.",
    )
    decode_threads: int = Field(
        0, ge=0, le=256, description="Image decode threads per worker; 0 = same as torch threads."
    )
    # 8, not 16: at one inference thread per worker, OpenVINO's int8 cost per image is the same
    # at batch 1 and 8 (bench/bench.json), while every larger batch shape the runtime meets
    # keeps its own activation memory (batch 16: +42 MB a worker).
    max_batch_size: int = Field(8, ge=1, le=256, description="Largest micro-batch.")
    max_batch_wait_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="How long a forming batch may wait for more requests once others are "
        "already queued; a lone request never waits.",
    )
    queue_capacity: int = Field(
        256,
        ge=1,
        le=100_000,
        description="Images waiting for the model, at most (a memory bound; admission by "
        "predicted wait, queue_budget_ms, normally refuses work long before).",
    )
    queue_budget_ms: float | None = Field(
        None,
        ge=1,
        le=600_000,
        description="Admission's deadline bound: a request is refused (503 + Retry-After, "
        "before its upload is read) when the work already admitted would make it wait longer "
        "than this. Default: half of request_timeout_s, so a burst that can be served in time "
        "is queued, not refused.",
    )
    queue_target_ms: float = Field(
        50.0,
        ge=1,
        le=60_000,
        description="Admission's standing-queue target: when no image waited less than this "
        "over a whole queue_interval_ms and more requests arrived than were answered, the "
        "queue stands, and new requests are admitted only while their predicted wait is "
        "below this target (CoDel's rule, at admission).",
    )
    queue_interval_ms: float = Field(
        100.0,
        ge=10,
        le=60_000,
        description="Admission's interval: how long the queueing delay must stay above "
        "queue_target_ms (and arrivals above answers) before a standing queue is shed; each "
        "interval re-decides.",
    )
    request_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Deadline per request; queued work past it is dropped."
    )
    refusal_delay_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="A refused request (503 overloaded) is answered after this pause, so that "
        "clients that retry at once cannot turn refusals into a busy loop that eats the "
        "capacity admission protects (0 = answer at once).",
    )

    preprocessing: Literal["fast", "exact"] = Field(
        "fast",
        description="Image preprocessing: fast (resample only the centre crop's region; large "
        "JPEGs scaled down while decoding; within a measured tolerance of torchvision's "
        "reference) or exact (the reference's own resize, then crop: bit-identical pixels).",
    )

    response_cache_mb: float = Field(
        0.0,
        ge=0,
        le=65_536,
        description="Memory per worker for answers to repeated images (keyed by the bytes' "
        "hash, the model and, with auth on, the caller's token); 0 = off. About 4 kB an "
        "image for 1000 classes.",
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
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="Port of the Open Inference Protocol v2 gRPC service (and grpc.health.v1); "
        "0 = any free port (logged at start).",
    )
    grpc_enabled: bool = Field(True, description="Serve the gRPC face at all.")
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
    http_parser: Literal["httptools", "h11"] = Field(
        "httptools", description="HTTP/1.1 parser: httptools (C, faster) or h11 (pure Python)."
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", description="Event loop of the worker processes: uvloop (faster) or asyncio."
    )
    keep_alive_timeout_s: float = Field(
        75.0,
        gt=0,
        le=3600,
        description="Idle keep-alive connections are closed after this; keep it above the idle "
        "timeout of any proxy in front (nginx 60 s, AWS ALB 60 s by default).",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, le=600, description="A request's head must arrive within this (else 408)."
    )
    body_timeout_s: float = Field(
        15.0,
        gt=0,
        le=600,
        description="An upload that sends nothing for this long is refused with 408 and its "
        "connection closed (slow or stalled clients).",
    )
    max_connections: int = Field(
        1024,
        ge=1,
        le=1_000_000,
        description="Open connections per worker; beyond it a new connection gets one answer "
        "with `Connection: close`.",
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, le=3600, description="On SIGTERM, time given to finish accepted requests."
    )
    drain_delay_s: float = Field(
        0.0,
        ge=0,
        le=600,
        description="On SIGTERM, how long to keep accepting requests with /readyz at 503 "
        "(lets a load balancer take the replica out first), before the graceful stop.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text: lines for a terminal; json: one JSON object a line (timestamp, "
        "level, logger, message, worker, request and trace ids, model, version), the "
        "container image's default.",
    )
    tracing: bool = Field(
        False,
        description="Send OpenTelemetry traces over OTLP/HTTP, configured by the standard "
        "OTEL_* variables (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, "
        "OTEL_TRACES_SAMPLER...); OTEL_SDK_DISABLED=true turns it off again.",
    )

    @field_validator(*_PATHS, mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """``VAR=""`` unsets a path (a container image's default, overridden by a pod)."""
        return None if value == "" else value

    @field_validator(*_PATHS)
    @classmethod
    def _must_exist(cls, value: Path | None) -> Path | None:
        if value is not None and not value.exists():
            raise ValueError(f"path does not exist: {value}")
        return value

    @property
    def effective_queue_budget_ms(self) -> float:
        """Admission's deadline bound in effect (``queue_budget_ms`` or half the deadline)."""
        if self.queue_budget_ms is not None:
            return self.queue_budget_ms
        return self.request_timeout_s * 1000 / 2

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_top_k > self.max_top_k:
            raise ValueError("default_top_k must not exceed max_top_k")
        if self.max_buffered_upload_bytes < max(self.max_batch_bytes, self.max_upload_bytes):
            raise ValueError(
                "max_buffered_upload_bytes must be at least max_batch_bytes and max_upload_bytes"
            )
        if self.grpc_enabled and self.grpc_port != 0 and self.grpc_port == self.port:
            raise ValueError("grpc_port must differ from port")
        given = [f for f in ("weights_path", "bundle_path", "artifact_path") if getattr(self, f)]
        if len(given) > 1:
            raise ValueError(f"give one of weights_path, bundle_path, artifact_path (got {given})")
        if self.model_repository is not None and given:
            raise ValueError(
                f"model_repository names every model; leave {', '.join(given)} unset "
                "(put that model in the repository instead)"
            )
        if self.repository_control != "none" and self.model_repository is None:
            raise ValueError("repository_control needs a model_repository")
        on_demand = [f for f in ("model_memory_budget_mb", "model_idle_ttl_s") if getattr(self, f)]
        if on_demand and self.model_repository is None:
            raise ValueError(
                f"{' and '.join(on_demand)} {'need' if len(on_demand) > 1 else 'needs'} a "
                "model_repository (models on demand are the repository's models)"
            )
        if self.repository_control == "explicit" and self.admin_token is None:
            raise ValueError(
                "repository_control=explicit needs admin_token (the control routes' token)"
            )
        return self

    def as_env(self) -> dict[str, str]:
        """The settings that were set (from the environment, flags, or resolved by the
        supervisor) as RESNET_SERVICE_* variables, for child processes. Defaults stay
        defaults there, so a child can still tell a choice from a default (a built model's
        runtime wins over the default runtime, not over an explicit one)."""
        env: dict[str, str] = {}
        for name, value in self.model_dump(exclude_unset=True).items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if isinstance(value, bool):
                value = "true" if value else "false"
            env[f"{ENV_PREFIX}{name.upper()}"] = str(value)
        return env


class SettingsError(Exception):
    """Start-up refused: the message names every invalid setting and its environment variable."""


#: Settings that were renamed: an old variable still set would otherwise be silently ignored.
_RENAMED = {"torch_threads": "inference_threads"}


#: What Kubernetes injects for a Service named ``resnet-service`` (service links):
#: RESNET_SERVICE_SERVICE_HOST, RESNET_SERVICE_SERVICE_PORT[_HTTP], RESNET_SERVICE_PORT_8000_TCP...
_SERVICE_LINK = re.compile(r"^(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT_\d+_(TCP|UDP|SCTP)(_\w+)?)$")


def _service_link_value(name: str, value: str) -> bool:
    """Kubernetes' ``RESNET_SERVICE_PORT=tcp://10.0.0.1:8000`` (a service link, not a port)."""
    return name.upper() == f"{ENV_PREFIX}PORT" and "://" in value


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """``RESNET_SERVICE_*`` variables that name no setting (typos, renamed settings)."""
    problems = []
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        field = name[len(ENV_PREFIX) :].lower()
        if _SERVICE_LINK.match(field.upper()):
            continue  # injected by Kubernetes for a Service of this name: not ours to judge
        if _service_link_value(name, environ[name]):
            problems.append(
                f"  {name}={environ[name]}: this is a Kubernetes service link (a Service named "
                "resnet-service), not a port; set enableServiceLinks: false on the pod (as "
                "deploy/ does) or give RESNET_SERVICE_PORT explicitly"
            )
        if field in Settings.model_fields:
            continue
        hint = _RENAMED.get(field) or next(
            iter(difflib.get_close_matches(field, list(Settings.model_fields), n=1)), None
        )
        suggestion = f"; did you mean {ENV_PREFIX}{hint.upper()}?" if hint else ""
        problems.append(f"  {name}: not a setting{suggestion}")
    return problems


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment plus explicit overrides (CLI flags)."""
    clean = {key: value for key, value in overrides.items() if value is not None}
    lines = unknown_environment(os.environ)
    try:
        settings = Settings(**clean)  # type: ignore[arg-type]
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(part) for part in err["loc"]) or "settings"
            env = f" (env {ENV_PREFIX}{field.upper()})" if err["loc"] else ""
            lines.append(f"  {field}{env}: {err['msg']}")
    if lines:
        raise SettingsError("invalid settings:\n" + "\n".join(lines)) from None
    return settings
