"""Fine-tuning on real data a package ships (scikit-learn's digits), end to end over HTTP.

Thresholds are for the tests' *random* starting weights (no ImageNet weights offline): measured
fp32 validation accuracy 96.7%, int8 95.8%, int8/fp32 top-1 agreement 99.2% (120 images); the
bounds below leave room for other CPUs' numerics without admitting a broken pipeline (chance is
10%).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from resnet_service.cli import main
from resnet_service.training.data import DatasetError, load_image_folder, stratified_split
from resnet_service.training.finetune import spec_for
from tests.server import serve

FP32_MIN_ACCURACY = 0.90
INT8_MIN_ACCURACY = 0.88
MIN_AGREEMENT = 0.98
HTTP_MIN_ACCURACY = 0.88


def write_digits(
    root: Path, per_class_train: int = 60, per_class_test: int = 20
) -> tuple[Path, Path]:
    """scikit-learn's 8x8 handwritten digits as an ImageFolder of 32x32 PNGs."""
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    seen: dict[int, int] = {}
    for i in order:
        target = int(digits.target[i])
        n = seen.get(target, 0)
        seen[target] = n + 1
        split = (
            "train"
            if n < per_class_train
            else "test"
            if n < per_class_train + per_class_test
            else None
        )
        if split is None:
            continue
        folder = root / split / str(target)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels).resize((32, 32), Image.Resampling.BILINEAR).save(
            folder / f"{i}.png"
        )
    return root / "train", root / "test"


@pytest.mark.slow
def test_finetune_quantize_and_serve_digits(
    weights_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train_dir, test_dir = write_digits(tmp_path / "digits")
    bundle, cache = tmp_path / "bundle", tmp_path / "cache"
    common = ["--offline", "--cache-dir", str(cache), "--threads", "2"]
    code = main(
        [
            "finetune",
            str(train_dir),
            "--out",
            str(bundle),
            "--train",
            "layer4",
            "--image-size",
            "64",
            "--augment",
            "none",
            "--recalibrate-bn",
            "--epochs",
            "15",
            "--no-progress",
            "--weights",
            str(weights_file),
            *common,
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["val_accuracy"] >= FP32_MIN_ACCURACY
    for name in (
        "bundle.json",
        "weights.pt",
        "labels.json",
        "report.json",
        "report.png",
        "splits.json",
    ):
        assert (bundle / name).is_file(), name
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["num_classes"] == 10
    assert manifest["preprocessing"]["crop_size"] == 64
    provenance = manifest["provenance"]
    assert provenance["class_counts"] == {str(d): 60 for d in range(10)}
    assert len(provenance["data_fingerprint"]) == 64
    assert len(provenance["confusion_matrix"]) == 10
    assert sum(map(sum, provenance["confusion_matrix"])) == provenance["val_images"] == 120
    report = json.loads((bundle / "report.json").read_text())
    assert report["history"][0]["epoch"] == 1
    assert report["best_epoch"] >= 1

    assert main(["quantize", "--bundle", str(bundle), *common]) == 0
    fidelity = json.loads(capsys.readouterr().out)["quantization"]["fidelity"]
    assert fidelity["image_source"].endswith("(validation split)")
    assert fidelity["fp32_accuracy"] >= FP32_MIN_ACCURACY
    assert fidelity["int8_accuracy"] >= INT8_MIN_ACCURACY
    assert fidelity["top1_agreement"] >= MIN_AGREEMENT
    assert (
        json.loads((bundle / "report.json").read_text())["int8"]["top1_agreement"] >= MIN_AGREEMENT
    )

    test_files = sorted(test_dir.rglob("*.png"))
    with serve(tmp_path, "--bundle", str(bundle), "--cache-dir", str(cache), "--offline") as server:
        model = httpx.get(f"{server.url}/model").json()
        assert model["labels"] == [str(d) for d in range(10)]
        assert model["precision"] == "int8"
        assert model["provenance"]["val_accuracy"] >= FP32_MIN_ACCURACY
        assert model["runtime"]["max_top_k"] == 10
        assert "train_dir" not in model["provenance"]
        assert str(tmp_path) not in json.dumps(model)  # no server paths on an open route
        too_many = httpx.post(
            f"{server.url}/classify?top_k=11",
            files={"image": ("a.png", test_files[0].read_bytes())},
        )
        assert too_many.status_code == 422
        default = httpx.post(
            f"{server.url}/classify", files={"image": ("a.png", test_files[0].read_bytes())}
        )
        assert len(default.json()["predictions"]) == 5

        async def classify_all() -> list[dict[str, object]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                out: list[dict[str, object]] = []
                for start in range(0, len(test_files), 50):
                    chunk = test_files[start : start + 50]
                    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in chunk]
                    response = await client.post("/classify/batch?top_k=1", files=files)
                    assert response.status_code == 200
                    out.extend(response.json()["results"])
                return out

        results = asyncio.run(classify_all())
    labels = [r["predictions"][0]["label"] for r in results]  # type: ignore[index]
    correct = sum(label == path.parent.name for path, label in zip(test_files, labels, strict=True))
    assert len(results) == 200
    assert correct / len(results) >= HTTP_MIN_ACCURACY


# --- bad data ------------------------------------------------------------------------------
SPEC = spec_for(64)


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (10, 200, 30)).save(path)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "nope", SPEC)


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_image_folder(tmp_path, SPEC)


def test_one_class_is_not_enough(tmp_path: Path) -> None:
    _png(tmp_path / "cat" / "1.png")
    with pytest.raises(DatasetError, match="at least two"):
        load_image_folder(tmp_path, SPEC)


def test_class_without_images(tmp_path: Path) -> None:
    _png(tmp_path / "cat" / "1.png")
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "notes.txt").write_text("no images")
    with pytest.raises(DatasetError, match="dog"):
        load_image_folder(tmp_path, SPEC)


def test_unreadable_files_are_skipped_and_listed(tmp_path: Path) -> None:
    for name in ("cat", "dog"):
        _png(tmp_path / name / "1.png")
        _png(tmp_path / name / "2.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    data = load_image_folder(tmp_path, SPEC)
    assert data.counts() == {"cat": 2, "dog": 2}
    assert len(data.skipped) == 1
    assert "broken.jpg" in data.skipped[0]
    train, val = stratified_split(data, 0.5, seed=0)
    assert sorted(val.targets()) == [0, 1]
    assert sorted(train.targets()) == [0, 1]


def test_nothing_readable_is_fatal(tmp_path: Path) -> None:
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="no readable images"):
        load_image_folder(tmp_path, SPEC)


def test_finetune_cli_reports_bad_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _png(tmp_path / "only" / "1.png")
    settings_args = ["--offline", "--cache-dir", str(tmp_path / "c")]
    assert main(["finetune", str(tmp_path), "--out", str(tmp_path / "b"), *settings_args]) == 1
    assert "at least two" in capsys.readouterr().err
