"""Transfer learning: ResNet18 -> a new head (and, when it helps, a retrained last block).

The recipe, and why (``--train auto``, the default):

1. **Cache the frozen trunk's activations once** (``features.py``): every later step reads
   the cache, so fitting to convergence costs seconds, not epochs of forward passes.
2. **Fit the head to convergence** (``head.py``): L-BFGS logistic regression. The old
   recipe (a few epochs of Adam, stopped early) underfit: on weak features it ended barely
   above chance.
3. **Choose the linear head by repeated cross-validation** (``selection.py``): both BatchNorm
   variants (``--recalibrate-bn auto``: the trunk's own statistics and statistics
   re-estimated on the training images) and every L2 strength on the grid, the probe's own
   among them, and the textbook probe (``C=1`` on the raw features), scored over several
   fold assignments of *every* labelled image. The textbook probe's configuration is kept
   unless another beats it by two standard errors of the paired per-image gain:
   re-estimating helps when the images are far from the trunk's domain and can cost several
   points when they are not, and one small validation split cannot tell.
4. **Train the last block** (``loop.py``), starting from that head fitted on the training
   split, when the head is not already perfect on validation, within ``time_budget`` seconds
   for the whole run. The block is kept only when it is right on clearly more validation
   images than the head (a paired sign test, cross-fitted so that no image judges a
   checkpoint it helped choose); otherwise it is put back and the head, refitted on every
   labelled image, is served.
5. **Compare with baselines the run did not tune** (``probe.py``): scikit-learn logistic
   regression on the frozen features, standardised and raw (the textbook probe), and the
   same split, written next to the model's own accuracy in ``report.json``/``report.png``.

Evaluation uses the serving preprocessing exactly. Augmentation (``crop`` by default: random
crops of 50-100% of the area, never mirrored, since a mirror changes some classes) adds cached
training views for block training. The head that starts it, and that is compared with the
probe, is fitted on the serving view like the probe: augmented views made it no better on the
three test tasks (worse on two). Only ``--train head`` fits the head on augmented views too.
``--train head|layer4|all`` and ``--recalibrate-bn yes|no`` force a choice.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from resnet_service import logs
from resnet_service.config import Settings
from resnet_service.core.images import PreprocessSpec
from resnet_service.cpus import threads_per_worker
from resnet_service.model.architecture import build_fp32
from resnet_service.model.bundle import BundleManifest, write_bundle
from resnet_service.model.datasets import SPLITS_FILE
from resnet_service.model.weights import ResolvedWeights, WeightsSource, resolve_fp32_weights
from resnet_service.training.data import Dataset, load_image_folder, stratified_split
from resnet_service.training.features import (
    Trunk,
    ViewCache,
    add_views,
    cache_views,
    recalibrate_bn,
    split_trunk,
)
from resnet_service.training.head import (
    StandardizedLinear,
    cross_validated_correct,
    fit_head,
    one_thread,
    probe_l2,
    refit,
)
from resnet_service.training.loop import LoopConfig, LoopResult, evaluate, train_block
from resnet_service.training.options import BnChoice, FinetuneConfig
from resnet_service.training.probe import ProbeResult, linear_probe
from resnet_service.training.report import REPORT_PNG as REPORT_PNG
from resnet_service.training.report import (
    Decision,
    FinetuneReport,
    HeadSummary,
    Timings,
    below_probe,
    write_report,
)
from resnet_service.training.selection import (
    Candidate,
    Paired,
    Pooled,
    choose_linear,
    cross_fitted,
    pool,
    textbook_first,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneResult:
    """The bundle written and the report that went with it."""

    manifest: BundleManifest
    report: FinetuneReport


@dataclass
class _Variant:
    """One BatchNorm choice: its network, cached activations and cross-validated heads."""

    recalibrated: bool
    model: nn.Module
    trunk: Trunk
    train: ViewCache
    val: ViewCache
    pooled: Pooled
    val_x: torch.Tensor  # the validation split's features
    correct: dict[float, torch.Tensor] | None  # per L2: per-image cross-validated correctness
    textbook_correct: torch.Tensor | None  # the textbook probe's (raw features, C=1)
    seconds: float

    def candidates(self) -> list[Candidate]:
        correct = self.correct or {}
        heads = [Candidate(self.recalibrated, l2, c) for l2, c in correct.items()]
        if self.textbook_correct is not None:
            l2 = probe_l2(self.pooled.images)
            heads.append(Candidate(self.recalibrated, l2, self.textbook_correct, False))
        return heads

    @property
    def best_cv_accuracy(self) -> float | None:
        """Its best head's cross-validated accuracy; None when nothing was cross-validated."""
        return max((c.accuracy for c in self.candidates()), default=None)


