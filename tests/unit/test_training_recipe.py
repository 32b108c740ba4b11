"""``finetune`` in process on a tiny folder: every ``--train`` and ``--recalibrate-bn`` path
writes a bundle whose report says what was chosen and why (seconds each: 32x32 inputs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_service.config import load_settings
from resnet_service.model.bundle import instantiate, read_manifest, read_weights
from resnet_service.training.finetune import FinetuneResult, finetune
from resnet_service.training.options import BnChoice, FinetuneConfig, TrainPart


def _tiny_folder(root: Path) -> Path:
    """Two classes a random trunk can tell apart: dark and light noise (8 images each)."""
    rng = np.random.default_rng(0)
    for label, level in (("dark", 60), ("light", 190)):
        (root / label).mkdir(parents=True)
        for i in range(8):
            pixels = np.clip(rng.normal(level, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def _run(
    tmp_path: Path, weights_file: Path, train: TrainPart, bn: BnChoice, **options: object
) -> FinetuneResult:
    settings = load_settings(
        weights_path=weights_file,
        allow_downloads=False,
        inference_threads=1,
        model_cache_dir=tmp_path / "cache",
    )
    config = FinetuneConfig(
        data_dir=_tiny_folder(tmp_path / "data"),
        out_dir=tmp_path / "bundle",
        train=train,
        recalibrate_bn=bn,
        image_size=32,
        val_fraction=0.25,
        min_steps=4,
        patience=4,
        epochs=4,
        progress=False,
        **options,  # type: ignore[arg-type]
    )
    return finetune(config, settings)


@pytest.mark.parametrize(
    ("train", "bn"), [("head", "no"), ("layer4", "yes"), ("all", "no"), ("auto", "auto")]
)
def test_every_path_writes_a_servable_bundle(
    tmp_path: Path, weights_file: Path, train: TrainPart, bn: BnChoice
) -> None:
    result = _run(tmp_path, weights_file, train, bn)
    report = result.report
    decided = {d.what: d for d in report.decisions}
    assert [d.what for d in report.decisions[:4]] == [
        "recalibrate_bn",
        "l2",
        "features",
        "train",
    ]
    assert ("refit" in decided) == (report.trained == "head")
    if bn != "auto":
        assert report.recalibrated_bn == (bn == "yes")
        assert report.head.cv_accuracy_other_bn is None
    else:
        assert report.head.cv_accuracy_other_bn is not None
    if train == "head":
        assert report.history == []
        assert report.trained == "head"
    elif train in ("layer4", "all"):
        assert report.history[0].step == 0
        assert report.trained in (train, "head")  # head: the block did not validate better
    assert report.probe is not None
    if report.trained == "head":  # the held-out figure is the training split's head
        assert report.val_accuracy == report.head.val_accuracy
    bundle = tmp_path / "bundle"
    saved = json.loads((bundle / "report.json").read_text())
    assert saved["val_accuracy"] == report.val_accuracy
    assert saved["probe_val_accuracy"] == report.probe.val_accuracy
    assert report.textbook_probe is not None
    assert saved["textbook_probe_val_accuracy"] == report.textbook_probe.val_accuracy
    assert "raw" in report.textbook_probe.description
    assert decided["features"].choice == ("standardised" if report.head.standardised else "raw")
    assert saved["history"] == [] or saved["history"][0]["train_loss"] is None  # no NaN in JSON
    manifest = read_manifest(bundle)
    assert manifest.provenance["trained"] == report.trained
    instantiate(manifest, read_weights(bundle, manifest))  # loads as a plain ResNet18


def test_augmented_views_feed_a_head_only_run(tmp_path: Path, weights_file: Path) -> None:
    result = _run(tmp_path, weights_file, "head", "no", augment="crop-flip", augmented_views=2)
    assert result.report.trained == "head"
    assert result.report.timings.block == pytest.approx(0, abs=0.5)


def test_no_time_left_means_head_only(tmp_path: Path, weights_file: Path) -> None:
    result = _run(tmp_path, weights_file, "auto", "no", time_budget=0.0)
    report = result.report
    assert report.trained == "head"
    decision = next(d for d in report.decisions if d.what == "train")
    # Either the head was already perfect or the budget ran out; both are said.
    assert "time" in decision.reason or "perfect" in decision.reason


def test_same_data_seed_and_options_give_the_same_bundle(
    tmp_path: Path, weights_file: Path
) -> None:
    """Repeatable on one host: the folds, the crops and the block's batches all come from
    ``--seed``, so a second run is the same model, not merely a similar score (``layer4``:
    every random part of the recipe runs, the head's cross-validation included)."""
    first = _run(tmp_path / "a", weights_file, "layer4", "auto", augmented_views=2)
    second = _run(tmp_path / "b", weights_file, "layer4", "auto", augmented_views=2)
    assert second.report.val_accuracy == first.report.val_accuracy
    assert second.report.head.cv_accuracy == first.report.head.cv_accuracy
    assert [d.choice for d in second.report.decisions] == [d.choice for d in first.report.decisions]
    weights = [
        read_weights(tmp_path / run / "bundle", read_manifest(tmp_path / run / "bundle"))
        for run in ("a", "b")
    ]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
