"""Runtimes' packages are optional extras: import one, or say which extra installs it."""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

from resnet_service.core.errors import RuntimeUnavailable


def import_runtime(module: str) -> Any:
    """Import a runtime's package, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeUnavailable(
            f"The {module} runtime is not installed ({exc}); "
            f"pip install 'resnet-service[{module}]' (the {module} package)."
        ) from None


def torch_version() -> str:
    """The installed torch's version, from its metadata (no import)."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "absent"
