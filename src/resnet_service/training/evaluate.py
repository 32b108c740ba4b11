"""``resnet-service evaluate LABELLED_DIR``: how a model's tags do on images a person labelled
(one sub-folder per class, named by the model's labels): per tag precision, recall and how many
images get a tag at all (coverage) at the thresholds in force, the threshold each tag needs for
a target precision with its sampling error, the precision-recall curves (PNG) and a report a
person reads (Markdown). A tag's truth is its rule: an image is a positive of a tag when its
class is one of the tag's classes (a hierarchy node counts every class below it). Tags are
judged one at a time, before the per-image cap (``max_tags``) picks among them.

It also says how often the model's first class is the labelled one, and for a bundle
``finetune`` wrote, its report's validation figures beside that: the model against the two
probes (standardised features, and the textbook probe on the raw ones). A model without tag
rules gets that part alone."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from resnet_service.config import Settings
from resnet_service.core.classifier import Classifier
from resnet_service.core.errors import DatasetError, ServiceError
from resnet_service.core.tag_rules import TagRules
from resnet_service.model.datasets import image_files
from resnet_service.model.served import open_served_model
from resnet_service.model.tag_rules_file import read_tag_rules, tag_rules_for
from resnet_service.service.loading import classifier_options
from resnet_service.training.report_figures import TrainingFigures, read_training_figures
from resnet_service.training.tag_metrics import (
    AtThreshold,
    Curve,
    Interval,
    at_threshold,
    pr_curve,
    suggest_threshold,
    wilson,
)

log = logging.getLogger(__name__)

REPORT_JSON: Final = "evaluation.json"
REPORT_MD: Final = "evaluation.md"
CURVES_PNG: Final = "pr_curves.png"


@dataclass(frozen=True)
class LabelledImages:
    paths: list[Path]
    classes: npt.NDArray[np.int64]  # each image's class index in the model's labels


def labelled_images(root: Path, labels: list[str]) -> LabelledImages:
    """``root/<label>/*``: every sub-folder must be one of the model's labels."""
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder of class folders")
    index = {label: i for i, label in enumerate(labels)}
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    unknown = [f.name for f in folders if f.name not in index]
    if unknown:
        shown = ", ".join(labels[:20]) + (" ..." if len(labels) > 20 else "")
        raise DatasetError(
            f"{root}: folders {unknown[:10]} are not labels of this model; name each class "
            f"folder by a label ({shown})"
        )
    paths: list[Path] = []
    classes: list[int] = []
    for folder in folders:
        files = image_files(folder)
        paths += files
        classes += [index[folder.name]] * len(files)
    if not paths:
        raise DatasetError(f"no images in the class folders of {root}")
    return LabelledImages(paths, np.asarray(classes, dtype=np.int64))


@dataclass(frozen=True)
class TagEvaluation:
    """One tag on the labelled images."""

    name: str
    threshold: float  # in force: the rule's threshold or the floor, whichever is higher
    current: AtThreshold
    suggested: AtThreshold | None  # for the target precision; None: not reachable here
    curve: Curve

    def summary(self) -> dict[str, Any]:
        def figures(at: AtThreshold | None) -> dict[str, Any] | None:
            if at is None:
                return None
            interval = at.precision_interval
            return {
                "threshold": round(at.threshold, 6),
                "precision": _round(at.precision),
                "precision_95": [round(interval.low, 4), round(interval.high, 4)],
                "recall": _round(at.recall),
                "given": at.predicted,
                "positives": at.positives,
            }

        return {
            "name": self.name,
            "current": figures(self.current),
            "suggested": figures(self.suggested),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


@dataclass(frozen=True)
class Evaluation:
    images: int
    unreadable: int
    accuracy: float  # share of images whose first class is the labelled one
    accuracy_95: Interval
    coverage: float | None  # share with at least one tag at the thresholds in force
    target_precision: float
    rules: str | None  # None: the model has no tag rules, only the classes are judged
    tags: list[TagEvaluation]
    training: TrainingFigures | None  # a fine-tuned bundle's own report

    def summary(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "unreadable": self.unreadable,
            "accuracy": round(self.accuracy, 4),
            "accuracy_95": [round(self.accuracy_95.low, 4), round(self.accuracy_95.high, 4)],
            "training": self.training.summary() if self.training else None,
            "coverage": _round(self.coverage),
            "target_precision": self.target_precision,
            "rules": self.rules,
            "tags": [t.summary() for t in self.tags],
        }


async def _probabilities(
    classifier: Classifier, paths: list[Path], window: int
) -> list[npt.NDArray[np.float32] | None]:
    """Every image's class probabilities, ``window`` at a time (None: it did not decode)."""

    async def one(path: Path) -> npt.NDArray[np.float32] | None:
        try:
            data = await asyncio.to_thread(path.read_bytes)
            return (await classifier.classify(data, 1)).probabilities
        except (OSError, ServiceError) as exc:
            log.warning("skipping %s: %s", path, getattr(exc, "detail", exc))
            return None

    results: list[npt.NDArray[np.float32] | None] = []
    for start in range(0, len(paths), window):
        results += await asyncio.gather(*(one(p) for p in paths[start : start + window]))
    return results


def evaluate_rules(
    probabilities: npt.NDArray[np.float32],
    classes: npt.NDArray[np.int64],
    rules: TagRules,
    target: float,
) -> list[TagEvaluation]:
    """Each rule against the labels: ``probabilities`` [N, C], ``classes`` [N]."""
    scores = np.stack([rules.scores(p) for p in probabilities])  # [N, tags]
    found = []
    for t, rule in enumerate(rules.rules):
        positive = np.isin(classes, rule.classes)
        cut = max(rule.threshold, rules.floor)
        curve = pr_curve(scores[:, t], positive)
        found.append(
            TagEvaluation(
                name=rule.name,
                threshold=cut,
                current=at_threshold(scores[:, t], positive, cut),
                suggested=suggest_threshold(curve, int(positive.sum()), target),
                curve=curve,
            )
        )
    return found


def evaluate(settings: Settings, root: Path, rules_file: Path | None, target: float) -> Evaluation:
    model = open_served_model(settings)
    rules = (
        read_tag_rules(rules_file, model.labels)
        if rules_file
        else tag_rules_for(settings, model.labels)
    )
    if rules is None:
        log.warning(
            "%s has no tag rules: only its classes are judged (give --rules FILE, or put "
            "tags.yml beside the model, to judge tags)",
            model.info.name,
        )
    data = labelled_images(root, model.labels)
    classifier = Classifier(model, classifier_options(settings))
    classifier.start()
    try:
        window = max(1, settings.queue_capacity // 2)
        answers = asyncio.run(_probabilities(classifier, data.paths, window))
    finally:
        classifier.stop()
    kept = [i for i, a in enumerate(answers) if a is not None]
    if not kept:
        raise DatasetError(f"none of the {len(answers)} images below {root} could be read")
    probabilities = np.stack([answers[i] for i in kept])  # type: ignore[misc]
    classes = data.classes[kept]
    right = int((probabilities.argmax(1) == classes).sum())
    return Evaluation(
        images=len(kept),
        unreadable=len(answers) - len(kept),
        accuracy=right / len(kept),
        accuracy_95=wilson(right, len(kept)),
        coverage=sum(1 for p in probabilities if rules.tags(p)) / len(kept) if rules else None,
        target_precision=target,
        rules=Path(rules.source).name if rules else None,
        tags=evaluate_rules(probabilities, classes, rules, target) if rules else [],
        training=read_training_figures(settings.bundle_path),
    )


def write_report(evaluation: Evaluation, out: Path) -> None:
    """``evaluation.json``, ``evaluation.md`` and (with matplotlib) ``pr_curves.png``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_JSON).write_text(json.dumps(evaluation.summary(), indent=2) + "\n")
    (out / REPORT_MD).write_text(_markdown(evaluation))
    if evaluation.tags:
        _plot(evaluation, out / CURVES_PNG)


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value * 100:.{digits}f}%"


def _markdown(e: Evaluation) -> str:
    interval = e.accuracy_95
    lines = [
        "# The model on labelled images",
        "",
        f"{e.images} images ({e.unreadable} unreadable). **Accuracy** (the first class is the "
        f"labelled one): {_cell(e.accuracy)} [{interval.low * 100:.0f}, "
        f"{interval.high * 100:.0f}] (95%).",
        "",
        *_training_lines(e.training),
        *_tag_lines(e),
    ]
    return "\n".join(lines)


def _training_lines(figures: TrainingFigures | None) -> list[str]:
    """The fine-tuning report's own comparison, so the two probes stand beside the model."""
    if figures is None:
        return []
    return [
        "## From the fine-tuning report (its validation split)",
        "",
        "| model | validation accuracy |",
        "|---|---|",
        f"| fine-tuned ({figures.trained}, {figures.features} features) | "
        f"{_cell(figures.val_accuracy)} |",
        f"| linear probe (C=1, standardised features) | {_cell(figures.probe_val_accuracy)} |",
        f"| textbook probe (C=1, raw features) | {_cell(figures.textbook_probe_val_accuracy)} |",
        "",
    ]


def _tag_lines(e: Evaluation) -> list[str]:
    if e.rules is None:
        return [
            "No tag rules: only the classes are judged (give `--rules FILE`, or put "
            "`tags.yml` beside the model).",
            "",
        ]
    lines = [
        "## Tags",
        "",
        f"Rules `{e.rules}`. **Coverage**: {_cell(e.coverage)} of the images get at least one "
        "tag at the thresholds in force.",
        "",
        f"Precision and recall per tag at its threshold now, and the lowest threshold that "
        f"reaches {e.target_precision:.0%} precision on these images (its precision's 95% "
        "interval says how far another sample of this size may fall).",
        "",
        "| tag | threshold | given | precision | recall | suggested | its precision (95%) "
        "| its recall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in e.tags:
        now, s = t.current, t.suggested
        if s is None:
            suggested = "not reachable", "-", "-"
        else:
            interval = s.precision_interval
            suggested = (
                f"{s.threshold:.3f}",
                f"{_cell(s.precision)} [{interval.low * 100:.0f}, {interval.high * 100:.0f}]",
                _cell(s.recall),
            )
        lines.append(
            f"| {t.name} | {t.threshold:.3f} | {now.predicted} of {e.images} | "
            f"{_cell(now.precision)} | {_cell(now.recall)} | {' | '.join(suggested)} |"
        )
    lines += ["", f"The curves: `{CURVES_PNG}`.", ""]
    return lines


def _plot(e: Evaluation, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install matplotlib)", path.name)
        return
    figure, axes = plt.subplots(figsize=(7, 5))
    for t in e.tags:
        if t.current.positives == 0:
            continue
        line = axes.plot(t.curve.recall, t.curve.precision, label=t.name, linewidth=1.2)[0]
        if t.current.precision is not None and t.current.recall is not None:
            axes.plot(t.current.recall, t.current.precision, "o", color=line.get_color())
    axes.axhline(e.target_precision, color="grey", linestyle="--", linewidth=0.8)
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02))
    axes.set_title("Tags: precision against recall (dots: the thresholds in force)")
    axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
