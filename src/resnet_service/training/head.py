"""The classifier head fitted to convergence on cached features (a linear probe, in torch).

A linear head on frozen features is multinomial logistic regression: a convex problem that
full-batch L-BFGS solves to the optimum in well under a second for a few thousand images.
Mini-batch Adam for a fixed number of epochs (what this replaced) stops wherever its step
budget runs out, which on weak features was barely below chance.

The one choice that matters is the L2 strength. It is chosen by cross-validation repeated over
several fold assignments (one split of a few dozen images is too noisy to choose by), among a
grid that includes the probe's own strength (scikit-learn's ``C=1`` is ``l2 = 1/n`` here), so
the probe's solution is always a candidate; ``selection.py`` keeps it unless another is
clearly better over every image. Features are standardised first (mean 0, variance 1 per
dimension, from the training split) so one grid of strengths fits any trunk, random or
pretrained; the standardisation is kept as a fixed layer while training and folded into the
final ``nn.Linear`` when the bundle is written. One candidate is not standardised: the
textbook probe (logistic regression with ``C=1`` on the raw pooled features), so that the
selection can keep it too.

Torch rather than scikit-learn, so that training needs no extra dependency and the head is
exactly the module that is served; scikit-learn only provides the independent baseline
(``probe.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

#: L2 strengths tried (on the mean cross-entropy over standardised features). sklearn's
#: default ``C=1`` on n images is ``1 / n`` on this scale: ~2e-3 for 500 images.
L2_GRID: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
FOLDS = 5
#: Fold assignments averaged over: the spread of one 5-fold score on ~150 images is a few
#: points, about the gap between neighbouring strengths.
REPEATS = 3
MAX_ITER = 300


class StandardizedLinear(nn.Module):
    """``Linear((x - mean) / std)``: a head whose optimiser sees well-scaled inputs."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.linear = nn.Linear(len(mean), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.get_buffer("mean"), self.get_buffer("std")
        out: torch.Tensor = self.linear((x - mean) / std)
        return out

    def folded(self) -> nn.Linear:
        """The same function as one plain ``nn.Linear`` (what ResNet's ``fc`` is)."""
        mean, std = self.get_buffer("mean"), self.get_buffer("std")
        fc = nn.Linear(len(mean), self.linear.out_features)
        with torch.no_grad():
            weight = self.linear.weight / std
            fc.weight.copy_(weight)
            fc.bias.copy_(self.linear.bias - weight @ mean)
        return fc


def _lbfgs(
    head: StandardizedLinear, x: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int
) -> None:
    """Minimise mean cross-entropy + l2/2 * ||W||^2 (bias unpenalised), full batch."""
    params = list(head.linear.parameters())
    optimizer = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    z = (x - head.get_buffer("mean")) / head.get_buffer("std")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = head.linear(z)
        loss = nn.functional.cross_entropy(logits, y)
        loss = loss + 0.5 * l2 * head.linear.weight.pow(2).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    with torch.enable_grad():
        optimizer.step(closure)  # type: ignore[no-untyped-call]


def _new_head(x: torch.Tensor, classes: int, standardise: bool) -> StandardizedLinear:
    if standardise:
        mean = x.mean(0)
        std = x.std(0).clamp_min(1e-6 * float(x.std().clamp_min(1e-12)))
    else:  # the raw features, as the textbook probe fits them
        mean, std = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    head = StandardizedLinear(mean, std, classes)
    nn.init.zeros_(head.linear.weight)
    nn.init.zeros_(head.linear.bias)
    return head


def fit_head(
    x: torch.Tensor,
    y: torch.Tensor,
    classes: int,
    l2: float,
    max_iter: int = MAX_ITER,
    start: StandardizedLinear | None = None,
    standardise: bool = True,
) -> StandardizedLinear:
    """One regularised logistic regression on features ``x`` (rows) with labels ``y``
    (standardised first unless ``standardise`` is False); ``start`` (a head fitted on the
    same rows) warm-starts it."""
    head = _new_head(x, classes, standardise) if start is None else copy.deepcopy(start)
    _lbfgs(head, x, y, l2, max_iter)
    return head.eval()


def accuracy(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((head(x).argmax(1) == y).float().mean())


def fold_of_each_image(targets: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Stratified fold numbers: each class's images dealt round-robin after a shuffle."""
    generator = torch.Generator().manual_seed(seed)
    fold = torch.empty_like(targets)
    for label in sorted(set(targets.tolist())):
        members = (targets == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        fold[members] = torch.arange(len(members)) % folds
    return fold


def probe_l2(images: int) -> float:
    """scikit-learn's ``LogisticRegression(C=1)`` on ``images`` rows, on this loss's scale."""
    return 1.0 / images


def l2_grid(images: int) -> tuple[float, ...]:
    """The fixed grid and the probe's strength for this many images."""
    return tuple(sorted({*L2_GRID, probe_l2(images)}))


def cross_validated_correct(
    x: torch.Tensor,
    y: torch.Tensor,
    image: torch.Tensor,
    classes: int,
    seed: int = 0,
    grid: tuple[float, ...] | None = None,
    repeats: int = REPEATS,
    standardise: bool = True,
) -> dict[float, torch.Tensor] | None:
    """Per L2 strength, each image's share of the repeats in which the head fitted without it
    was right on it; None when a class has fewer than two images. Rows that are views of one
    image (``image`` holds each row's image index; rows ``0..n-1`` are images ``0..n-1``'s
    serving views) stay in one fold, and only the serving view is scored."""
    per_image = y[: int(image.max()) + 1]
    grid = grid or l2_grid(len(per_image))
    folds = min(FOLDS, int(torch.bincount(per_image, minlength=classes).min()))
    if folds < 2:
        return None
    correct = {l2: torch.zeros(len(per_image)) for l2 in grid}
    for repeat in range(repeats):
        fold_of_image = fold_of_each_image(per_image, folds, seed + repeat)
        fold = fold_of_image[image]
        for k in range(folds):
            held = (fold_of_image == k).nonzero().flatten()
            head = None
            for l2 in sorted(grid, reverse=True):  # strongest first: each warm-starts the next
                rows = fold != k
                head = fit_head(x[rows], y[rows], classes, l2, MAX_ITER // 2, head, standardise)
                with torch.no_grad():
                    right = head(x[held]).argmax(1) == per_image[held]
                correct[l2][held] += right.float() / repeats
    return correct


@contextmanager
def one_thread() -> Iterator[None]:
    """L-BFGS on a few thousand x 512 features is a stream of tiny ops: a second thread only
    adds synchronisation, and stalls whenever the other core is busy (measured on 2 shared
    cores: 2.4 s on one thread, 5.5-7.3 s on two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def refit(
    x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, standardise: bool = True
) -> StandardizedLinear:
    """The chosen head fitted on every labelled row (what is served when the head is)."""
    with one_thread():
        return fit_head(x, y, classes, l2, standardise=standardise)
