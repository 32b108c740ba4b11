"""The tests' weights (torch's side of the harness, apart so that tests without torch do not
import it): a seeded ResNet18 with real BatchNorm statistics, saved as a file or a bundle."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from torchvision.models import resnet18

from resnet_service.core.images import decode_and_preprocess
from tests.harness import LIMITS, PHOTOS, SPEC, jpeg_of


@cache
def seeded_state_dict(seed: int = 1234) -> dict[str, torch.Tensor]:
    """Seeded random ResNet18 weights with BatchNorm statistics re-estimated on real photos,
    so activations are not degenerate (a stand-in for ImageNet weights, which we cannot fetch)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = resnet18()
    torch.random.set_rng_state(generator_state)
    batch = torch.stack(
        [
            torch.from_numpy(decode_and_preprocess(jpeg_of(name, size), LIMITS, SPEC))
            for name in PHOTOS
            for size in ((500, 375), (375, 500), (640, 480))
        ]
    )
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(batch)
    state: dict[str, torch.Tensor] = model.eval().state_dict()
    return state


def write_weights(path: Path) -> Path:
    """Save the test weights where a test wants them (a temp dir or the hub cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(seeded_state_dict(), path)
    return path


def write_test_bundle(
    directory: Path, labels: list[str], name: str = "tiny", seed: int = 0
) -> Path:
    """An fp32 bundle in ``finetune``'s format: the test backbone with a seeded head of its own
    (one class per label), written by the product's own bundle writer."""
    from resnet_service.model.bundle import BundleManifest, write_bundle

    state = {k: v for k, v in seeded_state_dict().items() if not k.startswith("fc.")}
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(512, len(labels))
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.05)
        head.bias.zero_()
    state["fc.weight"], state["fc.bias"] = head.weight.detach(), head.bias.detach()
    manifest = BundleManifest(
        name=name,
        architecture="resnet18",
        num_classes=len(labels),
        precision="fp32",
        weights_sha256="0" * 64,
        provenance={"note": "test"},
    )
    write_bundle(directory, manifest, state, labels)
    return directory


def fp32_model() -> torch.nn.Module:
    model: torch.nn.Module = resnet18()
    model.load_state_dict(seeded_state_dict())
    return model.eval()
