"""The linear-probe baseline: scikit-learn logistic regression on the frozen trunk's features.

This is the number a fine-tuning run has to beat (two of them: on standardised features, and
the textbook probe on the raw ones). It is computed outside our own training
code on purpose (another library, its defaults, nothing tuned), on the features of the trunk
exactly as it was loaded (no BatchNorm re-estimation), the serving preprocessing, and the same
train/validation split as the run. If the trained model does not beat it, training did not
work, and the report says so.

scikit-learn is an optional dependency (the ``train`` extra): without it the run still trains
and writes its bundle, and the report says how to get the baseline.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

#: What the baseline is, in the report's words.
DESCRIPTION = (
    "scikit-learn LogisticRegression (C=1.0, lbfgs) on standardised frozen-trunk features "
    "(base BatchNorm statistics, serving preprocessing), same train/validation split"
)
#: The probe of the textbooks: the same on the raw pooled features (no scaling). At the
#: default image size the serving preprocessing is torchvision's reference one (resize 256,
#: centre crop 224), and nothing is augmented.
TEXTBOOK_DESCRIPTION = (
    "scikit-learn LogisticRegression (C=1.0, lbfgs) on the raw frozen-trunk features "
    "(base BatchNorm statistics, serving preprocessing), same train/validation split"
)
MISSING = "scikit-learn is not installed: pip install 'resnet-service[train]' for the baseline"


@dataclass(frozen=True)
class ProbeResult:
    """The baseline's accuracies on the run's own split."""

    val_accuracy: float
    train_accuracy: float
    seconds: float
    description: str = DESCRIPTION


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    standardise: bool = True,
) -> ProbeResult | None:
    """Fit the baseline (the textbook one when ``standardise`` is False); None (with a
    warning) when scikit-learn is missing."""
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        log.warning(MISSING)
        return None
    started = time.perf_counter()
    scaling = [StandardScaler()] if standardise else []
    probe = make_pipeline(*scaling, LogisticRegression(C=1.0, max_iter=5000))
    xt, yt = train_x.double().numpy(), train_y.numpy()
    with warnings.catch_warnings():
        # 5000 iterations is far beyond what standardised features need; should a probe still
        # stop short, it remains a fair (untuned) baseline, not an error.
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(xt, yt)
    val_pred = probe.predict(val_x.double().numpy())
    return ProbeResult(
        val_accuracy=float(np.mean(val_pred == val_y.numpy())),
        train_accuracy=float(probe.score(xt, yt)),
        seconds=time.perf_counter() - started,
        description=DESCRIPTION if standardise else TEXTBOOK_DESCRIPTION,
    )
