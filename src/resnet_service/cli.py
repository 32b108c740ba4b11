"""``resnet-service``: serve, predict, tag, quantize, finetune, publish, info, bench, samples,
openapi.

Flags map onto the one ``Settings`` class (flags win over ``RESNET_SERVICE_*`` variables).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resnet_service import __version__, logs
from resnet_service.config import RUNTIMES, Settings, SettingsError, load_settings
from resnet_service.core.errors import ServiceError

if TYPE_CHECKING:  # the serving core is imported by the commands that need it
    from resnet_service.core.classifier import Classifier
    from resnet_service.core.feature_outputs import CropBox
    from resnet_service.core.results import Classification

log = logging.getLogger("resnet_service")

Handler = Callable[[argparse.Namespace, Settings], int]


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--weights", dest="weights_path", type=Path, help="fp32 ResNet18 state_dict")
    group.add_argument("--bundle", dest="bundle_path", type=Path, help="model bundle directory")
    group.add_argument(
        "--artifact",
        dest="artifact_path",
        type=Path,
        help="a built OpenVINO/ONNX model folder (quantize --runtime R --out DIR) to serve as is",
    )
    group.add_argument("--precision", choices=["int8", "fp32"])
    group.add_argument(
        "--tag-rules",
        dest="tag_rules",
        type=Path,
        help="tag rules file (default: tags.yml beside the model; ImageNet: the package's)",
    )
    group.add_argument("--cache-dir", dest="model_cache_dir", type=Path)
    group.add_argument("--calibration-dir", dest="calibration_dir", type=Path)
    group.add_argument(
        "--offline",
        dest="allow_downloads",
        action="store_const",
        const=False,
        help="never download weights",
    )
    group.add_argument(
        "--allow-random-weights",
        action="store_const",
        const=True,
        help="DEVELOPMENT ONLY: seeded random weights when none are found",
    )
    group.add_argument("--runtime", choices=list(RUNTIMES), help="inference runtime")
    group.add_argument(
        "--threads", dest="inference_threads", type=int, help="inference threads (0=auto)"
    )
    group.add_argument("--max-batch-size", type=int)
    group.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def _settings_from(args: argparse.Namespace) -> Settings:
    names = set(Settings.model_fields)
    return load_settings(**{k: v for k, v in vars(args).items() if k in names})


def _emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


# --- commands -----------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace, settings: Settings) -> int:
    from resnet_service.model.served import open_served_model

    model = open_served_model(settings)
    info = model.info.model_dump(mode="json")
    info["inference_threads"] = model.runtime.threads
    info["decode_threads"] = settings.decode_threads or model.runtime.threads
    info["max_batch_size"] = settings.max_batch_size
    print(json.dumps(info, indent=2, ensure_ascii=False))
    return 0


def cmd_preflight(args: argparse.Namespace, settings: Settings) -> int:
    """Build (or verify) what serving workers will load; used by ``serve`` before its workers."""
    from resnet_service.model.served import prepare

    try:
        prepared = prepare(settings)
    except ServiceError as exc:
        _emit({"error": exc.detail})  # the last line: the parent's reason (a repository index)
        raise
    _emit(prepared.model_dump(mode="json"))
    return 0


def cmd_quantize(args: argparse.Namespace, settings: Settings) -> int:
    """Build the int8 model for the chosen runtime ahead of serving (cached; --out copies it)."""
    from resnet_service.model.bundle import copy_bundle
    from resnet_service.model.int8_build import build_int8

    built = build_int8(settings)
    if args.out is not None:
        copy_bundle(built.int8_cache, args.out)
        log.info("%s int8 model written to %s", built.runtime, args.out)
    if settings.bundle_path is not None and built.fidelity is not None:
        _record_int8_evaluation(
            settings.bundle_path, built.runtime, built.fidelity.model_dump(mode="json")
        )
    _emit({**built.model_dump(mode="json"), "out": str(args.out) if args.out else None})
    return 0


def _record_int8_evaluation(bundle: Path, runtime: str, fidelity: dict[str, Any]) -> None:
    """Keep the int8 figures next to the fp32 ones in the fine-tuned bundle's report (torch's
    under "int8", other runtimes' under "int8_<runtime>")."""
    from resnet_service.training.report_figures import REPORT_JSON

    path = bundle / REPORT_JSON
    report = json.loads(path.read_text()) if path.is_file() else {}
    report["int8" if runtime == "torch" else f"int8_{runtime}"] = fidelity
    path.write_text(json.dumps(report, indent=2))


