"""Per-tag precision and recall from labelled images, and the threshold a tag needs for a
target precision, with the sampling error of that precision (a Wilson 95% interval: the
figures come from a few dozen images a tag, where the normal approximation misleads).

Hand-written on numpy: a precision-recall curve is a sort and two cumulative sums, and the
suggestion rule (the lowest threshold whose precision reaches the target, so recall is the
most it can be) and its interval are not what scikit-learn's curve helpers return."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

#: z for a two-sided 95% interval.
_Z: Final = 1.959963984540054


@dataclass(frozen=True, slots=True)
class Interval:
    """A proportion's Wilson 95% interval."""

    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def wilson(hits: int, n: int) -> Interval:
    if n == 0:
        return Interval(0.0, 1.0)
    p = hits / n
    centre = (p + _Z**2 / (2 * n)) / (1 + _Z**2 / n)
    spread = _Z * math.sqrt(p * (1 - p) / n + _Z**2 / (4 * n * n)) / (1 + _Z**2 / n)
    return Interval(max(0.0, centre - spread), min(1.0, centre + spread))


@dataclass(frozen=True, slots=True)
class AtThreshold:
    """A tag's figures when it is given at ``threshold`` and above."""

    threshold: float
    predicted: int
    true_positives: int
    positives: int

    @property
    def precision(self) -> float | None:
        return self.true_positives / self.predicted if self.predicted else None

    @property
    def recall(self) -> float | None:
        return self.true_positives / self.positives if self.positives else None

    @property
    def precision_interval(self) -> Interval:
        return wilson(self.true_positives, self.predicted)


def at_threshold(
    scores: npt.NDArray[np.float64], positive: npt.NDArray[np.bool_], threshold: float
) -> AtThreshold:
    given = scores >= threshold
    return AtThreshold(
        threshold=threshold,
        predicted=int(given.sum()),
        true_positives=int((given & positive).sum()),
        positives=int(positive.sum()),
    )


@dataclass(frozen=True, slots=True)
class Curve:
    """Precision and recall at each distinct score, from the highest threshold down."""

    thresholds: npt.NDArray[np.float64]
    precision: npt.NDArray[np.float64]
    recall: npt.NDArray[np.float64]
    predicted: npt.NDArray[np.int64]
    true_positives: npt.NDArray[np.int64]


def pr_curve(scores: npt.NDArray[np.float64], positive: npt.NDArray[np.bool_]) -> Curve:
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], positive[order]
    # The last image of each run of equal scores: a threshold gives all of them or none.
    last = np.r_[np.flatnonzero(np.diff(ranked) != 0), ranked.size - 1]
    true_positives = np.cumsum(hits)[last].astype(np.int64)
    predicted = (last + 1).astype(np.int64)
    positives = max(int(positive.sum()), 1)
    return Curve(
        thresholds=ranked[last],
        precision=true_positives / predicted,
        recall=true_positives / positives,
        predicted=predicted,
        true_positives=true_positives,
    )


def suggest_threshold(curve: Curve, positives: int, target: float) -> AtThreshold | None:
    """The lowest threshold whose precision reaches ``target`` (None: none does)."""
    reaching = np.flatnonzero(curve.precision >= target)
    if reaching.size == 0:
        return None
    i = int(reaching[-1])  # thresholds run high to low: the last one reaching is the lowest
    return AtThreshold(
        threshold=float(curve.thresholds[i]),
        predicted=int(curve.predicted[i]),
        true_positives=int(curve.true_positives[i]),
        positives=positives,
    )
