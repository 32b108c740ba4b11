"""Settings -> the model a worker serves, on the runtime the settings name.

``prepare`` runs once per server start, before the workers (``serve``'s preflight): it builds
whatever must be built and reports what workers will load. ``open_served_model`` is what a
worker (or the CLI) calls to get a ready ``ServedModel``.
"""

from __future__ import annotations

from pydantic import BaseModel

from resnet_service.config import Precision, RuntimeName, Settings
from resnet_service.runtimes.base import ServedModel


class Prepared(BaseModel):
    """What the preflight found or built."""

    name: str
    runtime: RuntimeName
    precision: Precision
    weights_sha256: str
    random_weights: bool
    cache: str | None


def prepare(settings: Settings) -> Prepared:
    """Build (or verify) what ``open_served_model`` will load, so workers only load it."""
    from resnet_service.model.loader import load_model

    info = load_model(settings).info
    return Prepared(
        name=info.name,
        runtime=info.runtime,
        precision=info.precision,
        weights_sha256=info.weights_sha256,
        random_weights=info.random_weights,
        cache=info.int8_cache,
    )


def open_served_model(settings: Settings) -> ServedModel:
    """Load (building first where needed) the model for ``settings.runtime``."""
    from resnet_service.model.loader import load_model

    return load_model(settings)