def cmd_finetune(args: argparse.Namespace, settings: Settings) -> int:
    from resnet_service.training.finetune import finetune
    from resnet_service.training.options import FinetuneConfig

    # Every option that has a flag of the same name; the two that are spelled otherwise.
    names = (f.name for f in dataclasses.fields(FinetuneConfig))
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    config = FinetuneConfig(**given, out_dir=args.out, progress=not args.no_progress)
    result = finetune(config, settings)
    report = result.report
    published = None
    if args.repository is not None:
        from resnet_service.model.repository_layout import publish_version

        published = publish_version(args.out, args.repository, args.name or args.out.name)
    _emit(
        {
            "bundle": str(args.out),
            "published": str(published) if published else None,
            "classes": result.manifest.num_classes,
            "val_accuracy": round(report.val_accuracy, 4),
            **{
                name: None if value is None else round(value, 4)
                for name, value in report.probe_accuracies().items()
            },
            "features": "standardised" if report.head.standardised else "raw",
            "trained": report.trained,  # what is served: the head alone, or a block with it
            "recalibrated_bn": report.recalibrated_bn,
            # Block training, when it ran: its steps whether or not the block was kept.
            "block_steps_run": report.steps_run,
            "block_best_step": report.best_step,
            "block_kept": report.trained != "head",
            "seconds": round(report.timings.total, 1),
            "weights_sha256": result.manifest.weights_sha256,
        }
    )
    return 0


def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    """Publish a version atomically (a temporary name, then a rename: ready for ``poll``)."""
    from resnet_service.model.repository_layout import publish_version

    final = publish_version(args.source, args.repository, args.name, args.version)
    _emit({"model": args.name, "version": int(final.name), "path": str(final)})
    return 0


def _predict_inputs(files: list[Path]) -> Iterator[Path]:
    """The files named, folders walked (recursively, in name order) as the tag job lists them."""
    from resnet_service.faces.tag.sources import walk

    for path in files:
        if path.is_dir():
            yield from (Path(item.location) for item in walk(str(path)))
        else:
            yield path


