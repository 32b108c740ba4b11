"""Transfer learning: ImageNet ResNet18 -> a new head (and optionally more) for your classes.

The frozen part of the network runs without gradients (and, without augmentation, only once:
its outputs are cached), so training the head or the last block takes seconds to minutes on a
CPU. Evaluation uses the serving preprocessing exactly; training adds augmentation on top.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from resnet_service.config import Settings
from resnet_service.images import PreprocessSpec, normalise, preprocess
from resnet_service.model.architecture import build_fp32
from resnet_service.model.bundle import BundleManifest, write_bundle
from resnet_service.model.datasets import SPLITS_FILE
from resnet_service.model.weights import WeightsSource, resolve_fp32_weights
from resnet_service.training.data import load_image_folder, stratified_split

log = logging.getLogger(__name__)

TrainPart = Literal["head", "layer4", "all"]
Augment = Literal["none", "crop", "crop-flip"]
REPORT_JSON = "report.json"
REPORT_PNG = "report.png"


@dataclass
class FinetuneConfig:
    """Options of ``resnet-service finetune``."""

    data_dir: Path
    out_dir: Path
    val_dir: Path | None = None
    val_fraction: float = 0.2
    epochs: int = 15
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    train: TrainPart = "head"
    augment: Augment = "crop-flip"
    image_size: int = 224
    patience: int = 4
    seed: int = 0
    recalibrate_bn: bool = False
    name: str | None = None
    progress: bool = True


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float


@dataclass
class FinetuneResult:
    manifest: BundleManifest
    val_accuracy: float
    best_epoch: int
    history: list[EpochStats] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)


def spec_for(image_size: int) -> PreprocessSpec:
    """ImageNet's 256/224 ratio at any size."""
    return PreprocessSpec(resize_size=round(image_size * 256 / 224), crop_size=image_size)


def _split(model: nn.Module, part: TrainPart) -> tuple[nn.Module, nn.Module]:
    """(frozen trunk, trainable rest); both share the modules of ``model``."""
    m: Any = model
    stem = [m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3]
    tail = [m.avgpool, nn.Flatten(1), m.fc]
    if part == "head":
        return nn.Sequential(*stem, m.layer4, m.avgpool, nn.Flatten(1)), m.fc
    if part == "layer4":
        return nn.Sequential(*stem), nn.Sequential(m.layer4, *tail)
    return nn.Identity(), nn.Sequential(*stem, m.layer4, *tail)


