"""Fine-tuning on real data a package ships (scikit-learn's digits), end to end over HTTP.

The digits run uses ``finetune``'s *default* recipe (only the image size is reduced, to keep
the test short), and checks the bundle, the report, int8 quantization and the served API.
The helpers below are shared with ``test_training_quality.py``, which runs the probe and
serving checks on the seven-task suite.

Thresholds are for the tests' *random* starting weights (no ImageNet weights offline); they
are the ones the previous recipe's test had (which forced ``--train layer4 --recalibrate-bn``);
measured with the default recipe: see docs/finetuning.md. Chance is 10%.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torchvision.models import resnet18

from resnet_bench.tasks import write_digits
from resnet_service.cli import main
from resnet_service.core.errors import DatasetError
from resnet_service.core.images import LOCAL_FILE_LIMITS, PreprocessSpec, decode_and_preprocess
from resnet_service.cpus import reachable_isa_levels
from resnet_service.model.bundle import instantiate, read_labels, read_manifest, read_weights
from resnet_service.model.datasets import bundle_splits
from resnet_service.training.data import load_image_folder, stratified_split
from resnet_service.training.finetune import spec_for
from tests.harness import serve
from tests.outputs_checks import int8_outputs_agree

FP32_MIN_ACCURACY = 0.90
INT8_MIN_ACCURACY = 0.88
MIN_AGREEMENT = 0.98
#: Issue 10's bar for every int8 runtime: accuracy within 1.5 points of fp32.
MAX_INT8_ACCURACY_DROP = 0.015
HTTP_MIN_ACCURACY = 0.88
#: The served int8 model against the fp32 bundle on the same held-out images.
MAX_INT8_DROP = 0.03
#: Small inputs keep the test short; everything else is the default recipe.
TEST_IMAGE_SIZE = "64"


# --- shared by the quality tests ------------------------------------------------------------
def common_flags(cache: Path) -> list[str]:
    return ["--offline", "--cache-dir", str(cache), "--threads", "2"]


@dataclass(frozen=True)
class FinetuneRun:
    """``finetune``'s JSON summary line, and the wall time around it."""

    val_accuracy: float
    probe_val_accuracy: float
    textbook_probe_val_accuracy: float
    trained: str
    recalibrated_bn: bool
    wall_seconds: float


def run_default_finetune(
    train_dir: Path,
    bundle: Path,
    tmp_path: Path,
    weights_file: Path,
    capsys: pytest.CaptureFixture[str],
    seed: int = 0,
) -> FinetuneRun:
    """``finetune`` with default options (small images; ``--seed`` when not 0)."""
    started = time.perf_counter()
    code = main(
        [
            "finetune",
            str(train_dir),
            "--out",
            str(bundle),
            "--image-size",
            TEST_IMAGE_SIZE,
            "--no-progress",
            "--weights",
            str(weights_file),
            "--seed",
            str(seed),
            *common_flags(tmp_path / "cache"),
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Block training's figures are named as such: a "best_step" beside "trained": "head" read
    # as if the block had been kept.
    assert "best_step" not in summary
    assert summary["block_kept"] is (summary["trained"] != "head")
    return FinetuneRun(
        val_accuracy=summary["val_accuracy"],
        probe_val_accuracy=summary["probe_val_accuracy"],
        textbook_probe_val_accuracy=summary["textbook_probe_val_accuracy"],
        trained=summary["trained"],
        recalibrated_bn=summary["recalibrated_bn"],
        wall_seconds=time.perf_counter() - started,
    )


def _inputs(paths: list[Path], spec: PreprocessSpec) -> torch.Tensor:
    arrays = [decode_and_preprocess(p.read_bytes(), LOCAL_FILE_LIMITS, spec) for p in paths]
    return torch.from_numpy(np.stack(arrays))


@dataclass(frozen=True)
class ProbeFigures:
    val_accuracy: float  # fitted on the training split, scored on the validation split
    test_accuracy: float  # fitted on every labelled image finetune was given, held-out files
    test_right: list[bool]  # per held-out file, in order: was that probe right?


def _probe(standardise: bool) -> Any:
    scaling = [StandardScaler()] if standardise else []
    return make_pipeline(*scaling, LogisticRegression(C=1.0, max_iter=5000))


def independent_probes(
    bundle: Path, weights_file: Path, test_files: list[Path]
) -> tuple[ProbeFigures, ProbeFigures]:
    """The baselines recomputed here, not by the product: scikit-learn logistic regression on
    the *base* weights' 512-d features, standardised, and the textbook probe on the raw
    features (at the bundle's preprocessing: torchvision's reference one at 224 px, scaled to
    the suite's size). Each fitted on the bundle's training split and scored on its validation
    split (the figures ``report.json`` gives), and fitted on both splits (every labelled image
    ``finetune`` was given, as a user would fit a probe) and scored on the held-out files (the
    comparison the issues ask for)."""
    spec = read_manifest(bundle).preprocessing
    splits = json.loads((bundle / "splits.json").read_text())
    trunk = resnet18()
    trunk.load_state_dict(torch.load(weights_file, weights_only=True))
    trunk.fc = torch.nn.Identity()
    trunk.eval()

    def features(paths: list[Path]) -> np.ndarray:
        with torch.no_grad():
            out: np.ndarray = trunk(_inputs(paths, spec)).double().numpy()
        return out

    def split(name: str) -> tuple[np.ndarray, np.ndarray]:
        paths = [Path(p) for p, _ in splits[name]]
        return features(paths), np.array([t for _, t in splits[name]])

    (train_x, train_y), (val_x, val_y) = split("train"), split("val")
    labels = read_labels(bundle, read_manifest(bundle).num_classes)
    test_x = features(test_files)
    test_y = np.array([labels.index(f.parent.name) for f in test_files])

    def figures(standardise: bool) -> ProbeFigures:
        on_train = _probe(standardise).fit(train_x, train_y)
        all_x, all_y = np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])
        right = _probe(standardise).fit(all_x, all_y).predict(test_x) == test_y
        return ProbeFigures(
            val_accuracy=float(np.mean(on_train.predict(val_x) == val_y)),
            test_accuracy=float(np.mean(right)),
            test_right=[bool(r) for r in right],
        )

    return figures(True), figures(False)


