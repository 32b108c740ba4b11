"""The fine-tuning report: ``report.json`` always, ``report.png`` when matplotlib is there.

Its first job is to say whether training worked: the model's validation accuracy next to the
linear-probe baselines' (same features, same split: standardised, and the textbook probe on
the raw features), then the choices the recipe made and why,
then the learning curve and the confusion matrix.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resnet_service.training.loop import StepStats
from resnet_service.training.probe import ProbeResult
from resnet_service.training.report_figures import REPORT_JSON

log = logging.getLogger(__name__)

REPORT_PNG = "report.png"


@dataclass(frozen=True)
class Decision:
    """One choice the recipe made, in words a user can check against the numbers."""

    what: str
    choice: str
    reason: str


@dataclass(frozen=True)
class HeadSummary:
    """The fitted head before any block training."""

    l2: float
    standardised: bool  # False: the textbook probe's raw features
    cv_accuracy: float | None
    val_accuracy: float
    cv_accuracy_other_bn: float | None  # the best of the BatchNorm variant not kept
    seconds: float


@dataclass(frozen=True)
class Timings:
    """Where the wall time went (seconds)."""

    load: float
    features: float
    head: float
    block: float
    total: float


@dataclass
class FinetuneReport:
    """How the run chose and what it reached: ``report.json``, and the CLI's summary."""

    val_accuracy: float
    trained: str
    recalibrated_bn: bool
    best_step: int
    steps_run: int
    head: HeadSummary
    probe: ProbeResult | None
    textbook_probe: ProbeResult | None
    decisions: list[Decision]
    timings: Timings
    time_budget: float
    history: list[StepStats] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)

    def probe_accuracies(self) -> dict[str, float | None]:
        """The two baselines' validation accuracies under their JSON names (the report, the
        bundle's provenance and the CLI's summary line carry them alike)."""
        return {
            "probe_val_accuracy": self.probe.val_accuracy if self.probe else None,
            "textbook_probe_val_accuracy": (
                self.textbook_probe.val_accuracy if self.textbook_probe else None
            ),
        }


def below_probe(val_accuracy: float, probe_accuracy: float) -> bool:
    """Fewer validation images right than the probe. Both are shares of the same images, one a
    float32 mean (torch) and one a float64 (numpy): 17/36 differs by 1e-8 between them."""
    return val_accuracy < probe_accuracy - 1e-6


def _finite(value: Any) -> Any:
    """JSON has no NaN: the learning curve's step 0 has no training loss yet."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def report_dict(report: FinetuneReport, classes: list[str]) -> dict[str, Any]:
    """The report as JSON-ready data, headline figures first."""
    out = asdict(report)
    headline = {"val_accuracy": out.pop("val_accuracy"), **report.probe_accuracies()}
    cleaned: dict[str, Any] = _finite({**headline, **out, "classes": classes})
    return cleaned


def write_report(out_dir: Path, report: FinetuneReport, classes: list[str]) -> None:
    """report.json; report.png (accuracy vs baseline, learning curve, confusion matrix)."""
    (out_dir / REPORT_JSON).write_text(json.dumps(report_dict(report, classes), indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install matplotlib)", REPORT_PNG)
        return
    fig, (bars, curves, matrix) = plt.subplots(1, 3, figsize=(17, 5))
    _plot_comparison(bars, report)
    _plot_curves(curves, report)
    _plot_confusion(matrix, report, classes)
    fig.tight_layout()
    fig.savefig(out_dir / REPORT_PNG, dpi=100)
    plt.close(fig)


def _plot_comparison(ax: Any, report: FinetuneReport) -> None:
    names = [
        "linear probe\n(standardised)",
        "textbook probe\n(raw features)",
        "head only",
        f"final\n({report.trained})",
    ]
    values = [
        probe.val_accuracy if probe else math.nan for probe in (report.probe, report.textbook_probe)
    ] + [report.head.val_accuracy, report.val_accuracy]
    colours = ["#999999", "#bbbbbb", "#7aa6d6", "#1f5fa8"]
    ax.bar(names, values, color=colours)
    for i, value in enumerate(values):
        label = "n/a" if math.isnan(value) else f"{value:.1%}"
        ax.text(i, 0 if math.isnan(value) else value, label, ha="center", va="bottom")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("validation accuracy")
    ax.set_title("Did training work? (same features and split)")


def _plot_curves(ax: Any, report: FinetuneReport) -> None:
    history = report.history
    if not history:
        ax.text(0.5, 0.5, "head only: no block training", ha="center", va="center")
        ax.set_axis_off()
        return
    steps = [h.step for h in history]
    ax.plot(steps, [h.train_loss for h in history], label="train loss")
    ax.plot(steps, [h.val_loss for h in history], label="val loss")
    ax.plot(steps, [h.train_accuracy for h in history], "--", label="train acc")
    ax.plot(steps, [h.val_accuracy for h in history], "--", label="val acc")
    ax.axvline(report.best_step, color="grey", lw=0.8)
    ax.set_xlabel("optimiser step")
    outcome = (
        f"{report.trained} kept" if report.trained != "head" else "not kept, the head is served"
    )
    ax.set_title(f"Block training (best step {report.best_step}): {outcome}")
    ax.legend()


def _plot_confusion(ax: Any, report: FinetuneReport, classes: list[str]) -> None:
    counts = np.array(report.confusion)
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 10 else 0)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Validation confusion (accuracy {report.val_accuracy:.1%})")
    if len(classes) <= 20:
        for (i, j), value in np.ndenumerate(counts):
            colour = "white" if value > counts.max() / 2 else "black"
            ax.text(j, i, str(value), ha="center", va="center", fontsize=8, color=colour)
