"""Where ImageNet weights live, without importing torch: torch hub's cache layout, the
published file names and their hash prefixes, and the start-up remedy when none are found.

torch's own helpers (``torch.hub.get_dir``, torchvision's weight enums) would load ~670 MB of
torch into a process that only needs to *find* a file; these mirror them, and a test checks
they agree with torch and torchvision."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Final

from resnet_service.runtimes.packages import torch_version

FP32_URL: Final = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
INT8_URL: Final = "https://download.pytorch.org/models/quantized/resnet18_fbgemm_16fa66dd.pth"
RANDOM_SEED: Final = 0


def torch_hub_dir() -> Path:
    """``torch.hub.get_dir()``: $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub, else
    ~/.cache/torch/hub."""
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    home = os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))
    return Path(home) / "hub"


def hub_checkpoint_path(url: str) -> Path:
    """Where torch hub (and torchvision) keeps a downloaded checkpoint."""
    return torch_hub_dir() / "checkpoints" / Path(url).name


def published_hash_prefix(url: str) -> str | None:
    """torchvision names files ``<name>-<sha256 prefix>.pth``."""
    stem = Path(url).stem
    prefix = stem.rsplit("-", 1)[-1] if "-" in stem else stem.rsplit("_", 1)[-1]
    return prefix if all(c in "0123456789abcdef" for c in prefix) and len(prefix) >= 8 else None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def random_weights_sha256(architecture: str = "resnet18", num_classes: int = 1000) -> str:
    """The identity of the development-only seeded random weights: what makes them (seed,
    torch version, architecture), hashed, so it is known without building them."""
    recipe = f"random:seed={RANDOM_SEED}:torch={torch_version()}:{architecture}:{num_classes}"
    return hashlib.sha256(recipe.encode()).hexdigest()


def how_to_provide_weights(
    downloads_allowed: bool = True, download_error: str | None = None
) -> str:
    """The exact remedy, for the start-up error: what was tried and failed, then the ways."""
    name = Path(FP32_URL).name
    if download_error is not None:
        why = f"the download from {FP32_URL} failed ({download_error})"
        third = "let the download through (network, DNS, HTTPS_PROXY) or make it elsewhere"
    elif downloads_allowed:
        why = "none was found"
        third = f"let the service download it from {FP32_URL}"
    else:
        why = "none was found and downloads are off"
        third = f"allow a download (RESNET_SERVICE_ALLOW_DOWNLOADS=true) from {FP32_URL}"
    return (
        f"No ResNet18 weights: {why}. Provide them in one of these ways:\n"
        f"  1. set RESNET_SERVICE_WEIGHTS_PATH=/path/to/{name} (or --weights PATH);\n"
        f"  2. place {name} at {hub_checkpoint_path(FP32_URL)} "
        "(the torch hub cache; $TORCH_HOME moves it);\n"
        f"  3. {third};\n"
        "  development only: RESNET_SERVICE_ALLOW_RANDOM_WEIGHTS=true serves seeded random "
        "weights (meaningless predictions, flagged in every response)."
    )