@dataclass
class _Chosen:
    """The linear head chosen: its variant and strength, fitted on the training split."""

    variant: _Variant
    l2: float
    standardised: bool
    cv_accuracy: float | None
    head: StandardizedLinear
    val_accuracy: float
    val_preds: torch.Tensor


def spec_for(image_size: int) -> PreprocessSpec:
    """ImageNet's 256/224 ratio at any size."""
    return PreprocessSpec(resize_size=round(image_size * 256 / 224), crop_size=image_size)


def confusion_matrix(targets: torch.Tensor, preds: torch.Tensor, classes: int) -> list[list[int]]:
    """Rows: true class, columns: predicted class."""
    matrix = torch.zeros(classes, classes, dtype=torch.long)
    for t, p in zip(targets.tolist(), preds.tolist(), strict=True):
        matrix[t, p] += 1
    out: list[list[int]] = matrix.tolist()
    return out


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """The run's torch thread count (``--threads``), restored after: the CLI and the tests
    call ``finetune`` in a process that has its own setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _load_split(config: FinetuneConfig, spec: PreprocessSpec) -> tuple[Dataset, Dataset, Dataset]:
    data = load_image_folder(config.data_dir, spec)
    if config.val_dir is not None:
        train_set, val_set = data, load_image_folder(config.val_dir, spec, data.classes)
    else:
        train_set, val_set = stratified_split(data, config.val_fraction, config.seed)
    for skipped in data.skipped:
        log.warning("skipped unreadable file %s", skipped)
    log.info(
        "%d classes, %d training and %d validation images",
        len(data.classes),
        len(train_set.samples),
        len(val_set.samples),
    )
    return data, train_set, val_set


def _base_model(base: ResolvedWeights, classes: int) -> nn.Module:
    model = build_fp32("resnet18", 1000)
    model.load_state_dict(base.state_dict)
    model.fc = nn.Linear(512, classes)  # replaced by the fitted head before saving
    for param in model.parameters():
        param.requires_grad = False
    return model.eval()


def _add_augmented_views(
    train: ViewCache,
    stem: nn.Module,
    train_set: Dataset,
    spec: PreprocessSpec,
    config: FinetuneConfig,
) -> None:
    """The augmented views of the training split that ``config`` asks for (none for "none")."""
    add_views(
        train, stem, train_set.images, spec, config.augment, config.augmented_views, config.seed
    )


def _variant(
    base_model: nn.Module,
    recalibrated: bool,
    train_set: Dataset,
    val_set: Dataset,
    config: FinetuneConfig,
    spec: PreprocessSpec,
) -> _Variant:
    """Cache activations (after re-estimating BatchNorm if asked) and cross-validate the
    head's L2 grid over every labelled image."""
    model = copy.deepcopy(base_model)
    if recalibrated:
        recalibrate_bn(model, train_set.images, spec)
    trunk = split_trunk(model)
    train = cache_views(trunk.stem, train_set.images, train_set.targets(), spec)
    val = cache_views(trunk.stem, val_set.images, val_set.targets(), spec)
    if config.train == "head" and config.augment != "none":  # the head is all there is
        _add_augmented_views(train, trunk.stem, train_set, spec, config)
    val_x = trunk.features(val.views[0])
    pooled = pool([trunk.features(v) for v in train.views], train.targets, val_x, val.targets)
    started = time.perf_counter()
    classes = len(train_set.classes)
    with one_thread():
        correct = cross_validated_correct(pooled.x, pooled.y, pooled.image, classes, config.seed)
        # The textbook probe as a candidate: on the trunk as loaded, at its own strength only.
        textbook = None
        if not recalibrated:
            grid, xy = (probe_l2(pooled.images),), (pooled.x, pooled.y, pooled.image)
            raw = cross_validated_correct(*xy, classes, config.seed, grid, standardise=False)
            textbook = raw[grid[0]] if raw else None
    return _Variant(
        recalibrated,
        model,
        trunk,
        train,
        val,
        pooled,
        val_x,
        correct,
        textbook,
        time.perf_counter() - started,
    )


