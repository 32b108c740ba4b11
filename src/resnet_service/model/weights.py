"""Where the weights come from: explicit path -> torch hub cache -> hash-checked download.

Never silently random: seeded random weights are served only behind the development flag, and
then every response says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from torchvision.models import ResNet18_Weights
from torchvision.models.quantization import ResNet18_QuantizedWeights

from resnet_service.core.errors import WeightsUnavailable
from resnet_service.model.hub import (
    RANDOM_SEED,
    how_to_provide_weights,
    hub_checkpoint_path,
    published_hash_prefix,
    random_weights_sha256,
)
from resnet_service.model.hub import sha256_file as sha256_file  # re-exported
from resnet_service.model.manifest import WeightsSource as WeightsSource  # re-exported

log = logging.getLogger(__name__)

# Values are tensors; an int8 Linear's packed params add a dtype and a (weight, bias) tuple.
StateDict = dict[str, Any]

FP32_WEIGHTS: Final = ResNet18_Weights.IMAGENET1K_V1
INT8_WEIGHTS: Final = ResNet18_QuantizedWeights.IMAGENET1K_FBGEMM_V1


@dataclass(frozen=True, slots=True)
class ResolvedWeights:
    """A state_dict with its provenance."""

    state_dict: StateDict
    source: WeightsSource
    sha256: str
    path: Path | None
    #: True when the file's sha256 starts with the hash prefix torchvision publishes for it.
    matches_published_hash: bool | None = None


def load_state_dict_file(path: Path) -> StateDict:
    """``torch.load`` with ``weights_only=True`` (no pickled code), refusing non-state-dicts."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise WeightsUnavailable(f"cannot read weights file {path}: {exc}") from exc
    if (
        isinstance(loaded, dict)
        and "state_dict" in loaded
        and isinstance(loaded["state_dict"], dict)
    ):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and _is_state_value(v) for k, v in loaded.items()
    ):
        raise WeightsUnavailable(f"{path} is not a state_dict of tensors")
    return loaded


def _is_state_value(value: object) -> bool:
    if isinstance(value, torch.Tensor | torch.dtype):
        return True
    return isinstance(value, tuple) and all(
        isinstance(item, torch.Tensor) or item is None for item in value
    )


def _from_file(path: Path, source: WeightsSource, url: str | None) -> ResolvedWeights:
    digest = sha256_file(path)
    prefix = published_hash_prefix(url) if url else None
    return ResolvedWeights(
        state_dict=load_state_dict_file(path),
        source=source,
        sha256=digest,
        path=path,
        matches_published_hash=digest.startswith(prefix) if prefix else None,
    )


def _download(url: str) -> Path:
    """Download into the hub cache, checking the published sha256 prefix."""
    dest = hub_checkpoint_path(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, dest)
    try:
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=published_hash_prefix(url))
    except Exception as exc:  # URLError, hash mismatch (RuntimeError), OSError...
        # urllib's reason ("Temporary failure in name resolution"), not its wrapper's repr
        raise WeightsUnavailable(str(getattr(exc, "reason", exc))) from exc
    return dest


@dataclass(frozen=True)
class Lookup:
    """The hub cache's file or a download, or why a download failed (None: not tried)."""

    found: ResolvedWeights | None
    download_error: str | None = None


def look_up(url: str, allow_downloads: bool) -> Lookup:
    """The hub cache file for ``url``, else a checked download when allowed."""
    cached = hub_checkpoint_path(url)
    if cached.is_file():
        return Lookup(_from_file(cached, WeightsSource.HUB_CACHE, url))
    if not allow_downloads:
        return Lookup(None)
    try:
        return Lookup(_from_file(_download(url), WeightsSource.DOWNLOAD, url))
    except WeightsUnavailable as exc:
        return Lookup(None, exc.detail)


def find_in_hub_or_download(url: str, allow_downloads: bool) -> ResolvedWeights | None:
    """``look_up``'s file, or None (a failed download said at debug level: the caller has
    another way, or says what to do)."""
    lookup = look_up(url, allow_downloads)
    if lookup.download_error is not None:
        log.debug("download of %s failed: %s", url, lookup.download_error)
    return lookup.found


def serving_random(download_error: str | None) -> None:
    """The one line a demo with random weights gets (not a download warning before it)."""
    why = f" (the download failed: {download_error})" if download_error else ""
    log.warning(
        "no ResNet18 weights%s: serving SEEDED RANDOM weights (development flag is on)", why
    )


def random_weights(num_classes: int = 1000) -> ResolvedWeights:
    """Seeded random ResNet18 weights: the same every run, for demos without real weights."""
    from torchvision.models import resnet18

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(RANDOM_SEED)
        state_dict = resnet18(num_classes=num_classes).state_dict()
    finally:
        torch.random.set_rng_state(generator_state)
    return ResolvedWeights(
        state_dict=state_dict,
        source=WeightsSource.RANDOM,
        sha256=random_weights_sha256("resnet18", num_classes),
        path=None,
    )


def resolve_fp32_weights(
    explicit: Path | None, *, allow_downloads: bool, allow_random: bool
) -> ResolvedWeights:
    """Resolve the fp32 ImageNet weights in the documented order."""
    if explicit is not None:
        return _from_file(explicit, WeightsSource.EXPLICIT_PATH, None)
    lookup = look_up(FP32_WEIGHTS.url, allow_downloads)
    if lookup.found is not None:
        return lookup.found
    if allow_random:
        serving_random(lookup.download_error)
        return random_weights()
    raise WeightsUnavailable(how_to_provide_weights(allow_downloads, lookup.download_error))
