"""``evaluate`` on a model fine-tuned here (scikit-learn's digits, 10 training images a class):
per-tag precision and recall match a count done by hand from ``predict``'s probabilities, the
thresholds it suggests on one half of the held-out digits reach the target precision on the
other half within the sampling error it reports, and bad input gets a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from resnet_bench.tasks import write_task
from resnet_service.cli import main

RULES = """\
floor: 0.0
groups:
  even: ["0", "2", "4", "6", "8"]
  loops: ["0", "6", "8", "9"]
tags:
  - {name: even, classes: [even], threshold: 0.5}
  - {name: loops, classes: [loops], threshold: 0.5}
  - {name: small, classes: ["0", "1", "2", "3", "4"], threshold: 0.5}
  - {name: seven, classes: ["7"], threshold: 0.5}
"""
TARGET = 0.8


def _flags(bundle: Path, cache: Path) -> list[str]:
    return ["--bundle", str(bundle), "--precision", "fp32", "--offline", "--cache-dir", str(cache)]


def _halves(test: Path, root: Path) -> tuple[Path, Path]:
    """Every other image of each class into A and B (same classes, disjoint images)."""
    a, b = root / "a", root / "b"
    for folder in sorted(test.iterdir()):
        for i, image in enumerate(sorted(folder.iterdir())):
            half = a if i % 2 == 0 else b
            (half / folder.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(image, half / folder.name / image.name)
    return a, b


def _evaluate(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["evaluate", *args]) == 0
    summary: dict[str, Any] = json.loads(capsys.readouterr().out.splitlines()[-1])
    return summary


def test_evaluate_reports_what_the_tags_do_and_thresholds_that_hold_on_held_out_images(
    tmp_path: Path, weights_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = write_task("digits-10", tmp_path / "digits")
    bundle, cache = tmp_path / "digits-model", tmp_path / "cache"
    flags = ["--offline", "--cache-dir", str(cache), "--weights", str(weights_file)]
    assert (
        main(
            [
                "finetune",
                str(task.train),
                "--out",
                str(bundle),
                "--train",
                "head",
                "--image-size",
                "64",
                "--no-progress",
                *flags,
            ]
        )
        == 0
    )
    capsys.readouterr()
    rules = tmp_path / "tags.yml"
    rules.write_text(RULES)
    a, b = _halves(task.test, tmp_path / "halves")
    model = _flags(bundle, cache)
    out = tmp_path / "report-a"
    on_a = _evaluate(
        capsys,
        str(a),
        "--rules",
        str(rules),
        "--target-precision",
        str(TARGET),
        "--out",
        str(out),
        *model,
    )
    document_a = (out / "evaluation.md").read_text()
    assert document_a.startswith("# The model on labelled images")
    assert "## Tags" in document_a
    assert (out / "pr_curves.png").stat().st_size > 10_000
    assert on_a["images"] == 150

    # A fine-tuned bundle: its report's comparison with both probes stands beside the
    # accuracy measured here.
    report = json.loads((bundle / "report.json").read_text())
    assert on_a["training"] == {
        "val_accuracy": round(report["val_accuracy"], 4),
        "probe_val_accuracy": round(report["probe_val_accuracy"], 4),
        "textbook_probe_val_accuracy": round(report["textbook_probe_val_accuracy"], 4),
        "trained": "head",
        "features": "standardised" if report["head"]["standardised"] else "raw",
    }
    assert "textbook probe (C=1, raw features)" in document_a
    low, high = on_a["accuracy_95"]
    assert low < on_a["accuracy"] < high

    # The figures in force, counted by hand from predict's probabilities.
    assert main(["predict", str(a), "--top-k", "10", "--tag-rules", str(rules), *model]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    first = [line["predictions"][0]["label"] == Path(line["file"]).parent.name for line in lines]
    assert on_a["accuracy"] == pytest.approx(sum(first) / len(first), abs=1e-4)
    truth: dict[str, list[tuple[bool, float]]] = {
        n: [] for n in ("even", "loops", "small", "seven")
    }
    members = {"even": "02468", "loops": "0689", "small": "01234", "seven": "7"}
    for line in lines:
        label = Path(line["file"]).parent.name
        p = {pr["label"]: pr["score"] for pr in line["predictions"]}
        for name, digits in members.items():
            truth[name].append((label in digits, sum(p[d] for d in digits)))
    for tag in on_a["tags"]:
        pairs = truth[tag["name"]]
        given = [positive for positive, score in pairs if score >= 0.5]
        current = tag["current"]
        assert current["given"] == len(given)
        if given:
            assert current["precision"] == pytest.approx(sum(given) / len(given), abs=1e-4)

    # Suggested on A, checked on B (the other half): B's precision at A's thresholds lies
    # within the two samples' errors of A's interval.
    suggested = {t["name"]: t["suggested"] for t in on_a["tags"] if t["suggested"]}
    assert len(suggested) >= 3, on_a
    document = yaml.safe_load(RULES)
    for tag in document["tags"]:
        if tag["name"] in suggested:
            tag["threshold"] = suggested[tag["name"]]["threshold"]
    rules_b = tmp_path / "suggested.yml"
    rules_b.write_text(yaml.safe_dump(document))
    on_b = _evaluate(
        capsys,
        str(b),
        "--rules",
        str(rules_b),
        "--target-precision",
        str(TARGET),
        "--out",
        str(tmp_path / "report-b"),
        *model,
    )
    for tag in on_b["tags"]:
        if tag["name"] not in suggested:
            continue
        a_figures, held = suggested[tag["name"]], tag["current"]
        assert a_figures["precision"] >= TARGET
        low_a = a_figures["precision_95"][0]
        b_low, b_high = held["precision_95"]
        print(
            f"{tag['name']}: A {a_figures['precision']} [{low_a}, ..] at "
            f"{a_figures['threshold']}; B {held['precision']} [{b_low}, {b_high}]"
        )
        assert held["given"] > 0
        assert held["precision"] >= low_a - (b_high - b_low) / 2, (a_figures, held)


def test_evaluate_says_what_is_wrong_with_its_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.weights import write_test_bundle

    bundle = write_test_bundle(tmp_path / "m", ["cat", "dog"], "pets")
    (tmp_path / "data" / "horse").mkdir(parents=True)
    model = _flags(bundle, tmp_path / "cache")
    rules = tmp_path / "tags.yml"
    rules.write_text("tags:\n  - {name: pet, classes: [cat, dog]}\n")
    assert main(["evaluate", str(tmp_path / "data"), "--rules", str(rules), *model]) == 1
    assert "folders ['horse'] are not labels of this model" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "data"), "--target-precision", "90", *model]) == 2


def test_evaluate_without_tag_rules_judges_the_classes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model with no rules (and no fine-tuning report): the classes alone, said so."""
    from tests.harness import PHOTOS, jpeg_of
    from tests.weights import write_test_bundle

    bundle = write_test_bundle(tmp_path / "m", ["cat", "dog"], "pets")
    for i, name in enumerate(PHOTOS[:4]):
        folder = tmp_path / "data" / ("cat" if i % 2 == 0 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.jpg").write_bytes(jpeg_of(name, (320, 240)))
    out = tmp_path / "report"
    model = _flags(bundle, tmp_path / "cache")
    summary = _evaluate(capsys, str(tmp_path / "data"), "--out", str(out), *model)
    assert (summary["rules"], summary["tags"], summary["coverage"]) == (None, [], None)
    assert summary["training"] is None  # not a bundle finetune wrote
    assert summary["images"] == 4
    assert main(["predict", str(tmp_path / "data"), *model]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    first = [line["predictions"][0]["label"] == Path(line["file"]).parent.name for line in lines]
    assert summary["accuracy"] == sum(first) / 4
    low, high = summary["accuracy_95"]
    assert low <= summary["accuracy"] <= high
    assert "No tag rules: only the classes are judged" in (out / "evaluation.md").read_text()
    assert not (out / "pr_curves.png").exists()
