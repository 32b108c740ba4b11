"""The fine-tuning recipe's parts on small synthetic problems (fast, no images, no server)."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import fields

import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from resnet_service.cli import build_parser
from resnet_service.training.features import ViewCache
from resnet_service.training.head import (
    StandardizedLinear,
    accuracy,
    cross_validated_correct,
    fit_head,
    fold_of_each_image,
    l2_grid,
    probe_l2,
    refit,
)
from resnet_service.training.loop import Checkpoint, LoopConfig, train_block
from resnet_service.training.options import FinetuneConfig
from resnet_service.training.probe import linear_probe
from resnet_service.training.selection import (
    Candidate,
    choose_linear,
    cross_fitted,
    paired,
    pool,
    textbook_first,
)


def blobs(n: int, dim: int, classes: int, noise: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Gaussian classes in ``dim`` dimensions on an arbitrary scale and offset (like raw CNN
    features: positive, badly scaled)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    y = torch.arange(n) % classes
    x = centres[y] + noise * torch.randn(n, dim, generator=g)
    scale = torch.rand(dim, generator=g) * 10 + 0.01
    return x * scale + 5.0, y


def test_folded_head_is_the_same_function() -> None:
    x, _ = blobs(64, 16, 3, 1.0, seed=1)
    head = StandardizedLinear(x.mean(0), x.std(0), 3)
    nn.init.normal_(head.linear.weight)
    with torch.no_grad():
        assert torch.allclose(head(x), head.folded()(x), atol=1e-4, rtol=1e-4)


def test_head_fits_to_convergence_like_sklearn() -> None:
    """Same objective as scikit-learn's logistic regression: the same predictions."""
    x, y = blobs(300, 32, 4, 2.0, seed=2)
    l2 = 1e-2
    head = fit_head(x, y, 4, l2)
    z = ((x - x.mean(0)) / x.std(0)).double().numpy()
    reference = LogisticRegression(C=1 / (l2 * len(y)), max_iter=10_000).fit(z, y.numpy())
    with torch.no_grad():
        ours = head(x).argmax(1).numpy()
    assert (ours == reference.predict(z)).mean() >= 0.99


def test_raw_head_is_the_textbook_probe() -> None:
    """The selection's textbook candidate (``standardise=False`` at the probe's strength) is
    scikit-learn's ``LogisticRegression(C=1)`` on the raw features: the same predictions, on
    features with a scale and offset of their own (pooled ReLU features are positive)."""
    x, y = blobs(300, 32, 4, 2.0, seed=5)
    x = x.abs() * 3.0 + 0.5
    head = fit_head(x, y, 4, probe_l2(len(y)), standardise=False)
    reference = LogisticRegression(C=1.0, max_iter=10_000).fit(x.double().numpy(), y.numpy())
    with torch.no_grad():
        ours = head(x).argmax(1).numpy()
    assert (ours == reference.predict(x.double().numpy())).mean() >= 0.99
    assert torch.equal(head.get_buffer("std"), torch.ones(32))  # nothing rescaled
    standardised = fit_head(x, y, 4, probe_l2(len(y)))
    assert not torch.equal(standardised.get_buffer("std"), torch.ones(32))


def test_cross_validation_regularises_noisy_features_and_generalises() -> None:
    """Few images, many dimensions, heavy noise: the weakest L2 must not cross-validate best,
    and the head chosen as the recipe chooses must beat chance clearly on fresh data."""
    x, y = blobs(400, 256, 4, 6.0, seed=3)
    train_x, train_y, test_x, test_y = x[:120], y[:120], x[120:], y[120:]
    correct = cross_validated_correct(train_x, train_y, torch.arange(120), 4)
    assert correct is not None
    assert max(correct, key=lambda l2: float(correct[l2].mean())) > 1e-4
    candidates = [Candidate(False, l2, c) for l2, c in correct.items()]
    incumbent = next(c for c in candidates if c.l2 == probe_l2(120))
    chosen, _ = choose_linear(candidates, incumbent)
    head = refit(train_x, train_y, 4, chosen.l2)
    assert accuracy(head, test_x, test_y) >= 0.5  # chance: 0.25


def test_folds_are_stratified_and_views_stay_together() -> None:
    targets = torch.tensor([0] * 10 + [1] * 5)
    fold = fold_of_each_image(targets, 5, seed=0)
    for k in range(5):
        assert int(((fold == k) & (targets == 1)).sum()) == 1
        assert int(((fold == k) & (targets == 0)).sum()) == 2
    # Two views of each of 6 well-separated images: only the serving views are scored, once
    # per image, and a head that never saw an image's other view still gets it right.
    x, y = blobs(12, 8, 2, 0.05, seed=4)
    image = torch.arange(6).repeat(2)
    correct = cross_validated_correct(x, y[image], image, 2)
    assert correct is not None
    assert all(c.shape == (6,) for c in correct.values())
    assert float(correct[probe_l2(6)].mean()) == 1.0


def test_too_few_images_for_cross_validation() -> None:
    x, y = blobs(3, 8, 3, 0.5, seed=5)
    # one image per class: nothing to cross-validate, said so (the recipe then uses the probe's L2)
    assert cross_validated_correct(x, y, torch.arange(3), 3) is None


