"""Fidelity of each int8 runtime on a really trained model: scikit-learn's handwritten digits,
fine-tuned here with the default recipe, then quantized by each runtime and compared with its
fp32 torch source on the validation split (top-1 agreement and accuracy).

Random weights say nothing about fidelity (near-tied classes flip on any rounding), and no
real ImageNet weights can be fetched here; this is the honest substitute.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resnet_bench.servers import python
from resnet_service.config import RuntimeName, Settings

log = logging.getLogger(__name__)
PER_CLASS = 60


@dataclass(frozen=True)
class RuntimeFidelity:
    """One runtime's int8 model against its fp32 torch source on the validation split."""

    images: int
    top1_agreement: float
    fp32_accuracy: float
    int8_accuracy: float
    mean_abs_logit_rel_error: float
    #: The instruction-set level it was measured at (this host's: the bench builds afresh).
    isa: str | None = None

    def meets(self, min_agreement: float, max_drop: float) -> bool:
        """Whether this runtime's int8 follows fp32 closely enough to be a default here."""
        drop = self.fp32_accuracy - self.int8_accuracy
        return self.top1_agreement >= min_agreement and drop <= max_drop


@dataclass(frozen=True)
class TrainedBundle:
    """The fine-tuned fp32 model every runtime quantized."""

    val_accuracy: float


@dataclass(frozen=True)
class Fidelity:
    """Each int8 runtime's fidelity on the digits, and the model they all quantized."""

    bundle: TrainedBundle
    runtimes: dict[str, RuntimeFidelity]


def write_digits(root: Path, per_class: int = PER_CLASS) -> Path:
    """The digits as an ImageFolder of 32x32 PNGs (``per_class`` a class)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    seen: dict[int, int] = {}
    for i in np.random.default_rng(0).permutation(len(digits.images)):
        target = int(digits.target[i])
        if seen.get(target, 0) >= per_class:
            continue
        seen[target] = seen.get(target, 0) + 1
        folder = root / str(target)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels).resize((32, 32), Image.Resampling.BILINEAR).save(
            folder / f"{i}.png"
        )
    return root


def _cli(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run(
        [python(), "-m", "resnet_service", *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"resnet-service {args[0]} failed:\n{proc.stderr[-3000:]}")
    last: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return last


def digits_fidelity(
    settings: Settings, runtimes: tuple[RuntimeName, ...], workdir: Path
) -> Fidelity:
    """Fine-tune on the digits, quantize with each runtime, report agreement and accuracy."""
    data = write_digits(workdir / "digits")
    bundle, cache = workdir / "digits-bundle", workdir / "digits-cache"
    common = ["--offline", "--allow-random-weights", "--cache-dir", str(cache)]
    if settings.weights_path is not None:
        common += ["--weights", str(settings.weights_path)]
    trained = _cli(
        [
            "finetune",
            str(data),
            "--out",
            str(bundle),
            "--image-size",
            "64",
            "--no-progress",
            *common,
        ]
    )
    out = Fidelity(TrainedBundle(trained["val_accuracy"]), runtimes={})
    for runtime in runtimes:
        built = _cli(
            [
                "quantize",
                "--bundle",
                str(bundle),
                "--runtime",
                runtime,
                *[a for a in common if a != "--allow-random-weights"],
            ]
        )
        fidelity = built.get("fidelity") or built["quantization"]["fidelity"]
        out.runtimes[runtime] = RuntimeFidelity(
            images=fidelity["images"],
            top1_agreement=fidelity["top1_agreement"],
            fp32_accuracy=fidelity["fp32_accuracy"],
            int8_accuracy=fidelity["int8_accuracy"],
            mean_abs_logit_rel_error=fidelity["mean_abs_logit_rel_error"],
            isa=(fidelity.get("measured_on") or {}).get("isa"),
        )
        log.info("%s int8 on digits: %s", runtime, asdict(out.runtimes[runtime]))
    return out
