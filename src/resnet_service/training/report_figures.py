"""A fine-tuned bundle's headline figures, read back from its ``report.json`` without torch:
what ``evaluate`` shows next to its own measurement (the model against both probes on the
validation split the run held out)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

REPORT_JSON: Final = "report.json"


@dataclass(frozen=True, slots=True)
class TrainingFigures:
    """Validation accuracies of the fine-tuned model and of the two probes (standardised
    features, and the textbook probe on the raw ones), on the run's own validation split."""

    val_accuracy: float
    probe_val_accuracy: float | None
    textbook_probe_val_accuracy: float | None
    trained: str
    features: str  # the served head's: "standardised" or "raw" (the textbook probe's)

    def summary(self) -> dict[str, Any]:
        return {
            "val_accuracy": round(self.val_accuracy, 4),
            "probe_val_accuracy": _round(self.probe_val_accuracy),
            "textbook_probe_val_accuracy": _round(self.textbook_probe_val_accuracy),
            "trained": self.trained,
            "features": self.features,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def read_training_figures(bundle: Path | None) -> TrainingFigures | None:
    """The figures of a bundle ``finetune`` wrote; None for any other model (or a report
    from before the textbook probe, which lacks its figure: then that figure is None)."""
    if bundle is None or not (bundle / REPORT_JSON).is_file():
        return None
    try:
        report = json.loads((bundle / REPORT_JSON).read_text())
        head = report.get("head") or {}
        return TrainingFigures(
            val_accuracy=float(report["val_accuracy"]),
            probe_val_accuracy=report.get("probe_val_accuracy"),
            textbook_probe_val_accuracy=report.get("textbook_probe_val_accuracy"),
            trained=str(report.get("trained", "head")),
            features="standardised" if head.get("standardised", True) else "raw",
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not finetune's report: nothing to show beside the measurement