def _tiny_problem(seed: int) -> tuple[nn.Sequential, ViewCache, torch.Tensor, torch.Tensor]:
    x, y = blobs(64, 8, 2, 1.0, seed=seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    return model, ViewCache([x[:48]], y[:48]), x[48:], y[48:]


def test_early_stopping_waits_for_min_steps_and_counts_patience_in_steps() -> None:
    model, train, val_x, val_y = _tiny_problem(6)
    config = LoopConfig(lr=0.0, max_steps=500, min_steps=120, patience=30, eval_every=15)
    result = train_block(model, [model], train, val_x, val_y, config)
    # lr 0: nothing improves after step 0, yet the run lasts until min_steps.
    assert result.stopped_because == "patience"
    assert result.best_step == 0
    assert result.steps_run == 120
    assert [h.step for h in result.history][:3] == [0, 15, 30]


def test_best_checkpoint_is_kept() -> None:
    model, train, val_x, val_y = _tiny_problem(7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = LoopConfig(lr=0.05, max_steps=200, min_steps=50, patience=50)
    result = train_block(model, [model], train, val_x, val_y, config)
    best = max(result.history, key=lambda h: (h.val_accuracy, -h.val_loss))
    assert result.best_step == best.step
    assert result.val_accuracy == best.val_accuracy
    if result.best_step == 0:
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.parameters())


def test_time_budget_stops_training() -> None:
    model, train, val_x, val_y = _tiny_problem(8)
    config = LoopConfig(max_steps=10_000, deadline=time.monotonic() - 1)
    result = train_block(model, [model], train, val_x, val_y, config)
    assert result.stopped_because == "time_budget"
    assert result.steps_run == 0
    assert math.isnan(result.history[0].train_loss)


def test_probe_says_when_scikit_learn_is_missing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)
    x, y = blobs(20, 4, 2, 0.5, seed=9)
    assert linear_probe(x, y, x, y) is None
    assert "resnet-service[train]" in caplog.text


def test_cli_defaults_are_the_recipe_defaults() -> None:
    """The flags and FinetuneConfig describe one recipe: their defaults must not drift."""
    args = build_parser().parse_args(["finetune", "data", "--out", "b"])
    flag_names = {"augmented_views", "train", "recalibrate_bn", "augment", "image_size"}
    flag_names |= {"epochs", "batch_size", "lr", "weight_decay", "min_steps", "patience"}
    flag_names |= {"time_budget", "seed", "val_fraction"}
    defaults = {f.name: f.default for f in fields(FinetuneConfig)}
    for name in flag_names:
        assert getattr(args, name) == defaults[name], name


def test_bare_recalibrate_bn_flag_still_means_yes() -> None:
    parse = build_parser().parse_args
    assert parse(["finetune", "d", "--out", "b", "--recalibrate-bn"]).recalibrate_bn == "yes"
    assert parse(["finetune", "d", "--out", "b", "--recalibrate-bn", "no"]).recalibrate_bn == "no"
    assert parse(["finetune", "d", "--out", "b"]).recalibrate_bn == "auto"


def test_time_budget_is_planned_so_the_schedule_completes() -> None:
    model, train, val_x, val_y = _tiny_problem(10)
    started = time.monotonic()
    config = LoopConfig(
        max_steps=10_000_000, min_steps=0, patience=10**9, eval_every=5, deadline=started + 1.0
    )
    result = train_block(model, [model], train, val_x, val_y, config)
    assert result.planned_steps < 10_000_000
    assert result.stopped_because in ("max_steps", "time_budget")
    assert result.steps_run <= result.planned_steps
    assert time.monotonic() - started < 10


# --- the selection: the probe's configuration unless another clearly wins --------------------
def test_probe_strength_is_sklearns_default() -> None:
    """``probe_l2(n)`` is scikit-learn's ``C=1`` on n images: the probe is on the grid."""
    x, y = blobs(200, 32, 3, 3.0, seed=5)
    head = fit_head(x, y, 3, probe_l2(len(y)))
    z = ((x - x.mean(0)) / x.std(0)).double().numpy()
    reference = LogisticRegression(C=1.0, max_iter=10_000).fit(z, y.numpy())
    with torch.no_grad():
        assert (head(x).argmax(1).numpy() == reference.predict(z)).mean() >= 0.99
    assert probe_l2(len(y)) in l2_grid(len(y))


def _candidate(
    correct: list[int] | list[float], l2: float = 1e-3, recalibrated: bool = True
) -> Candidate:
    return Candidate(recalibrated, l2, torch.tensor(correct, dtype=torch.float32))


def test_a_lead_within_the_noise_keeps_the_probe() -> None:
    incumbent = _candidate([1, 0, 1, 0] * 25, l2=0.01, recalibrated=False)
    flips = [1, 0, 1, 0] * 25
    flips[1] = flips[3] = flips[5] = 1  # right on 3 more images,
    flips[0] = flips[2] = 0  # wrong on 2 more: +1 of 100, well within the noise
    lucky = _candidate(flips)
    assert lucky.accuracy > incumbent.accuracy
    chosen, why = choose_linear([incumbent, lucky], incumbent)
    assert chosen is incumbent
    assert "within 2 standard errors" in why