def fp32_folder_accuracy(bundle: Path, files: list[Path]) -> float:
    """The fp32 bundle in process, serving preprocessing, on labelled files."""
    manifest = read_manifest(bundle)
    labels = read_labels(bundle, manifest.num_classes)
    model = instantiate(manifest, read_weights(bundle, manifest))
    with torch.no_grad():
        preds = model(_inputs(files, manifest.preprocessing)).argmax(1).tolist()
    return float(np.mean([labels[p] == f.parent.name for p, f in zip(preds, files, strict=True)]))


def classify_over_http(url: str, files: list[Path]) -> list[dict[str, object]]:
    """Every file through ``POST /classify/batch`` (top 1), in order."""

    async def classify_all() -> list[dict[str, object]]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            out: list[dict[str, object]] = []
            for start in range(0, len(files), 50):
                chunk = files[start : start + 50]
                parts = [("images", (p.name, p.read_bytes(), "image/png")) for p in chunk]
                response = await client.post("/classify/batch?top_k=1", files=parts)
                assert response.status_code == 200
                out.extend(response.json()["results"])
            return out

    return asyncio.run(classify_all())


def http_right(results: list[dict[str, object]], files: list[Path]) -> list[bool]:
    """Per file, in order: was the served top-1 label its folder's?"""
    labels = [r["predictions"][0]["label"] for r in results]  # type: ignore[index]
    assert len(labels) == len(files)
    return [label == f.parent.name for label, f in zip(labels, files, strict=True)]


def http_accuracy(results: list[dict[str, object]], files: list[Path]) -> float:
    return float(np.mean(http_right(results, files)))


@dataclass(frozen=True)
class TaskFigures:
    """One evaluation task's numbers, as the closing note and docs/finetuning.md report them."""

    task: str
    probe_val_accuracy: float
    val_accuracy: float
    probe_test_accuracy: float
    textbook_val_accuracy: float
    textbook_test_accuracy: float
    trained: str
    recalibrated_bn: bool
    quantize_fp32_val_accuracy: float
    quantize_int8_val_accuracy: float
    fp32_test_accuracy: float
    int8_http_test_accuracy: float
    test_images: int
    finetune_wall_seconds: float
    why: list[str]  # the report's decisions, in its words
    #: Held-out images the served model got and the probe missed, and the other way round.
    wins: int = 0
    losses: int = 0
    #: The same against the textbook probe (raw features).
    textbook_wins: int = 0
    textbook_losses: int = 0