def _recalibrate_bn(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Re-estimate BatchNorm statistics on the training images (a cumulative average)."""
    saved = {}
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            saved[module] = module.momentum
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for module, momentum in saved.items():
        module.momentum = momentum
    model.eval()


def _augmenter(
    spec: PreprocessSpec, augment: Augment
) -> Callable[[Image.Image], np.ndarray] | None:
    if augment == "none":
        return None
    steps: list[Any] = [
        transforms.RandomResizedCrop(spec.crop_size, scale=(0.5, 1.0), antialias=True),
    ]
    if augment == "crop-flip":
        steps.append(transforms.RandomHorizontalFlip())
    pipeline = transforms.Compose(steps)
    return lambda img: normalise(pipeline(img), spec)


def _stack(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays))


def _features(trunk: nn.Module, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([trunk(part) for part in torch.split(x, batch)])


def _evaluate(
    head: nn.Module, feats: torch.Tensor, targets: torch.Tensor
) -> tuple[float, float, torch.Tensor]:
    head.eval()
    with torch.no_grad():
        logits = torch.cat([head(part) for part in torch.split(feats, 128)])
    loss = nn.functional.cross_entropy(logits, targets).item()
    preds = logits.argmax(1)
    return loss, (preds == targets).float().mean().item(), preds


def confusion_matrix(targets: torch.Tensor, preds: torch.Tensor, classes: int) -> list[list[int]]:
    matrix = torch.zeros(classes, classes, dtype=torch.long)
    for t, p in zip(targets.tolist(), preds.tolist(), strict=True):
        matrix[t, p] += 1
    return matrix.tolist()


def finetune(config: FinetuneConfig, settings: Settings) -> FinetuneResult:
    """Train, pick the best epoch on validation, write a bundle with its report."""
    torch.manual_seed(config.seed)
    spec = spec_for(config.image_size)
    data = load_image_folder(config.data_dir, spec)
    if config.val_dir is not None:
        train_set, val_set = data, load_image_folder(config.val_dir, spec, data.classes)
    else:
        train_set, val_set = stratified_split(data, config.val_fraction, config.seed)
    for skipped in data.skipped:
        log.warning("skipped unreadable file %s", skipped)
    classes = data.classes
    log.info(
        "%d classes, %d training and %d validation images",
        len(classes),
        len(train_set.samples),
        len(val_set.samples),
    )
    base = resolve_fp32_weights(
        settings.weights_path,
        allow_downloads=settings.allow_downloads,
        allow_random=settings.allow_random_weights,
    )
    model = build_fp32("resnet18", 1000)
    model.load_state_dict(base.state_dict)
    model.fc = nn.Linear(512, len(classes))  # ResNet18 features
    trunk, head = _split(model, config.train)
    for param in model.parameters():
        param.requires_grad = False
    for param in head.parameters():
        param.requires_grad = True

    eval_train = _stack([preprocess(img, spec) for img in train_set.images])
    eval_val = _stack([preprocess(img, spec) for img in val_set.images])
    if config.recalibrate_bn:
        _recalibrate_bn(model, list(torch.split(eval_train, 64)))
    trunk.eval()
    y_train = torch.tensor(train_set.targets())
    y_val = torch.tensor(val_set.targets())
    augment = _augmenter(spec, config.augment)
    cached_train = _features(trunk, eval_train) if augment is None else None
    val_feats = _features(trunk, eval_val)

    optimizer = torch.optim.AdamW(
        [p for p in head.parameters()], lr=config.lr, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    history: list[EpochStats] = []
    best = (-1.0, float("inf"))
    best_state: dict[str, torch.Tensor] = copy.deepcopy(model.state_dict())
    best_epoch = 0
    stale = 0
    from tqdm import tqdm

    bar = tqdm(
        range(1, config.epochs + 1), desc="finetune", unit="epoch", disable=not config.progress
    )
    for epoch in bar:
        started = time.perf_counter()
        head.train()
        order = torch.randperm(len(y_train), generator=generator)
        total_loss, correct = 0.0, 0
        for batch_idx in torch.split(order, config.batch_size):
            if cached_train is not None:
                feats = cached_train[batch_idx]
            else:
                assert augment is not None
                x = _stack([augment(train_set.images[i]) for i in batch_idx.tolist()])
                feats = _features(trunk, x)
            logits = head(feats)
            loss = nn.functional.cross_entropy(logits, y_train[batch_idx])
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total_loss += loss.item() * len(batch_idx)
            correct += int((logits.argmax(1) == y_train[batch_idx]).sum())
        val_loss, val_acc, _ = _evaluate(head, val_feats, y_val)
        stats = EpochStats(
            epoch,
            total_loss / len(y_train),
            correct / len(y_train),
            val_loss,
            val_acc,
            time.perf_counter() - started,
        )
        history.append(stats)
        bar.set_postfix(
            loss=f"{stats.train_loss:.3f}",
            acc=f"{stats.train_accuracy:.3f}",
            val_acc=f"{val_acc:.3f}",
        )
        log.info(
            "epoch %d: loss %.4f acc %.3f | val loss %.4f acc %.3f (%.1fs)",
            epoch,
            stats.train_loss,
            stats.train_accuracy,
            val_loss,
            val_acc,
            stats.seconds,
        )
        if (val_acc, -val_loss) > (best[0], -best[1]):
            best, best_epoch, stale = (val_acc, val_loss), epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= config.patience:
                log.info("early stop: no validation improvement for %d epochs", stale)
                break

    model.load_state_dict(best_state)
    _, val_acc, preds = _evaluate(head, val_feats, y_val)
    confusion = confusion_matrix(y_val, preds, len(classes))
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
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "val_accuracy": val_acc,
        "confusion_matrix": confusion,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
    }
    manifest = BundleManifest(
        name=config.name or f"resnet18-{config.data_dir.name}",
        architecture="resnet18",
        num_classes=len(classes),
        precision="fp32",
        weights_sha256="0" * 64,
        preprocessing=spec,
        random_weights=base.source is WeightsSource.RANDOM,
        provenance=provenance,
    )
    written = write_bundle(config.out_dir, manifest, model.state_dict(), classes)
    splits = {
        "root": str(root),
        "train": [[str(s.path.resolve()), s.target] for s in train_set.samples],
        "val": [[str(s.path.resolve()), s.target] for s in val_set.samples],
    }
    (config.out_dir / SPLITS_FILE).write_text(json.dumps(splits))
    result = FinetuneResult(written, val_acc, best_epoch, history, confusion)
    write_report(config.out_dir, result, classes)
    return result


def write_report(out_dir: Path, result: FinetuneResult, classes: list[str]) -> None:
    """report.json always; report.png (learning curves + confusion matrix) with matplotlib."""
    report = {
        "val_accuracy": result.val_accuracy,
        "best_epoch": result.best_epoch,
        "history": [asdict(h) for h in result.history],
        "classes": classes,
        "confusion_matrix": result.confusion,
    }
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install matplotlib)", REPORT_PNG)
        return
    epochs = [h.epoch for h in result.history]
    fig, (curves, matrix) = plt.subplots(1, 2, figsize=(12, 5))
    curves.plot(epochs, [h.train_loss for h in result.history], label="train loss")
    curves.plot(epochs, [h.val_loss for h in result.history], label="val loss")
    curves.plot(epochs, [h.train_accuracy for h in result.history], "--", label="train acc")
    curves.plot(epochs, [h.val_accuracy for h in result.history], "--", label="val acc")
    curves.axvline(result.best_epoch, color="grey", lw=0.8)
    curves.set_xlabel("epoch")
    curves.set_title(f"Learning curves (best epoch {result.best_epoch})")
    curves.legend()
    counts = np.array(result.confusion)
    matrix.imshow(counts, cmap="Blues")
    matrix.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 10 else 0)
    matrix.set_yticks(range(len(classes)), classes)
    matrix.set_xlabel("predicted")
    matrix.set_ylabel("true")
    matrix.set_title(f"Validation confusion (accuracy {result.val_accuracy:.1%})")
    if len(classes) <= 20:
        for (i, j), value in np.ndenumerate(counts):
            colour = "white" if value > counts.max() / 2 else "black"
            matrix.text(j, i, str(value), ha="center", va="center", fontsize=8, color=colour)
    fig.tight_layout()
    fig.savefig(out_dir / REPORT_PNG, dpi=100)
    plt.close(fig)
