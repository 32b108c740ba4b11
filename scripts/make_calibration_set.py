"""Regenerate the built-in calibration/held-out photo set from scikit-image's sample photos.

Only public-domain / CC0 photos are used (see src/resnet_service/model/calibration/README.md).
Run: .venv/bin/python scripts/make_calibration_set.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

OUT = Path(__file__).resolve().parents[1] / "src/resnet_service/model/calibration"
CALIBRATION = ("astronaut", "coffee", "rocket", "brick", "grass", "camera", "coins", "text")
HELD_OUT = ("chelsea", "hubble_deep_field", "gravel", "retina")
SHORT_SIDE = 256


def crops(name: str, count: int, rng: np.random.Generator) -> list[Image.Image]:
    photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    out = []
    for _ in range(count):
        w, h = photo.size
        scale = rng.uniform(0.5, 1.0)
        cw, ch = int(w * scale), int(h * scale * rng.uniform(0.75, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        factor = SHORT_SIDE / min(crop.size)
        out.append(crop.resize((round(crop.width * factor), round(crop.height * factor))))
    return out


def main() -> None:
    rng = np.random.default_rng(20261127)
    for old in OUT.glob("*.jpg"):
        old.unlink()
    for prefix, names, per in (("calib", CALIBRATION, 4), ("holdout", HELD_OUT, 4)):
        for name in names:
            for i, img in enumerate(crops(name, per, rng)):
                img.save(OUT / f"{prefix}_{name}_{i}.jpg", quality=88)
    print(f"wrote {len(list(OUT.glob('*.jpg')))} images to {OUT}")


if __name__ == "__main__":
    main()