def decision_reasons(bundle: Path) -> list[str]:
    """Why ``finetune`` chose what it did, in its report's words."""
    return [d["reason"] for d in json.loads((bundle / "report.json").read_text())["decisions"]]


def show(figures: TaskFigures, capsys: pytest.CaptureFixture[str]) -> None:
    """One JSON line per task on the terminal (``pytest -s``): the closing note's table."""
    with capsys.disabled():
        print("\nTASK " + json.dumps(asdict(figures)))


def quantize_bundle(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], runtime: str = "openvino"
) -> dict[str, float]:
    """``quantize --bundle``: int8 calibrated on the training split, scored on validation
    (the default runtime unless another is named)."""
    flags = [*common_flags(tmp_path / "cache"), "--runtime", runtime]
    assert main(["quantize", "--bundle", str(bundle), *flags]) == 0
    row = json.loads(capsys.readouterr().out)
    fidelity: dict[str, float] = row.get("fidelity") or row["quantization"]["fidelity"]
    return fidelity


def evaluate_bundle(
    task: str,
    summary: FinetuneRun,
    bundle: Path,
    test_dir: Path,
    tmp_path: Path,
    weights_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> TaskFigures:
    """Probe (recomputed), quantize, serve int8 over HTTP, fp32 in process: the figures."""
    files = sorted(test_dir.rglob("*.png"))
    probe, textbook = independent_probes(bundle, weights_file, files)
    val_images = json.loads((bundle / "bundle.json").read_text())["provenance"]["val_images"]
    assert summary.probe_val_accuracy == pytest.approx(probe.val_accuracy, abs=1.01 / val_images)
    assert summary.textbook_probe_val_accuracy == pytest.approx(
        textbook.val_accuracy, abs=1.01 / val_images
    )
    fidelity = quantize_bundle(bundle, tmp_path, capsys)
    cache = str(tmp_path / "cache")
    with serve(tmp_path, "--bundle", str(bundle), "--cache-dir", cache, "--offline") as server:
        served = http_right(classify_over_http(server.url, files), files)
    return task_figures(task, summary, (probe, textbook), fidelity, served, files, bundle)


def task_figures(
    task: str,
    summary: FinetuneRun,
    probes: tuple[ProbeFigures, ProbeFigures],
    fidelity: dict[str, float],
    served: list[bool],
    files: list[Path],
    bundle: Path,
) -> TaskFigures:
    """The figures of one task from its parts: ``served`` says, per held-out file, whether the
    int8 model over HTTP was right; ``probes`` are the standardised and textbook probes."""
    probe, textbook = probes

    def wins_and_losses(theirs: list[bool]) -> tuple[int, int]:
        pairs = list(zip(served, theirs, strict=True))
        return sum(m and not t for m, t in pairs), sum(t and not m for m, t in pairs)

    wins, losses = wins_and_losses(probe.test_right)
    textbook_wins, textbook_losses = wins_and_losses(textbook.test_right)
    return TaskFigures(
        task=task,
        probe_val_accuracy=probe.val_accuracy,
        val_accuracy=summary.val_accuracy,
        probe_test_accuracy=probe.test_accuracy,
        textbook_val_accuracy=textbook.val_accuracy,
        textbook_test_accuracy=textbook.test_accuracy,
        trained=summary.trained,
        recalibrated_bn=summary.recalibrated_bn,
        quantize_fp32_val_accuracy=fidelity["fp32_accuracy"],
        quantize_int8_val_accuracy=fidelity["int8_accuracy"],
        fp32_test_accuracy=fp32_folder_accuracy(bundle, files),
        int8_http_test_accuracy=float(np.mean(served)),
        test_images=len(files),
        finetune_wall_seconds=summary.wall_seconds,
        why=decision_reasons(bundle),
        wins=wins,
        losses=losses,
        textbook_wins=textbook_wins,
        textbook_losses=textbook_losses,
    )


# --- int8 fidelity at every instruction-set level this host has -----------------------------
#: Measured on the digits model (200 images), OpenVINO: 98.5% agreement and a 1.0-point drop
#: at every level on an AMD EPYC (AVX2, AVX512_CORE, AVX512_CORE_VNNI) with the old overflow
#: fix; on a Xeon with AVX512_CORE_BF16, without it, 99.5-100% and -0.5 to 0 points. Torch on
#: that Xeon, built under each cap: 98.5%, 0 to 0.5 points (the VNNI host's build run at AVX2
#: or AVX512_CORE instead: 94.5-95%, 2-2.5 points: saturation). The retrained-layer4 stripes
#: model (120 images, ``test_training_quality``), seeds 0-2: see the closing note's table.
#: The bars leave two images of margin below the lowest on 200 images, three on 120.
ISA_MIN_AGREEMENT: Final = 0.975
ISA_MAX_DROP: Final = 0.02
_LOGITS_AT_LEVEL: Final = """
import sys, numpy as np
from pathlib import Path
from resnet_service.config import Settings
from resnet_service.model.served import open_served_model
from resnet_service.runtimes.registry import open_runtime
runtime, model, cache, inputs, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
if runtime == "openvino":  # the artifact built on this host, run at the capped level
    served = open_runtime("openvino", "int8", model, 1)
else:  # torch: built at the capped level too (its qconfig follows VNNI), as such a host would
    settings = Settings(bundle_path=model, runtime="torch", precision="int8",
                        model_cache_dir=Path(cache), allow_downloads=False, inference_threads=1)
    served = open_served_model(settings).runtime
served.bind_thread()
x = np.load(inputs)
np.save(out, np.concatenate([served.infer(x[i : i + 16]) for i in range(0, len(x), 16)]))
"""


@dataclass(frozen=True)
class IsaFigure:
    """One int8 runtime at one capped instruction-set level, against fp32."""

    runtime: str
    level: str
    agreement: float
    drop: float  # fp32 accuracy - int8 accuracy, on the same held-out images


def int8_agrees_at_every_isa_level(
    runtimes: tuple[str, ...], bundle: Path, cache: Path, files: list[Path]
) -> None:
    """``int8_at_every_isa_level``, each figure held to the ISA bars."""
    for figure in int8_at_every_isa_level(runtimes, bundle, cache, files):
        assert figure.agreement >= ISA_MIN_AGREEMENT, figure
        assert figure.drop <= ISA_MAX_DROP, figure


def int8_at_every_isa_level(
    runtimes: tuple[str, ...], bundle: Path, cache: Path, files: list[Path]
) -> list[IsaFigure]:
    """Int8 models against fp32 on held-out images, with oneDNN capped at each reachable
    level in turn: one host proves the kinds below it. OpenVINO: the artifact built here;
    torch: built under the cap as well (its qconfig depends on VNNI). ONNX Runtime is not
    run: its kernels dispatch on the CPU itself and ignore the cap (identical logits at every
    level, measured)."""
    manifest = read_manifest(bundle)
    labels = read_labels(bundle, manifest.num_classes)
    inputs = _inputs(files, manifest.preprocessing)
    model = instantiate(manifest, read_weights(bundle, manifest))
    with torch.no_grad():
        fp32 = model(inputs).argmax(1).numpy()
    truth = np.array([labels.index(f.parent.name) for f in files])
    np.save(cache.parent / "inputs.npy", inputs.numpy())
    levels = reachable_isa_levels()
    assert levels, "an x86-64 host has AVX2 at least"
    targets = {runtime: bundle for runtime in runtimes}
    if "openvino" in targets:  # the artifact built on this host, run at each capped level
        (targets["openvino"],) = cache.rglob("model.xml")
    jobs = [(runtime, level) for runtime in runtimes for level in levels]
    # Two at a time: each child runs one inference thread and spends most of its time
    # importing, so the pairs share this host's cores without slowing each other much.
    with ThreadPoolExecutor(max_workers=2) as pool:
        outputs = list(pool.map(lambda job: _logits_at_level(job, targets[job[0]], cache), jobs))
    figures = []
    for (runtime, level), out in zip(jobs, outputs, strict=True):
        int8 = np.load(out).argmax(1)
        agreement = float(np.mean(int8 == fp32))
        drop = float(np.mean(fp32 == truth) - np.mean(int8 == truth))
        print(f"{runtime} ISA {level}: agreement {agreement:.3f}, accuracy drop {drop:+.3f}")
        figures.append(IsaFigure(runtime, level, agreement, drop))
    return figures


def _logits_at_level(job: tuple[str, str], target: Path, cache: Path) -> Path:
    """A child process with oneDNN capped at ``level`` writes ``runtime``'s int8 logits of
    ``target`` (a built OpenVINO artifact, or a bundle torch builds under the cap) on the
    inputs saved next to the cache (``job``: the runtime and the level)."""
    runtime, level = job
    out = cache.parent / f"logits-{runtime}-{level}.npy"
    args = [runtime, str(target), str(cache / f"at-{level}"), str(cache.parent / "inputs.npy")]
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": level}
    subprocess.run([sys.executable, "-c", _LOGITS_AT_LEVEL, *args, str(out)], env=env, check=True)
    return out


# --- beyond Top-k: embeddings and class activation maps -------------------------------------
#: The issue's bars. Measured on the digits bundle's 120 validation images (64 px, so 2x2
#: maps), this Xeon: cosine median 0.997 and 5th percentile 0.996, map correlation median
#: 0.995-0.997 for torch, ONNX Runtime and OpenVINO int8 alike.
MIN_COSINE_MEDIAN: Final = 0.99
MIN_COSINE_P5: Final = 0.97
MIN_CAM_PEARSON_MEDIAN: Final = 0.95


def int8_embeddings_and_maps_agree(bundle: Path, cache: Path) -> None:
    """Every int8 runtime's embeddings and true-class maps against fp32's on the bundle's
    validation split (what quantization measured top-1 agreement on)."""
    _, holdout = bundle_splits(bundle)
    assert holdout is not None
    assert holdout.targets is not None
    for runtime in ("torch", "onnxruntime", "openvino"):
        agreement = int8_outputs_agree(
            bundle, cache, runtime, list(holdout.files), list(holdout.targets)
        )
        print(agreement)
        assert agreement.embedding_cosine_median >= MIN_COSINE_MEDIAN, agreement
        assert agreement.embedding_cosine_p5 >= MIN_COSINE_P5, agreement
        assert agreement.cam_pearson_median >= MIN_CAM_PEARSON_MEDIAN, agreement


# --- digits, end to end ---------------------------------------------------------------------
@pytest.mark.timeout(600)  # ~1 min alone; several times that on cores another job is using
def test_finetune_quantize_and_serve_digits(
    weights_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    digits = write_digits(tmp_path / "digits", seed=0, per_class_train=60, per_class_test=20)
    train_dir, test_dir = digits.train, digits.test
    bundle, cache = tmp_path / "bundle", tmp_path / "cache"
    summary = run_default_finetune(train_dir, bundle, tmp_path, weights_file, capsys)
    assert summary.val_accuracy >= FP32_MIN_ACCURACY
    test_files = sorted(test_dir.rglob("*.png"))
    probe, textbook = independent_probes(bundle, weights_file, test_files)
    assert summary.probe_val_accuracy == pytest.approx(probe.val_accuracy, abs=1.01 / 120)
    assert summary.textbook_probe_val_accuracy == pytest.approx(
        textbook.val_accuracy, abs=1.01 / 120
    )
    assert summary.val_accuracy >= max(probe.val_accuracy, textbook.val_accuracy)
    for name in (
        "bundle.json",
        "weights.pt",
        "labels.json",
        "report.json",
        "report.png",
        "splits.json",
    ):
        assert (bundle / name).is_file(), name
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["name"] == "bundle"  # named after --out, not after the data folder
    assert manifest["num_classes"] == 10
    assert manifest["preprocessing"]["crop_size"] == 64
    provenance = manifest["provenance"]
    assert provenance["class_counts"] == {str(d): 60 for d in range(10)}
    assert len(provenance["data_fingerprint"]) == 64
    assert len(provenance["confusion_matrix"]) == 10
    assert sum(map(sum, provenance["confusion_matrix"])) == provenance["val_images"] == 120
    assert provenance["trained"] in ("head", "layer4")
    report = json.loads((bundle / "report.json").read_text())
    assert report["val_accuracy"] == pytest.approx(summary.val_accuracy, abs=1e-4)
    assert report["probe_val_accuracy"] == pytest.approx(summary.probe_val_accuracy, abs=1e-4)
    refit = ["refit"] if report["trained"] == "head" else []
    decided = [d["what"] for d in report["decisions"]]
    assert decided == ["recalibrate_bn", "l2", "features", "train", *refit]
    assert report["head"]["val_accuracy"] <= report["val_accuracy"]
    if report["trained"] == "layer4":
        steps = [h["step"] for h in report["history"]]
        assert steps[0] == 0
        assert report["best_step"] in steps

    # Every int8 runtime, calibrated on the training split, against fp32 on validation: the
    # same bar for all (top-1 agreement, and accuracy within 1.5 points of fp32).
    for runtime in ("torch", "onnxruntime", "openvino"):
        fidelity = quantize_bundle(bundle, tmp_path, capsys, runtime)
        assert "(validation split" in fidelity["image_source"]  # type: ignore[operator]
        assert fidelity["fp32_accuracy"] >= FP32_MIN_ACCURACY, runtime
        assert fidelity["int8_accuracy"] >= INT8_MIN_ACCURACY, runtime
        assert fidelity["int8_accuracy"] >= fidelity["fp32_accuracy"] - MAX_INT8_ACCURACY_DROP, (
            runtime,
            fidelity,
        )
        assert fidelity["top1_agreement"] >= MIN_AGREEMENT, (runtime, fidelity)
        recorded = json.loads((bundle / "report.json").read_text())
        key = "int8" if runtime == "torch" else f"int8_{runtime}"
        assert recorded[key]["top1_agreement"] == fidelity["top1_agreement"]

    int8_agrees_at_every_isa_level(("openvino", "torch"), bundle, cache, test_files)
    int8_embeddings_and_maps_agree(bundle, cache)

    with serve(tmp_path, "--bundle", str(bundle), "--cache-dir", str(cache), "--offline") as server:
        model = httpx.get(f"{server.url}/model", params={"labels": "true"}).json()
        assert model["labels"] == [str(d) for d in range(10)]
        assert model["precision"] == "int8"
        assert model["provenance"]["val_accuracy"] >= FP32_MIN_ACCURACY
        assert model["runtime"] == "openvino"
        assert model["settings"]["max_top_k"] == 10
        assert "train_dir" not in model["provenance"]
        assert str(tmp_path) not in json.dumps(model)  # no server paths on an open route
        capped = httpx.post(  # above the class count: capped, as a generic client needs
            f"{server.url}/classify?top_k=11",
            files={"image": ("a.png", test_files[0].read_bytes())},
        ).json()
        assert (capped["top_k"], len(capped["predictions"])) == (10, 10)
        default = httpx.post(
            f"{server.url}/classify", files={"image": ("a.png", test_files[0].read_bytes())}
        )
        assert len(default.json()["predictions"]) == 5
        results = classify_over_http(server.url, test_files)
    assert len(results) == 200
    int8_http = http_accuracy(results, test_files)
    assert int8_http >= HTTP_MIN_ACCURACY
    fp32_test = fp32_folder_accuracy(bundle, test_files)
    assert abs(int8_http - fp32_test) <= MAX_INT8_DROP
    served = http_right(results, test_files)
    figures = task_figures(
        "digits", summary, (probe, textbook), fidelity, served, test_files, bundle
    )
    show(figures, capsys)


# --- bad data ------------------------------------------------------------------------------
SPEC = spec_for(64)


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (10, 200, 30)).save(path)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "nope", SPEC)


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_image_folder(tmp_path, SPEC)