def cmd_predict(args: argparse.Namespace, settings: Settings) -> int:
    """One JSON line per file, in the order given, each written as soon as it and those before
    it are done; at most a window of files is in memory (half the engine's queue)."""
    from resnet_service.core.classifier import EMBEDDING, FEATURE_MAP, Classifier
    from resnet_service.core.errors import UnreadableFile
    from resnet_service.core.runtime import LOGITS_ONLY
    from resnet_service.model.served import open_served_model
    from resnet_service.model.tag_rules_file import tag_rules_for
    from resnet_service.service.loading import classifier_options

    model = open_served_model(settings)
    rules = tag_rules_for(settings, model.labels)
    classifier = Classifier(model, classifier_options(settings), tag_rules=rules)
    wants = LOGITS_ONLY.union(
        *([EMBEDDING] if args.embed else []), *([FEATURE_MAP] if args.explain else [])
    )
    classifier.check_outputs(wants)
    classifier.check_target(args.target)
    classifier.check_top_k(args.top_k)
    classifier.start()
    window = max(1, settings.queue_capacity // 2)

    async def one(path: Path) -> dict[str, Any]:
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            unreadable = UnreadableFile(f"cannot read {path}: {exc.strerror}")
            return {"file": str(path), "error": _error(unreadable)}
        try:
            result = await classifier.classify(data, args.top_k, wants=wants)
        except ServiceError as exc:
            return {"file": str(path), "error": _error(exc)}
        return await _predict_line(classifier, path, result, args)

    async def emit(task: asyncio.Task[dict[str, Any]]) -> bool:
        """Write one line once it is done; True when it is an error."""
        line = await task
        _emit(line)
        return "error" in line

    async def run() -> bool:
        pending: collections.deque[asyncio.Task[dict[str, Any]]] = collections.deque()
        failed = False
        for path in _predict_inputs(args.files):
            pending.append(asyncio.create_task(one(path)))
            if len(pending) >= window:
                failed |= await emit(pending.popleft())
        while pending:
            failed |= await emit(pending.popleft())
        return failed

    try:
        failed = asyncio.run(run())
    finally:
        classifier.stop()
    return 1 if failed else 0


def _error(error: ServiceError | BaseException) -> dict[str, str]:
    if isinstance(error, ServiceError):
        return {"code": error.code, "detail": error.detail}
    return {"code": "internal", "detail": f"{type(error).__name__}: {error}"}


async def _predict_line(
    classifier: Classifier, path: Path, result: Classification, args: argparse.Namespace
) -> dict[str, Any]:
    """One JSON line: the Top-k, and the embedding and the map when asked."""
    from resnet_service.core.feature_outputs import l2_normalised

    info, pred = classifier.model.info, result.prediction
    line: dict[str, Any] = {
        "file": str(path),
        "predictions": [
            {"label": label, "index": index, "score": round(score, 6)}
            for label, index, score in zip(pred.labels, pred.indices, pred.scores, strict=True)
        ],
        "tags": [{**dataclasses.asdict(tag), "score": round(tag.score, 6)} for tag in result.tags],
        "model": info.name,
        "precision": info.precision,
        "runtime": info.runtime,
        "random_weights": info.random_weights,
    }
    if result.embedding is not None:
        line["embedding"] = l2_normalised(result.embedding).astype(float).round(6).tolist()
    if args.explain:
        explained = await classifier.explanation(result, args.target)
        line["cam"] = {
            "target": explained.target,
            "label": classifier.model.labels[explained.target],
            "grid": explained.grid.astype(float).round(6).tolist(),
            "crop_box": dataclasses.asdict(explained.crop_box) if explained.crop_box else None,
        }
        if args.heatmaps is not None:
            out = heatmap_path(args.heatmaps, path)
            out.parent.mkdir(parents=True, exist_ok=True)
            png = explained.heatmap_png
            if args.overlay and explained.crop_box is not None:
                png = await asyncio.to_thread(_overlaid, path, png, explained.crop_box)
            out.write_bytes(png)
            line["cam"]["heatmap"] = str(out)
    return line


def heatmap_path(folder: Path, image: Path) -> Path:
    """Where ``predict --heatmaps`` writes an image's map: its path as given, under ``folder``
    (``a/x.jpg`` -> ``folder/a/x.jpg.cam.png``), so that same-named images in different
    folders keep a map each; ``..`` and the root cannot lead out of ``folder``."""
    parts = [p if p != ".." else "__" for p in image.parts if p not in (image.anchor, ".")]
    return folder.joinpath(*parts[:-1], f"{parts[-1]}.cam.png")


def _overlaid(path: Path, heatmap: bytes, box: CropBox) -> bytes:
    """The map over the photo (read again: ``predict`` keeps no decoded image)."""
    from PIL import Image, ImageOps

    from resnet_service.core.feature_outputs import overlay_png

    with Image.open(path) as photo:  # the same bomb guard as the service's decoder
        return overlay_png(ImageOps.exif_transpose(photo), heatmap, box)


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    try:  # a separate distribution (bench/), not in the serving image
        from resnet_bench.runner import BenchOptions, run_benchmark, speed_settings
    except ImportError:
        print(
            "resnet-service bench: the benchmark harness is not installed; from a checkout: "
            "pip install -e ./bench (make install does).",
            file=sys.stderr,
        )
        return 2

    opts = BenchOptions(
        out_dir=args.out,
        quick=args.quick,
        skip_naive=args.skip_naive,
        # Quick mode (the harness's own test) compares the default runtime with torch only.
        runtimes=tuple(args.runtimes or (("torch", "openvino") if args.quick else RUNTIMES)),
    )
    result = run_benchmark(speed_settings(settings), opts)
    log.info("wrote %s (%.0fs)", args.out / "bench.json", result.seconds)
    return 0


def cmd_tag(args: argparse.Namespace, settings: Settings) -> int:
    from resnet_service.faces.tag.command import cmd_tag as run_tag

    return run_tag(args, settings)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from resnet_service.server.launch import run_server

    return run_server(settings)


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    """The model and its tags against labelled images: the report in --out, its summary on
    stdout."""
    from resnet_service.training.evaluate import evaluate, write_report

    if not 0 < args.target_precision <= 1:
        print(
            "resnet-service: --target-precision is a share, above 0 and at most 1", file=sys.stderr
        )
        return 2
    evaluation = evaluate(settings, args.labelled_dir, args.rules, args.target_precision)
    write_report(evaluation, args.out)
    _emit({**evaluation.summary(), "report": str(args.out)})
    return 0


def cmd_samples(args: argparse.Namespace, settings: Settings) -> int:
    """Copy the package's own photos (public domain / CC0) to try the service with."""
    import shutil

    from resnet_service.model.datasets import builtin_photos

    args.dir.mkdir(parents=True, exist_ok=True)
    photos = builtin_photos()
    for photo in photos:
        # calib_chelsea_0.jpg -> chelsea_0.jpg: which set a photo serves is not the user's concern
        shutil.copyfile(photo, args.dir / photo.name.split("_", 1)[1])
    print(f"{len(photos)} photos in {args.dir} (scikit-image's samples: public domain or CC0)")
    return 0


def cmd_openapi(args: argparse.Namespace, settings: Settings) -> int:
    from resnet_service.server.app import openapi_document

    print(json.dumps(openapi_document(), indent=2, sort_keys=False, ensure_ascii=False))
    return 0


# --- parser -------------------------------------------------------------------------------
def _add_finetune(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``finetune DATA_DIR``: the recipe's options, their defaults and choices from
    ``training.options`` (written once)."""
    from resnet_service.training.options import AUGMENTS, BN_CHOICES, TRAIN_PARTS, defaults

    default = defaults()
    ft = sub.add_parser(
        "finetune",
        help="train a classifier for your own classes (an ImageFolder) into a bundle",
        description="DATA_DIR holds one sub-folder per class. Starts from the ImageNet weights "
        "(same resolution order as serving), writes a bundle that `serve --bundle` serves.",
    )
    ft.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    ft.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    ft.add_argument("--val-dir", type=Path, help="validation ImageFolder (else a stratified split)")
    ft.add_argument("--val-fraction", type=float, default=default["val_fraction"])
    ft.add_argument(
        "--train",
        choices=TRAIN_PARTS,
        default=default["train"],
        help="what to train. auto (default): fit the head, then train the last block too "
        "when validation accuracy says it helps, within --time-budget; or force one",
    )
    ft.add_argument(
        "--recalibrate-bn",
        choices=BN_CHOICES,
        nargs="?",
        const="yes",
        default=default["recalibrate_bn"],
        help="re-estimate BatchNorm statistics on your images (helps far-off domains). "
        "auto (default): keep whichever validates better; the bare flag means yes",
    )
    ft.add_argument(
        "--augment",
        choices=AUGMENTS,
        default=default["augment"],
        help="extra random training views (crop: 50-100%% of the area; crop-flip: also "
        "mirrored); only if a crop or mirror of an image is still the same class",
    )
    ft.add_argument(
        "--augmented-views",
        type=int,
        default=default["augmented_views"],
        help="random views per image with --augment, drawn once and cached",
    )
    ft.add_argument(
        "--image-size", type=int, default=default["image_size"], help="model input side (crop)"
    )
    ft.add_argument(
        "--time-budget",
        type=float,
        default=default["time_budget"],
        help="seconds for the whole run; block training stops (best checkpoint kept) when "
        "they are spent",
    )
    ft.add_argument(
        "--epochs",
        type=int,
        default=default["epochs"],
        help="at most this many epochs of block training",
    )
    ft.add_argument("--batch-size", type=int, default=default["batch_size"])
    ft.add_argument(
        "--lr", type=float, default=default["lr"], help="AdamW learning rate (block training)"
    )
    ft.add_argument("--weight-decay", type=float, default=default["weight_decay"])
    ft.add_argument(
        "--min-steps",
        type=int,
        default=default["min_steps"],
        help="block training never stops before this",
    )
    ft.add_argument(
        "--patience",
        type=int,
        default=default["patience"],
        help="early stopping: optimiser steps without a better validation score",
    )
    ft.add_argument("--seed", type=int, default=default["seed"])
    ft.add_argument(
        "--name",
        help="model name in the bundle (and in --repository); default: the --out folder's name",
    )
    ft.add_argument(
        "--repository",
        type=Path,
        help="also publish the bundle as the next version of --name in this model repository",
    )
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_flags(ft)
    ft.set_defaults(handler=cmd_finetune)


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser(
        "bench", help="measure ceiling, service and naive baseline; write JSON, table, chart"
    )
    bench.add_argument("--out", type=Path, default=Path("bench"))
    bench.add_argument("--quick", action="store_true", help="seconds, not minutes (CI)")
    bench.add_argument("--skip-naive", action="store_true", help="no Flask baseline")
    bench.add_argument(
        "--runtimes", nargs="+", choices=list(RUNTIMES), help="runtimes to compare (default: all)"
    )
    _add_model_flags(bench)
    bench.set_defaults(handler=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet-service",
        description="Fast CPU image classification with an int8 ResNet18.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    predict = sub.add_parser(
        "predict", help="classify image files and folders; one JSON line per file, as it is done"
    )
    predict.add_argument(
        "files", nargs="+", type=Path, metavar="FILE", help="image files or folders (recursive)"
    )
    predict.add_argument("-k", "--top-k", type=int, default=None)
    predict.add_argument(
        "--embed", action="store_true", help="add each image's L2-normalised embedding"
    )
    predict.add_argument(
        "--explain", action="store_true", help="add the class activation map of --target"
    )
    predict.add_argument(
        "--target", type=int, default=None, help="class index to explain (default: the top one)"
    )
    predict.add_argument(
        "--heatmaps",
        type=Path,
        default=None,
        metavar="DIR",
        help="write --explain's maps here as PNGs, at each image's path under DIR "
        "(a/x.jpg -> DIR/a/x.jpg.cam.png)",
    )
    predict.add_argument(
        "--overlay",
        action="store_true",
        help="with --heatmaps: the map laid over the photo (else the bare map of the crop)",
    )
    _add_model_flags(predict)
    predict.set_defaults(handler=cmd_predict)

    tag = sub.add_parser(
        "tag",
        help="tag a whole library (folders, manifests, s3://...) into Parquet; resumable",
        description="Every image of the sources through the model into a folder of Parquet "
        "(or JSON-lines) parts, one row per input. Resumable: rerun the same command after a "
        "crash, or nightly, and only what is new or changed is tagged. Exit status: 0 all "
        "tagged, 3 completed with error rows, 1 the job failed, 128+N stopped by signal N.",
    )
    from resnet_service.faces.tag.arguments import add_arguments as add_tag_arguments

    add_tag_arguments(tag)
    _add_model_flags(tag)
    tag.set_defaults(handler=cmd_tag)

    quantize = sub.add_parser(
        "quantize",
        help="build and cache the int8 model for --runtime (ahead of serving); print fidelity",
    )
    quantize.add_argument(
        "--out",
        type=Path,
        help="also copy the int8 model here (torch: a bundle; openvino/onnxruntime: a folder "
        "to serve with --artifact)",
    )
    _add_model_flags(quantize)
    quantize.set_defaults(handler=cmd_quantize)

    evaluate = sub.add_parser(
        "evaluate",
        help="the model and its tags on labelled images; thresholds for a target precision",
        description="Classify LABELLED_DIR/<label>/* and report the model's accuracy (with its "
        "95%% interval; for a fine-tuned bundle, its report's figures beside both linear probes) "
        "and per tag its precision, recall and the share of images tagged at the thresholds in "
        "force, the lowest threshold that reaches --target-precision (with its 95%% interval), "
        "a Markdown report and the precision-recall curves (PNG) in --out. Prints the summary "
        "as one JSON line.",
    )
    evaluate.add_argument("labelled_dir", type=Path, help="one sub-folder per class label")
    evaluate.add_argument("--rules", type=Path, help="tag rules to judge (default: the model's)")
    evaluate.add_argument(
        "--target-precision",
        type=float,
        default=0.9,
        help="the precision each tag's suggested threshold reaches (default 0.9; --precision "
        "is the model's, int8 or fp32)",
    )
    evaluate.add_argument(
        "--out", type=Path, default=Path("evaluation"), help="report folder (default evaluation/)"
    )
    _add_model_flags(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate)

    info = sub.add_parser("info", help="show the model that would be served")
    _add_model_flags(info)
    info.set_defaults(handler=cmd_info)

    _add_finetune(sub)
    _add_bench(sub)

    serve = sub.add_parser("serve", help="run the HTTP service")
    from resnet_service.server.launch import add_arguments

    add_arguments(serve)
    _add_model_flags(serve)
    serve.set_defaults(handler=cmd_serve)

    pre = sub.add_parser(
        "preflight", help="build or verify the serving artifact (run by serve before workers)"
    )
    _add_model_flags(pre)
    pre.set_defaults(handler=cmd_preflight)

    publish = sub.add_parser(
        "publish",
        help="copy a bundle or built model into a model repository as its next version",
    )
    publish.add_argument("source", type=Path, help="a bundle (finetune) or quantize --out folder")
    publish.add_argument("--repository", type=Path, required=True)
    publish.add_argument("--name", required=True, help="the model's name in the repository")
    publish.add_argument("--version", type=int, help="default: the highest there + 1")
    publish.set_defaults(handler=cmd_publish)

    samples = sub.add_parser(
        "samples", help="copy the package's own photos (public domain) to a folder, to try things"
    )
    samples.add_argument("dir", type=Path, help="the folder to write them to")
    samples.set_defaults(handler=cmd_samples)

    openapi = sub.add_parser("openapi", help="print the OpenAPI spec (JSON)")
    openapi.set_defaults(handler=cmd_openapi)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``resnet-service`` command."""
    args = build_parser().parse_args(argv)
    try:
        settings = _settings_from(args)
    except SettingsError as exc:
        print(f"resnet-service: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format, embedded_ok=True)
    handler: Handler = args.handler
    try:
        return handler(args, settings)
    except ServiceError as exc:
        print(f"resnet-service: error [{exc.code}]: {exc.detail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