def test_a_clear_lead_is_taken() -> None:
    incumbent = _candidate([1, 0, 1, 0] * 25, l2=0.01, recalibrated=False)
    better = _candidate([1, 1, 1, 0] * 25)  # right on 25 more of 100, wrong on none more
    chosen, why = choose_linear([incumbent, better], incumbent)
    assert chosen is better
    assert "beat the probe's configuration" in why


def test_the_textbook_probe_is_the_incumbent_even_when_it_trails() -> None:
    standardised = Candidate(False, 0.01, torch.tensor([1.0, 1.0, 1.0, 0.0]))
    textbook = Candidate(False, 0.01, torch.tensor([1.0, 0.0, 1.0, 0.0]), standardised=False)
    assert textbook_first([standardised, textbook]) is textbook
    assert textbook_first([standardised]) is standardised  # --recalibrate-bn yes: no textbook
    assert "raw features (the textbook probe)" in textbook.describe()
    chosen, why = choose_linear([standardised, textbook], textbook)  # +1 of 4: noise
    assert chosen is textbook
    assert "within 2 standard errors" in why


def test_block_training_needs_a_clear_paired_win() -> None:
    targets = torch.zeros(40, dtype=torch.long)
    head = torch.tensor([0] * 30 + [1] * 10)
    assert not paired(targets, head, torch.tensor([0] * 33 + [1] * 7)).clear_win  # +3 of 40
    win = paired(targets, head, torch.tensor([0] * 39 + [1]))  # +9, no losses
    assert (win.wins, win.losses) == (9, 0)
    assert win.clear_win
    mixed = paired(targets, head, torch.tensor([1] * 6 + [0] * 34))  # +10 -6
    assert (mixed.wins, mixed.losses) == (10, 6)
    assert not mixed.clear_win


def test_the_block_decision_does_not_count_the_luck_of_choosing_a_checkpoint() -> None:
    """Two checkpoints each right on six other images: the first looks like a clear 6-0 win on
    the whole split, but each of its six images, left out, sees the other checkpoint chosen,
    which misses it: no win. A checkpoint right on eight images stays chosen without any one
    of them: a clear 8-0."""
    targets = torch.tensor([0] * 12 + [1] * 12)
    head = 1 - targets  # wrong everywhere: any gain is visible
    loss = torch.zeros(len(targets))

    def right_on(rows: range, step: int) -> Checkpoint:
        mask = torch.zeros(len(targets), dtype=torch.bool)
        mask[list(rows)] = True
        return Checkpoint(step, torch.where(mask, targets, head), loss)

    start = Checkpoint(0, head, loss)
    lucky = [right_on(range(0, 6), 10), right_on(range(6, 12), 20)]
    assert paired(targets, head, lucky[0].preds).clear_win  # what the old decision saw
    none = cross_fitted(targets, head, [start, *lucky])
    assert (none.wins, none.losses) == (0, 0)
    assert not none.clear_win
    real = cross_fitted(targets, head, [start, *lucky, right_on(range(12, 20), 30)])
    assert (real.wins, real.losses) == (8, 0)
    assert real.clear_win


def test_pooled_rows_put_every_serving_view_first() -> None:
    train_views = [torch.full((3, 2), float(v)) for v in range(3)]  # 3 images, 3 views
    pooled = pool(
        train_views, torch.tensor([0, 1, 2]), torch.full((2, 2), 9.0), torch.tensor([1, 0])
    )
    assert pooled.images == 5
    assert pooled.image.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2]
    assert pooled.y.tolist() == [0, 1, 2, 1, 0, 0, 1, 2, 0, 1, 2]
    assert pooled.x[:5, 0].tolist() == [0, 0, 0, 9, 9]
    assert pooled.train.tolist() == [True] * 3 + [False] * 2 + [True] * 6


def test_cross_validated_correctness_is_per_image_and_repeated() -> None:
    x, y = blobs(60, 8, 3, 0.5, seed=6)
    correct = cross_validated_correct(x, y, torch.arange(60), 3, repeats=2)
    assert correct is not None
    assert set(correct) == set(l2_grid(60))
    for shares in correct.values():
        assert shares.shape == (60,)
        assert set(shares.tolist()) <= {0.0, 0.5, 1.0}  # each image scored once per repeat
    assert max(float(c.mean()) for c in correct.values()) >= 0.9  # separable blobs


def test_a_model_as_right_as_the_probe_is_not_below_it() -> None:
    """17 of 36 right: torch's float32 mean and numpy's float64 differ by 1e-8, and the summary
    warned "below the linear-probe baseline" for equal accuracies (seen in the README's recipe)."""
    from resnet_service.training.report import below_probe

    model = float(torch.tensor([1.0] * 17 + [0.0] * 19).mean())
    probe = 17 / 36
    assert model < probe  # the two means really differ
    assert not below_probe(model, probe)
    assert below_probe(16 / 36, probe)  # one image fewer is below