def _choose_linear(
    variants: list[_Variant], setting: BnChoice, classes: int
) -> tuple[_Chosen, list[Decision]]:
    """The textbook probe's configuration unless another head clearly cross-validates better
    (``selection.choose_linear``), then that head fitted on the training split."""
    incumbent_variant = next((v for v in variants if not v.recalibrated), variants[0])
    images = incumbent_variant.pooled.images
    standardised = True
    if incumbent_variant.correct is None:  # a class too small to cross-validate
        variant, l2, cv, why = incumbent_variant, probe_l2(images), None, "no cross-validation"
    else:
        probes = [c for c in incumbent_variant.candidates() if c.l2 == probe_l2(images)]
        incumbent = textbook_first(probes)
        best, why = choose_linear([c for v in variants for c in v.candidates()], incumbent)
        variant = next(v for v in variants if v.recalibrated == best.recalibrated)
        l2, cv, standardised = best.l2, best.accuracy, best.standardised
    pooled = variant.pooled
    x, y = pooled.x[pooled.train], pooled.y[pooled.train]
    with one_thread():
        head = fit_head(x, y, classes, l2, standardise=standardised)
    _, val_accuracy, val_preds = evaluate(head, variant.val_x, variant.val.targets)
    log.info("head: %s; validation accuracy %.3f", why, val_accuracy)
    decisions = [
        Decision(
            "recalibrate_bn",
            "yes" if variant.recalibrated else "no",
            _bn_reason(variants, variant, setting),
        ),
        Decision("l2", f"{l2:g}", why),
        Decision(
            "features",
            "standardised" if standardised else "raw",
            "chosen with the L2 strength as one head configuration (the l2 decision says why)",
        ),
    ]
    return _Chosen(variant, l2, standardised, cv, head, val_accuracy, val_preds), decisions


def _bn_reason(variants: list[_Variant], kept: _Variant, setting: BnChoice) -> str:
    """The BatchNorm half of the one joint choice: the best cross-validated accuracy of each
    variant (the ``l2`` decision says which head and why)."""
    if setting != "auto":
        return "forced by --recalibrate-bn"
    best = {v.recalibrated: v.best_cv_accuracy for v in variants}
    if any(a is None for a in best.values()):
        return "no cross-validation: the trunk's own statistics, as the probe uses"
    name = {False: "the trunk's own statistics", True: "re-estimated statistics"}
    other = not kept.recalibrated
    return (
        f"chosen with the L2 strength as one head configuration; best cross-validated: "
        f"{name[kept.recalibrated]} {best[kept.recalibrated]:.1%}, {name[other]} {best[other]:.1%}"
    )


def _probes(
    base_model: nn.Module,
    variants: list[_Variant],
    train_set: Dataset,
    val_set: Dataset,
    spec: PreprocessSpec,
) -> tuple[ProbeResult | None, ProbeResult | None]:
    """The baselines (standardised, textbook) on the trunk *as loaded*: that variant's
    features when there is one (its pooled rows start with the training split's serving
    views), else computed here."""
    base = next((v for v in variants if not v.recalibrated), None)
    if base is not None:
        train_x, val_x = base.pooled.x[: base.train.num_images], base.val_x
        train_y, val_y = base.train.targets, base.val.targets
    else:
        trunk = split_trunk(base_model)
        train = cache_views(trunk.stem, train_set.images, train_set.targets(), spec)
        val = cache_views(trunk.stem, val_set.images, val_set.targets(), spec)
        train_x, val_x = trunk.features(train.views[0]), trunk.features(val.views[0])
        train_y, val_y = train.targets, val.targets
    return (
        linear_probe(train_x, train_y, val_x, val_y),
        linear_probe(train_x, train_y, val_x, val_y, standardise=False),
    )


