"""Build OpenVINO and ONNX Runtime models from fp32 torch weights (a cache miss: needs torch).

- OpenVINO: ``ov.convert_model`` traces the torch network into an IR; int8 is NNCF
  post-training quantization (its performance preset: symmetric activations, per-channel
  weights, full bias correction; the first convolution kept fp32, see ``_export_openvino``)
  calibrated on the same images as the torch int8 path.
- ONNX Runtime: ``torch.onnx.export``; int8 is ONNX Runtime's static quantization in QDQ form,
  per-channel int8 weights and uint8 activations (U8S8, the fast pair on x86), activation
  ranges from the 99.999th percentile of the same images, the classifier (the last Gemm) kept
  in fp32. On the bench's digits model min-max with an int8 classifier agreed with fp32 on
  95.0% of validation images, percentile ranges alone 96.7%, fp32 classifier alone 96.7%,
  both 99.2%: one outlier activation stretches a min-max range, and the classifier's rounding
  lands on the logits directly, at a negligible cost to keep it fp32 (512 x classes).
Both export three outputs from one forward (``GraphOutputs``): the logits, the pooled
features (``embedding``) and the last stage's map (``feature_map``), and keep the classifier's
fp32 weights beside the model (``head.npz``) for class activation maps.
Both measure fidelity against the torch fp32 model on held-out images (a fine-tuned bundle's
validation split, with accuracy) and are written atomically into the cache (``artifacts.py``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from resnet_service import logs
from resnet_service.config import RuntimeName, Settings
from resnet_service.core.errors import (
    ArtifactBuildFailed,
    BundleInvalid,
    CacheUnwritable,
    WeightsUnavailable,
)
from resnet_service.core.runtime import FloatBatch, Output, Runtime
from resnet_service.cpus import has_vnni, threads_per_worker
from resnet_service.model.architecture import build_fp32
from resnet_service.model.artifacts import (
    MODEL_FILES,
    ArtifactManifest,
    seal,
    staged,
    write_head,
)
from resnet_service.model.bundle import read_weights
from resnet_service.model.datasets import ImageArrays, ImageFiles
from resnet_service.model.fidelity import compare
from resnet_service.model.hub import FP32_URL, how_to_provide_weights
from resnet_service.model.manifest import (
    QuantizationInfo,
    ensure_writable,
    read_labels,
    read_manifest,
)
from resnet_service.model.source import ModelSource, resolve_source
from resnet_service.model.weights import (
    WeightsSource,
    load_state_dict_file,
    look_up,
    random_weights,
    resolve_fp32_weights,
    serving_random,
)
from resnet_service.runtimes.torch_runtime import head_of, resnet_outputs

log = logging.getLogger(__name__)
CALIBRATION_BATCH = 16
#: ONNX Runtime int8: activation ranges from this percentile of the calibration activations.
ORT_CALIBRATION_PERCENTILE = 99.999


def fp32_module(source: ModelSource, settings: Settings) -> nn.Module:
    """The fp32 torch network of ``source`` (eval mode)."""
    if source.precision != "fp32":
        raise ArtifactBuildFailed(
            f"{source.bundle} holds an int8 torch model; OpenVINO and ONNX Runtime models are "
            "built from fp32 weights: give its fp32 source bundle (the one `finetune` wrote)"
        )
    if source.bundle is not None:
        state = read_weights(source.bundle, read_manifest(source.bundle))
    elif source.weights_source is WeightsSource.RANDOM:
        state = random_weights(source.num_classes).state_dict
    elif source.weights_path is not None:
        state = load_state_dict_file(source.weights_path)
    else:
        state = resolve_fp32_weights(
            None, allow_downloads=settings.allow_downloads, allow_random=False
        ).state_dict
    module = build_fp32(source.architecture, source.num_classes)
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError) as exc:
        raise BundleInvalid(f"weights do not fit {source.architecture}: {exc}") from None
    return module.eval()


def labels_of(source: ModelSource) -> list[str]:
    """Class names: a bundle's own, or the 1000 ImageNet categories torchvision ships."""
    if source.bundle is not None:
        return read_labels(source.bundle, source.num_classes)
    from resnet_service.model.torch_network import imagenet_labels

    return imagenet_labels()


def downloaded_source(settings: Settings) -> ModelSource:
    """No weights on disk: download them (hash-checked) into the hub cache, else fall back to
    random weights where the development flag allows, else say how to provide them."""
    lookup = look_up(FP32_URL, settings.allow_downloads)
    if lookup.found is not None and lookup.found.path is not None:
        return resolve_source(settings)  # now in the hub cache
    if settings.allow_random_weights:
        serving_random(lookup.download_error)
        return resolve_source(settings.model_copy(update={"allow_downloads": False}))
    raise WeightsUnavailable(
        how_to_provide_weights(settings.allow_downloads, lookup.download_error)
    )


