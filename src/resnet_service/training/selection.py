"""How ``--train auto`` chooses, so that a small validation split cannot fool it.

The old recipe chose the BatchNorm statistics, the head's checkpoint and whether to keep a
trained ``layer4`` by accuracy on one validation split of a few dozen images, and could lose
to the plain probe on held-out data by picking whatever was lucky on those few images. Now:

- **Linear heads** (both BatchNorm variants, every L2 strength on the grid, the probe's own
  ``C=1`` among them, and the textbook probe: ``C=1`` on unstandardised features) are
  compared by cross-validation repeated over several fold assignments on *every* labelled
  image (training and validation splits pooled): each image is scored several times by a
  head that did not see it. The textbook probe's configuration (the trunk's BatchNorm
  statistics, ``C=1`` on the raw features) is kept unless another beats it by two standard
  errors of the paired per-image gain. Neither probe is better everywhere (over 12 tasks x 5
  seeds the raw one led by 3-4 points where the class is a colour or a size and trailed by 2
  on textures, +0.6 on the mean), and choosing between the two by cross-validation did worse
  than keeping the raw one: 120 images cannot tell a 3-point difference (it left the default
  2.7 points under the textbook probe on one task, against 2.0 under the standardised probe
  for the raw one). The best of a dozen candidates leads by luck alone, and on the project's
  texture tasks a re-estimated, weakly regularised head that led by under a point
  in cross-validation lost 5-9 points on held-out crops from another part of the photo. The
  chosen head is refitted on all labelled images.
- **Training ``layer4``** is kept only when, on the validation split, it is right on clearly
  more images than the linear head fitted on the training split alone (a paired count:
  ``wins - losses >= max(2, 2 * sqrt(wins + losses))``, about a two-sigma sign test); else
  the linear head is served. Validation also picks the checkpoint, out of a dozen or so, and
  the best of those on 24 images led by 6-0 where it lost 12 points on held-out ones (a
  star-shapes task, seed 2): an image that made a checkpoint the best also counts as its win.
  So the count is **cross-fitted**: each validation image is judged at the checkpoint the
  other validation images score best (step 0, the untouched block, among them). Each image is
  then judged by a choice it took no part in, at no extra training, and the choice is made on
  all but one image, so it is nearly always the served checkpoint. (Splitting validation in
  two halves, each judged at the other's choice, was tried first: each choice made on half
  the images was noisier, and it threw away real wins: a 19-point held-out gain on grey
  marks.)

The report keeps both figures apart: ``val_accuracy`` is what the training-split model scores
on the validation split (held out, comparable with the probe's), ``cv_accuracy`` the pooled
estimate the choice was made on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from resnet_service.training.loop import Checkpoint


@dataclass(frozen=True)
class Pooled:
    """Features of every labelled image, laid out as ``cross_validated_correct`` reads them: the
    serving view of each image first (training images, then validation images), then the
    training images' augmented views; ``image`` is each row's image, ``train`` marks the rows
    that come from the training split."""

    x: torch.Tensor
    y: torch.Tensor
    image: torch.Tensor
    train: torch.Tensor

    @property
    def images(self) -> int:
        return int(self.image.max()) + 1


def pool(
    train_views: list[torch.Tensor],
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
) -> Pooled:
    """``train_views[k]`` is view ``k`` of every training image (view 0 the serving one)."""
    n_train, n_val = len(train_y), len(val_y)
    extra = train_views[1:]
    x = torch.cat([train_views[0], val_x, *extra])
    y = torch.cat([train_y, val_y, *(train_y for _ in extra)])
    image = torch.cat([torch.arange(n_train + n_val), *(torch.arange(n_train) for _ in extra)])
    train = torch.ones(len(x), dtype=torch.bool)
    train[n_train : n_train + n_val] = False
    return Pooled(x, y, image, train)


@dataclass(frozen=True)
class Paired:
    """Two models on the same images: where only the challenger is right (wins), only the
    incumbent (losses)."""

    wins: int
    losses: int

    @property
    def margin(self) -> float:
        return max(2.0, 2.0 * math.sqrt(self.wins + self.losses))

    @property
    def clear_win(self) -> bool:
        return self.wins - self.losses >= self.margin

    def describe(self) -> str:
        return (
            f"right on {self.wins} validation images the head missed, wrong on {self.losses} "
            f"it got (a lead of {self.wins - self.losses} where {self.margin:.1f} is needed)"
        )


def paired(targets: torch.Tensor, incumbent: torch.Tensor, challenger: torch.Tensor) -> Paired:
    """Compare predictions image by image."""
    new_right, old_right = challenger == targets, incumbent == targets
    return Paired(int((new_right & ~old_right).sum()), int((old_right & ~new_right).sum()))


def cross_fitted(
    targets: torch.Tensor, head: torch.Tensor, checkpoints: list[Checkpoint]
) -> Paired:
    """The block against the head (``head``: its predictions), each image judged at the
    checkpoint that every *other* image scores best (earliest on ties, as the loop keeps).
    Most images see the served checkpoint; an image whose own answer made that checkpoint
    the best sees the one chosen without it."""
    judged = torch.empty_like(head)
    for row in range(len(targets)):
        others = torch.ones(len(targets), dtype=torch.bool)
        others[row] = False
        judged[row] = max(checkpoints, key=lambda c: c.score(targets, others)).preds[row]
    return paired(targets, head, judged)


@dataclass(frozen=True)
class Candidate:
    """One linear head: its BatchNorm variant, L2 strength, whether its features are
    standardised (the textbook probe's are not), and each image's cross-validated correctness
    (a share of the repeats)."""

    recalibrated: bool
    l2: float
    correct: torch.Tensor
    standardised: bool = True

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    def describe(self) -> str:
        bn = "re-estimated" if self.recalibrated else "the trunk's own"
        scale = "" if self.standardised else ", raw features (the textbook probe)"
        return f"{bn} BatchNorm statistics{scale}, l2 {self.l2:g} ({self.accuracy:.1%})"


def textbook_first(probes: list[Candidate]) -> Candidate:
    """The incumbent among the probes' configurations (``C=1``): the textbook one (raw
    features) when it was cross-validated, else the standardised one."""
    return min(probes, key=lambda c: c.standardised)


def paired_gain(challenger: Candidate, incumbent: Candidate) -> tuple[float, float]:
    """Mean per-image gain in cross-validated accuracy, and its standard error."""
    diff = challenger.correct - incumbent.correct
    return float(diff.mean()), float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else 0.0


def choose_linear(candidates: list[Candidate], incumbent: Candidate) -> tuple[Candidate, str]:
    """The best cross-validated candidate if it beats ``incumbent`` (a probe's configuration,
    ``textbook_first``) by two standard errors of the paired gain; ``incumbent`` otherwise. The
    grid has a dozen candidates, so the best of them leads the probe by luck alone more
    often than not: a lead must be larger than the noise to be taken."""
    best = max(candidates, key=lambda c: (c.accuracy, c.l2, c.recalibrated, c.standardised))
    if best is incumbent:
        return incumbent, f"a probe's configuration cross-validated best: {best.describe()}"
    gain, error = paired_gain(best, incumbent)
    if gain > 0 and gain >= 2 * error:
        return best, (
            f"{best.describe()} beat the probe's configuration, {incumbent.describe()}, "
            f"by {gain:.1%} (2 standard errors: {2 * error:.1%})"
        )
    return incumbent, (
        f"the probe's configuration, {incumbent.describe()}: the best other, "
        f"{best.describe()}, led by {gain:.1%}, within 2 standard errors ({2 * error:.1%})"
    )