def _train_block(
    chosen: _Chosen,
    part: Literal["layer4", "all"],
    train_set: Dataset,
    val_set: Dataset,
    config: FinetuneConfig,
    spec: PreprocessSpec,
    deadline: float,
) -> LoopResult:
    """Layer4 (+ head) on cached stem activations, or everything on cached images."""
    trunk, head, targets = chosen.variant.trunk, chosen.head, chosen.variant.val.targets
    if part == "layer4":
        model = nn.Sequential(trunk.block, trunk.pool, head)
        trainable: list[nn.Module] = [trunk.block, head]
        train, val_inputs = chosen.variant.train, chosen.variant.val.views[0]
        _add_augmented_views(train, trunk.stem, train_set, spec, config)
    else:
        model = nn.Sequential(trunk.stem, trunk.block, trunk.pool, head)
        trainable = [trunk.stem, trunk.block, head]
        identity = nn.Identity()
        train = cache_views(
            identity,
            train_set.images,
            train_set.targets(),
            spec,
            config.augment,
            config.augmented_views,
            config.seed,
        )
        val_inputs = cache_views(identity, val_set.images, val_set.targets(), spec).views[0]
    steps_per_epoch = math.ceil(train.num_images / config.batch_size)
    loop = LoopConfig(
        lr=config.lr,
        weight_decay=config.weight_decay,
        batch_size=config.batch_size,
        max_steps=max(config.min_steps, config.epochs * steps_per_epoch),
        min_steps=config.min_steps,
        patience=config.patience,
        eval_every=config.eval_every,
        deadline=deadline,
        seed=config.seed,
        progress=config.progress,
    )
    return train_block(model, trainable, train, val_inputs, targets, loop)


def _block_decision(
    config: FinetuneConfig, head_accuracy: float, deadline: float
) -> tuple[Literal["layer4", "all"] | None, Decision]:
    if config.train == "head":
        return None, Decision("train", "head", "forced by --train head")
    if config.train in ("layer4", "all"):
        part: Literal["layer4", "all"] = "all" if config.train == "all" else "layer4"
        return part, Decision("train", part, f"forced by --train {part}")
    if head_accuracy >= 1.0:
        return None, Decision("train", "head", "the head is already perfect on validation")
    if time.monotonic() >= deadline:
        return None, Decision("train", "head", "no time left in --time-budget for layer4")
    return "layer4", Decision("train", "layer4", "tried: the head is not perfect on validation")


def finetune(config: FinetuneConfig, settings: Settings) -> FinetuneResult:
    """Train, choose on validation, write a bundle with its report (see the module doc)."""
    logs.adopt("torch")  # torch installed its own stderr handler on import
    with _torch_threads(threads_per_worker(settings.inference_threads, 1)):
        return _finetune(config, settings)


def _fit_heads(
    config: FinetuneConfig,
    base_model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    spec: PreprocessSpec,
) -> tuple[_Chosen, list[Decision], HeadSummary, tuple[ProbeResult | None, ProbeResult | None]]:
    """Heads on each BatchNorm variant asked for, the one kept, and the probe baselines.
    Only the kept variant outlives this call (its caches are what block training needs)."""
    recal_options = {"auto": [False, True], "yes": [True], "no": [False]}[config.recalibrate_bn]
    variants = [_variant(base_model, r, train_set, val_set, config, spec) for r in recal_options]
    chosen, decisions = _choose_linear(variants, config.recalibrate_bn, len(train_set.classes))
    probes = _probes(base_model, variants, train_set, val_set, spec)
    others = [
        v.best_cv_accuracy
        for v in variants
        if v is not chosen.variant and v.best_cv_accuracy is not None
    ]
    summary = HeadSummary(
        l2=chosen.l2,
        standardised=chosen.standardised,
        cv_accuracy=chosen.cv_accuracy,
        val_accuracy=chosen.val_accuracy,
        cv_accuracy_other_bn=others[0] if others else None,
        seconds=sum(v.seconds for v in variants),
    )
    return chosen, decisions, summary, probes


