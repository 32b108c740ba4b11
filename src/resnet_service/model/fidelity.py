"""How closely a built model follows its fp32 torch source, from the logits of both on the
same held-out images (numpy only)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from resnet_service.core.model_info import measured_here
from resnet_service.core.runtime import FloatBatch
from resnet_service.model.manifest import Fidelity


def _softmax(logits: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    out: npt.NDArray[np.float64] = exp / exp.sum(axis=1, keepdims=True)
    return out


def compare(
    reference: FloatBatch,
    built: FloatBatch,
    image_source: str,
    targets: npt.NDArray[np.int64] | None = None,
) -> Fidelity:
    """Top-1 agreement, max |p_built - p_ref|, mean relative logit error; accuracies when the
    images have labels."""
    ref = reference.astype(np.float64)
    got = built.astype(np.float64)
    agree = float((ref.argmax(1) == got.argmax(1)).mean())
    prob_diff = float(np.abs(_softmax(got) - _softmax(ref)).max())
    norms = np.maximum(np.linalg.norm(ref, axis=1), 1e-12)
    rel = float((np.linalg.norm(got - ref, axis=1) / norms).mean())
    accuracy: dict[str, float] = {}
    if targets is not None:
        accuracy["fp32_accuracy"] = float((ref.argmax(1) == targets).mean())
        accuracy["int8_accuracy"] = float((got.argmax(1) == targets).mean())
    return Fidelity(
        images=len(ref),
        top1_agreement=agree,
        max_abs_prob_diff=min(1.0, prob_diff),
        mean_abs_logit_rel_error=rel,
        image_source=image_source,
        measured_on=measured_here(),
        **accuracy,
    )