#: The served graph's outputs, in order (the runtimes find them by these names).
OUTPUT_NAMES: tuple[str, ...] = tuple(
    o.value for o in (Output.LOGITS, Output.EMBEDDING, Output.FEATURE_MAP)
)


class GraphOutputs(nn.Module):
    """A ResNet whose forward returns (logits, embedding, feature map): what is exported.
    Exported in eval mode (``.eval()``): a new module starts in training mode, and the ONNX
    exporter keeps the top module's mode, which would export BatchNorm with batch statistics
    (found by the fidelity test: 37.5% agreement)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return resnet_outputs(self.net, x)


def _batches(images: ImageArrays) -> Iterator[FloatBatch]:
    for start in range(0, len(images), CALIBRATION_BATCH):
        yield images.array[start : start + CALIBRATION_BATCH]


def _export_openvino(
    module: nn.Module, folder: Path, spec_side: int, calibration: ImageArrays | None
) -> None:
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    logs.adopt("nncf")  # NNCF installs its own stderr handler on import

    example = torch.zeros(1, 3, spec_side, spec_side)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing chatter from torch and openvino
        model = ov.convert_model(GraphOutputs(module).eval(), example_input=example)
    for port, name in zip(model.outputs, OUTPUT_NAMES, strict=True):
        port.get_tensor().set_names({name})
    model.reshape({0: ov.PartialShape([-1, 3, spec_side, spec_side])})
    if calibration is not None:
        batches = list(_batches(calibration))
        model = nncf.quantize(
            model,
            nncf.Dataset(batches),
            preset=nncf.QuantizationPreset.PERFORMANCE,
            subset_size=len(batches),  # NNCF counts dataset items: batches here
            # Full bias correction: on the fine-tuned digits model, int8 accuracy 96.7% instead
            # of 95.8% (fp32 97.5%) at the same inference speed, for a longer build. The
            # MIXED preset (asymmetric activations) was as accurate but 8-50% slower to run.
            fast_bias_correction=False,
            # The first convolution stays fp32: int8 there saturates AVX2's u8 x s8 pair sums
            # unless NNCF's overflow fix makes its weights 7-bit, which costs accuracy on every
            # ISA; fp32 there costs ~30% more forward time.
            ignored_scope=nncf.IgnoredScope(names=[first_convolution(model)]),
            # NNCF's fix would then land on the first *quantized* convolutions, whose 7-bit
            # weights cost agreement on every ISA; past the first convolution nothing
            # saturates at AVX2, so it is off (measured: README, Runtimes).
            advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.DISABLE),
        )
    ov.save_model(model, str(folder / MODEL_FILES["openvino"]), compress_to_fp16=False)


def first_convolution(model: Any) -> str:
    """The friendly name of an OpenVINO model's first convolution (in topological order)."""
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Convolution":
            return str(op.get_friendly_name())
    raise ArtifactBuildFailed("the network has no convolution to keep in fp32")


def _export_onnx(
    module: nn.Module, folder: Path, spec_side: int, calibration: ImageArrays | None
) -> None:
    target = folder / MODEL_FILES["onnxruntime"]
    fp32_path = folder / "fp32.onnx.tmp" if calibration is not None else target
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export's, which cannot
        # trace torchvision's ResNet with a dynamic batch here; this one can.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            GraphOutputs(module).eval(),
            (torch.zeros(1, 3, spec_side, spec_side),),
            str(fp32_path),
            input_names=["input"],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={"input": {0: "batch"}} | {n: {0: "batch"} for n in OUTPUT_NAMES},
            opset_version=17,
            dynamo=False,
        )
    if calibration is None:
        return
    _quantize_onnx(fp32_path, target, calibration)
    for leftover in folder.glob("*.tmp"):
        leftover.unlink()


def _quantize_onnx(fp32_path: Path, target: Path, calibration: ImageArrays) -> None:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches = iter(_batches(calibration))

        def get_next(self) -> dict[str, FloatBatch] | None:
            batch = next(self._batches, None)
            return None if batch is None else {"input": batch}

    prepared = fp32_path.with_name("prepared.onnx.tmp")
    quant_pre_process(str(fp32_path), str(prepared))
    nodes = onnx.load(str(prepared)).graph.node
    classifier = [n.name for n in nodes if n.op_type == "Gemm"]
    vnni = has_vnni()
    if not vnni:  # the first convolution sees raw pixels: its range saturates int16 sums
        classifier += [next(n.name for n in nodes if n.op_type == "Conv")]
    quantize_static(
        str(prepared),
        str(target),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.Percentile,
        extra_options={"CalibPercentile": ORT_CALIBRATION_PERCENTILE},
        nodes_to_exclude=classifier,
        # Without VNNI, ONNX Runtime's u8 x s8 kernels sum pairs in saturating int16: 7-bit
        # weights keep them exact (its documentation's advice for such hosts).
        reduce_range=not vnni,
    )


