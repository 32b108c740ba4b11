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
from resnet_service.training.finetune import FinetuneConfig
from resnet_service.training.head import (
    StandardizedLinear,
    accuracy,
    fit_head,
    fit_head_cv,
    fold_of_each_image,
)
from resnet_service.training.loop import LoopConfig, train_block
from resnet_service.training.probe import linear_probe


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


def test_cross_validation_regularises_noisy_features_and_generalises() -> None:
    """Few images, many dimensions, heavy noise: CV must not pick the weakest L2, and the
    head must beat chance clearly on fresh data from the same classes."""
    x, y = blobs(400, 256, 4, 6.0, seed=3)
    train_x, train_y, test_x, test_y = x[:120], y[:120], x[120:], y[120:]
    fit = fit_head_cv(train_x, train_y, torch.arange(120), 4)
    assert fit.l2 > 1e-4
    assert fit.cv_accuracy is not None
    assert accuracy(fit.head, test_x, test_y) >= 0.5  # chance: 0.25


def test_folds_are_stratified_and_views_stay_together() -> None:
    targets = torch.tensor([0] * 10 + [1] * 5)
    fold = fold_of_each_image(targets, 5, seed=0)
    for k in range(5):
        assert int(((fold == k) & (targets == 1)).sum()) == 1
        assert int(((fold == k) & (targets == 0)).sum()) == 2
    # Two views of each of 6 images: rows of one image share a fold.
    x, y = blobs(12, 8, 2, 0.5, seed=4)
    image = torch.arange(6).repeat(2)
    fit = fit_head_cv(x, y[image], image, 2)
    assert fit.cv_accuracy is not None


def test_too_few_images_for_cross_validation() -> None:
    x, y = blobs(3, 8, 3, 0.5, seed=5)
    fit = fit_head_cv(x, y, torch.arange(3), 3)
    assert fit.cv_accuracy is None  # one image per class: a fixed L2, said so


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
