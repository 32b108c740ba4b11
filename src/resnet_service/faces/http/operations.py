"""Routes for operators: liveness, readiness, Prometheus metrics and the served model."""

from __future__ import annotations

import time
from dataclasses import asdict
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Final

from fastapi import APIRouter, Query, Response

from resnet_service.asgi.deps import ClassifierDep, ServiceDep
from resnet_service.core.classifier import Classifier
from resnet_service.core.errors import NotReady
from resnet_service.core.model_info import ModelInfo, measured_here
from resnet_service.faces.http.openapi import problems
from resnet_service.faces.http.schemas import (
    Health,
    ModelResponse,
    ModelsResponse,
    ModelStatus,
    Readiness,
    ShadowState,
    VersionStatus,
    model_ref,
)

router = APIRouter()
#: The probes: a 503 from one is an answer (not ready), not a rejected request.
PROBES: Final = ("/healthz", "/readyz", "/metrics")

#: Provenance that names places on the server's disk: not for an unauthenticated route.
_PRIVATE_PROVENANCE: Final = frozenset({"train_dir", "val_dir", "skipped_files", "options"})


def _without_paths(source: str) -> str:
    """'/srv/data/train (train split)' -> 'train (train split)'; builtin names unchanged."""
    head, _, note = source.partition(" (")
    name = head.rstrip("/").rsplit("/", 1)[-1]
    return f"{name} ({note}" if note else name


def _strip_fidelity(fidelity: dict[str, Any]) -> None:
    if fidelity.get("image_source"):
        fidelity["image_source"] = _without_paths(fidelity["image_source"])


def public_model_info(info: ModelInfo) -> dict[str, Any]:
    """The model info minus server paths (weights file, caches, training folders)."""
    public = info.model_dump(exclude={"int8_cache", "weights_path"})
    public["provenance"] = {
        k: v for k, v in info.provenance.items() if k not in _PRIVATE_PROVENANCE
    }
    quant = public.get("quantization")
    if quant:
        if quant.get("calibration_source"):
            quant["calibration_source"] = _without_paths(quant["calibration_source"])
        if quant.get("fidelity"):
            _strip_fidelity(quant["fidelity"])
    if public.get("fidelity"):
        _strip_fidelity(public["fidelity"])
    return public


@router.get(
    "/model",
    response_model=ModelResponse,
    summary="A served model (default: the default one)",
    responses=problems(404, 422, 503),
)
async def model(
    classifier: ClassifierDep,
    service: ServiceDep,
    labels: Annotated[
        bool, Query(description="Add every class label (1,000 for ImageNet: ~20 kB).")
    ] = False,
) -> ModelResponse:
    settings = service.settings  # the replica's; what a model's own config may change, below
    options = classifier.options
    info = classifier.model.info
    return ModelResponse(
        **{**public_model_info(info), "name": classifier.name},
        version=classifier.version,
        host=measured_here(),
        labels=classifier.model.labels if labels else None,
        settings={
            "runtime": info.runtime,
            "inference_threads": classifier.inference_threads,
            "decode_threads": classifier.decode_threads,
            "workers": settings.workers or 1,
            "max_batch_size": options.max_batch_size,
            "max_batch_wait_ms": round(options.max_batch_wait_s * 1000, 6),
            "queue_budget_ms": settings.effective_queue_budget_ms,
            "queue_target_ms": settings.queue_target_ms,
            "queue_interval_ms": settings.queue_interval_ms,
            "queue_capacity": options.queue_capacity,
            "request_timeout_s": options.request_timeout_s,
            "max_upload_bytes": options.limits.max_bytes,
            "max_pixels": options.limits.max_pixels,
            "default_top_k": min(options.default_top_k, classifier.max_top_k),
            "max_top_k": classifier.max_top_k,
            "max_batch_files": settings.max_batch_files,
            "max_batch_bytes": settings.max_batch_bytes,
            "auth_required": settings.auth_token is not None,
            "preprocessing": options.preprocessing,
            "response_cache_mb": settings.response_cache_mb,
            "grpc_port": settings.grpc_port if settings.grpc_enabled else 0,
        },
        embedding_size=classifier.embedding_size,
        explainable=classifier.explainable,
    )


def _tag_rules_status(classifier: Classifier | None) -> dict[str, Any]:
    rules = classifier.tag_rules if classifier else None
    return {
        "tag_rules": Path(rules.source).name if rules else None,
        "tags": len(rules.rules) if rules else None,
        "tag_rules_problem": classifier.tag_rules_problem if classifier else None,
    }


@router.get(
    "/models",
    response_model=ModelsResponse,
    summary="Every model of this worker, its versions and their states",
)
async def models(service: ServiceDep) -> ModelsResponse:
    table = service.models
    listed = []
    for name in table.names():
        serving = table.serving(name)
        split = table.traffic(name)
        shares = (
            {s.version: s for s in split.shares(partial(table.can_serve, name))} if split else {}
        )
        versions = [
            VersionStatus(
                version=e.version,
                state=str(e.state),
                reason=e.reason,
                serving=e.version in shares and shares[e.version].share > 0
                if split
                else serving is not None and e.version == serving.version,
                memory_mb=round(e.memory_bytes / 2**20, 1) if e.memory_bytes is not None else None,
                last_used=_wall_clock(e.classifier.last_used) if e.classifier else None,
                traffic_share=round(shares[e.version].share, 4) if e.version in shares else None,
                traffic_stopped=shares[e.version].stopped if e.version in shares else None,
                runtime=e.classifier.model.info.runtime if e.classifier else None,
                precision=e.classifier.model.info.precision if e.classifier else None,
                num_classes=e.classifier.model.info.num_classes if e.classifier else None,
                **_tag_rules_status(e.classifier),
            )
            for e in table.versions(name)
        ]
        shadow = table.shadow(name)
        listed.append(
            ModelStatus(
                name=name,
                pinned=name in table.pinned,
                versions=versions,
                shadow=ShadowState(**asdict(shadow.status())) if shadow else None,
            )
        )
    return ModelsResponse(default=table.default_name, models=listed)


def _wall_clock(monotonic: float) -> datetime:
    return datetime.fromtimestamp(time.time() - (time.monotonic() - monotonic), UTC)


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: model loaded and warmed in every worker, not draining",
    responses=problems(503),
)
async def readyz(service: ServiceDep) -> Readiness:
    problem = service.readiness_problem()
    if problem is not None:
        raise NotReady(problem, 2)
    default = service.classifier
    return Readiness(model=model_ref(default) if default is not None else None)


@router.get(
    "/metrics",
    summary="Prometheus metrics (every worker of the replica)",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
async def metrics(service: ServiceDep) -> Response:
    body, content_type = service.metrics.render()
    return Response(body, media_type=content_type)