@dataclass(frozen=True)
class _Trained:
    """What the train phase kept: its name, why, the loop's record, validation predictions."""

    part: str
    decision: Decision
    result: LoopResult | None
    val_preds: torch.Tensor


def _train_phase(
    config: FinetuneConfig,
    chosen: _Chosen,
    train_set: Dataset,
    val_set: Dataset,
    spec: PreprocessSpec,
    deadline: float,
) -> _Trained:
    """What was trained in the end, and why. Under ``--train auto`` the block is kept only on
    a clear paired win over the head (``selection.py``); otherwise it is put back as it was."""
    part, decision = _block_decision(config, chosen.val_accuracy, deadline)
    if part is None:
        return _Trained("head", decision, None, chosen.val_preds)
    block = chosen.variant.trunk.block
    before = copy.deepcopy((block.state_dict(), chosen.head.state_dict()))
    result = _train_block(chosen, part, train_set, val_set, config, spec, deadline)
    outcome = f"best validation at step {result.best_step} of {result.steps_run}"
    if config.train == "auto":
        targets = chosen.variant.val.targets
        comparison: Paired = cross_fitted(targets, chosen.val_preds, result.checkpoints)
        kept = comparison.clear_win
        outcome += (
            f"; each image judged at the checkpoint the others chose, {comparison.describe()}"
        )
    else:
        kept = result.best_step > 0
    if not kept:
        block.load_state_dict(before[0])
        chosen.head.load_state_dict(before[1])
        outcome += f": {part} not kept, the head is served"
    reason = f"{decision.reason}; {outcome} (stopped: {result.stopped_because})"
    trained = part if kept else "head"
    return _Trained(
        trained,
        Decision("train", trained, reason),
        result,
        result.best.preds if kept else chosen.val_preds,
    )


def _served_head(chosen: _Chosen, classes: int) -> tuple[nn.Linear, Decision]:
    """The head that goes into the bundle when the head is all that was trained: the chosen
    strength refitted on every labelled image (training and validation splits)."""
    pooled = chosen.variant.pooled
    head = refit(pooled.x, pooled.y, classes, chosen.l2, chosen.standardised)
    reason = (
        f"refitted on all {pooled.images} labelled images (the validation figures are the "
        "training split's fit)"
    )
    return head.folded(), Decision("refit", "train+val", reason)


def _finetune(config: FinetuneConfig, settings: Settings) -> FinetuneResult:
    started = time.monotonic()
    deadline = started + config.time_budget
    torch.manual_seed(config.seed)
    spec = spec_for(config.image_size)
    data, train_set, val_set = _load_split(config, spec)
    base = resolve_fp32_weights(
        settings.weights_path,
        allow_downloads=settings.allow_downloads,
        allow_random=settings.allow_random_weights,
    )
    base_model = _base_model(base, len(data.classes))
    loaded = time.monotonic()
    chosen, head_decisions, head, probes = _fit_heads(config, base_model, train_set, val_set, spec)
    heads_done = time.monotonic()
    trained = _train_phase(config, chosen, train_set, val_set, spec, deadline)
    result = trained.result
    block_done = time.monotonic()

    model = chosen.variant.model
    decisions = [*head_decisions, trained.decision]
    if trained.part == "head":
        model.fc, head_decision = _served_head(chosen, len(data.classes))
        decisions.append(head_decision)
    else:
        model.fc = chosen.head.folded()
    val_targets = torch.tensor(val_set.targets())
    report = FinetuneReport(
        val_accuracy=float((trained.val_preds == val_targets).float().mean()),
        trained=trained.part,
        recalibrated_bn=chosen.variant.recalibrated,
        best_step=result.best_step if result else 0,
        steps_run=result.steps_run if result else 0,
        head=head,
        probe=probes[0],
        textbook_probe=probes[1],
        decisions=decisions,
        timings=Timings(
            load=loaded - started,
            features=heads_done - loaded - head.seconds,
            head=head.seconds,
            block=block_done - heads_done,
            total=time.monotonic() - started,
        ),
        time_budget=config.time_budget,
        history=result.history if result else [],
        confusion=confusion_matrix(val_targets, trained.val_preds, len(data.classes)),
    )
    manifest = _write(config, data, train_set, val_set, base, model, report, spec)
    _log_summary(report)
    return FinetuneResult(manifest, report)