def quantization_info(
    runtime: RuntimeName, calibration: ImageArrays, fingerprint: str
) -> QuantizationInfo:
    if runtime == "openvino":
        info = QuantizationInfo(
            method="nncf_ptq",
            engine="openvino",
            qconfig=(
                "nncf performance preset, per-channel, bias correction, "
                "fp32 first convolution, no overflow fix"
            ),
        )
    else:
        info = QuantizationInfo(
            method="ort_static_qdq",
            engine="onnxruntime",
            qconfig=f"QDQ U8S8 per-channel, percentile {ORT_CALIBRATION_PERCENTILE}, fp32 "
            "classifier"
            + ("" if has_vnni() else ", 7-bit weights, fp32 first convolution (no VNNI)"),
        )
    return info.model_copy(
        update={
            "calibration_source": calibration.source,
            "calibration_images": len(calibration),
            "calibration_fingerprint": fingerprint,
        }
    )


def _logits(runtime: Runtime, images: ImageArrays) -> FloatBatch:
    runtime.bind_thread()
    return np.concatenate([runtime.infer(batch) for batch in _batches(images)])


def build_artifact(
    settings: Settings,
    source: ModelSource,
    labels: list[str],
    folder: Path,
    key: str,
    calibration: tuple[ImageFiles, str] | None,
    holdout: ImageFiles,
) -> ArtifactManifest:
    """Export (and quantize), measure fidelity, write the artifact atomically into ``folder``."""
    logs.adopt("torch")  # torch installed its own stderr handler on import
    from resnet_service.runtimes.registry import open_runtime, runtime_version

    runtime, precision = settings.runtime, settings.precision
    ensure_writable(folder.parent, f"{runtime} {precision} model")
    started = time.perf_counter()
    module = fp32_module(source, settings)
    spec = source.spec
    calibration_set = calibration[0].load_arrays(spec) if calibration else None
    export = _export_openvino if runtime == "openvino" else _export_onnx
    log.info("building the %s %s model (%s)", runtime, precision, source.name)
    try:
        # NNCF and ONNX Runtime print progress to stdout, which the CLI keeps for its JSON; their
        # bars and notes are for debugging, not for the user's terminal.
        with contextlib.redirect_stdout(logs.DebugLines(log)), staged(folder) as tmp:
            export(module, tmp, spec.crop_size, calibration_set)
            write_head(tmp, head_of(module))
            held_out = holdout.load_arrays(spec)
            with torch.inference_mode():
                reference = np.concatenate(
                    [module(torch.from_numpy(b)).numpy() for b in _batches(held_out)]
                )
            threads = threads_per_worker(settings.inference_threads, settings.workers or 1)
            built = open_runtime(runtime, precision, tmp / MODEL_FILES[runtime], threads)
            fidelity = compare(
                reference, _logits(built, held_out), held_out.source, held_out.targets
            )
            built.close()
            manifest = ArtifactManifest(
                key=key,
                runtime=runtime,
                runtime_version=runtime_version(runtime),
                precision=precision,
                name=f"{source.name}-{precision}" if precision == "int8" else source.name,
                architecture=source.architecture,
                num_classes=source.num_classes,
                preprocessing=spec,
                random_weights=source.random_weights,
                weights_source=source.weights_source,
                weights_matches_published_hash=source.matches_published_hash,
                source_weights_sha256=source.weights_sha256,
                files={},
                quantization=(
                    quantization_info(runtime, calibration_set, calibration[1])
                    if calibration_set is not None and calibration is not None
                    else None
                ),
                fidelity=fidelity,
                provenance=source.provenance,
                build_seconds=round(time.perf_counter() - started, 2),
            )
            manifest = seal(tmp, manifest, labels)
    except (OSError, RuntimeError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.ENOSPC, errno.EROFS):
            raise CacheUnwritable(
                f"cannot write the built model into {folder.parent} ({exc.strerror}); point "
                "RESNET_SERVICE_MODEL_CACHE_DIR (--cache-dir) at a writable folder"
            ) from None
        raise ArtifactBuildFailed(
            f"building the {runtime} {precision} model failed: {type(exc).__name__}: {exc}"
        ) from exc
    log.info(
        "built %s %s in %.1fs: top-1 agreement with torch fp32 %.3f on %d held-out images",
        runtime,
        precision,
        manifest.build_seconds,
        fidelity.top1_agreement,
        fidelity.images,
    )
    return manifest