def test_one_class_is_not_enough(tmp_path: Path) -> None:
    _png(tmp_path / "cat" / "1.png")
    with pytest.raises(DatasetError, match="at least two"):
        load_image_folder(tmp_path, SPEC)


def test_class_without_images(tmp_path: Path) -> None:
    _png(tmp_path / "cat" / "1.png")
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "notes.txt").write_text("no images")
    with pytest.raises(DatasetError, match="dog"):
        load_image_folder(tmp_path, SPEC)


def test_unreadable_files_are_skipped_and_listed(tmp_path: Path) -> None:
    for name in ("cat", "dog"):
        _png(tmp_path / name / "1.png")
        _png(tmp_path / name / "2.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    data = load_image_folder(tmp_path, SPEC)
    assert data.counts() == {"cat": 2, "dog": 2}
    assert len(data.skipped) == 1
    assert "broken.jpg" in data.skipped[0]
    train, val = stratified_split(data, 0.5, seed=0)
    assert sorted(val.targets()) == [0, 1]
    assert sorted(train.targets()) == [0, 1]


def test_nothing_readable_is_fatal(tmp_path: Path) -> None:
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="no readable images"):
        load_image_folder(tmp_path, SPEC)


def test_finetune_cli_reports_bad_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _png(tmp_path / "only" / "1.png")
    settings_args = ["--offline", "--cache-dir", str(tmp_path / "c")]
    assert main(["finetune", str(tmp_path), "--out", str(tmp_path / "b"), *settings_args]) == 1
    assert "at least two" in capsys.readouterr().err