def _write(
    config: FinetuneConfig,
    data: Dataset,
    train_set: Dataset,
    val_set: Dataset,
    base: ResolvedWeights,
    model: nn.Module,
    report: FinetuneReport,
    spec: PreprocessSpec,
) -> BundleManifest:
    """The bundle (weights, labels, provenance), the split files and the report."""
    root = config.data_dir.resolve()
    provenance: dict[str, Any] = {
        "source": f"fine-tuned from torchvision ResNet18 ({base.source.value} weights)",
        "base_weights_sha256": base.sha256,
        "base_random_weights": base.source is WeightsSource.RANDOM,
        "train_dir": str(root),
        "val_dir": str(config.val_dir.resolve()) if config.val_dir else None,
        "data_fingerprint": data.fingerprint,
        "class_counts": data.counts(),
        "train_images": len(train_set.samples),
        "val_images": len(val_set.samples),
        "skipped_files": data.skipped,
        "trained": report.trained,
        "recalibrated_bn": report.recalibrated_bn,
        "steps_run": report.steps_run,
        "best_step": report.best_step,
        "val_accuracy": report.val_accuracy,
        **report.probe_accuracies(),
        "confusion_matrix": report.confusion,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
    }
    manifest = BundleManifest(
        name=config.name or config.out_dir.resolve().name,  # what the user called it
        architecture="resnet18",
        num_classes=len(data.classes),
        precision="fp32",
        weights_sha256="0" * 64,
        preprocessing=spec,
        random_weights=base.source is WeightsSource.RANDOM,
        provenance=provenance,
    )
    written = write_bundle(config.out_dir, manifest, model.state_dict(), data.classes)
    splits = {
        "root": str(root),
        "train": [[str(s.path.resolve()), s.target] for s in train_set.samples],
        "val": [[str(s.path.resolve()), s.target] for s in val_set.samples],
        # A served head alone is refitted on both splits (``_served_head``): int8 fidelity
        # measured on "validation" then reads images the head has seen, and says so.
        "head_fitted_on": "train+val" if report.trained == "head" else "train",
    }
    (config.out_dir / SPLITS_FILE).write_text(json.dumps(splits))
    write_report(config.out_dir, report, data.classes)
    return written


def _log_summary(report: FinetuneReport) -> None:
    probe, textbook = report.probe, report.textbook_probe
    log.info(
        "validation accuracy %.1f%% (%s%s) vs linear probe %s, textbook probe %s, in %.1fs "
        "(budget %.0fs)",
        100 * report.val_accuracy,
        report.trained,
        ", re-estimated BatchNorm" if report.recalibrated_bn else "",
        f"{100 * probe.val_accuracy:.1f}%" if probe else "n/a",
        f"{100 * textbook.val_accuracy:.1f}%" if textbook else "n/a",
        report.timings.total,
        report.time_budget,
    )
    if any(p and below_probe(report.val_accuracy, p.val_accuracy) for p in (probe, textbook)):
        log.warning(
            "the model validates below the linear-probe baseline: see report.json; more "
            "images, --augment crop, or --train head may do better"
        )
