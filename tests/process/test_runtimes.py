"""OpenVINO and ONNX Runtime: built from the same weights and calibration images as torch,
cached and checked like the torch int8 model, served by workers that never import torch."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from resnet_service.config import Precision, RuntimeName, Settings
from resnet_service.core.errors import CacheUnwritable, RuntimeUnavailable
from resnet_service.core.images import LOCAL_FILE_LIMITS, decode_to_pixels, normalise_pixels
from resnet_service.core.model_info import measured_here
from resnet_service.core.runtime import pixel_input
from resnet_service.model.artifacts import ARTIFACT_MANIFEST, read_artifact
from resnet_service.model.hub import sha256_file
from resnet_service.model.served import find_or_build, open_served_model
from resnet_service.runtimes.registry import open_runtime
from tests.harness import ROOT, Server, jpeg_of, make_settings, serve
from tests.weights import fp32_model

RUNTIMES: list[RuntimeName] = ["openvino", "onnxruntime"]


def settings_for(weights: Path, cache: Path, runtime: RuntimeName, **extra: object) -> Settings:
    return make_settings(weights, cache, runtime=runtime, **extra)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_int8_is_built_once_calibrated_and_measured(
    runtime: RuntimeName, weights_file: Path, model_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(weights_file, model_cache, runtime)
    folder = find_or_build(settings)
    manifest, labels = read_artifact(folder)
    assert (manifest.runtime, manifest.precision) == (runtime, "int8")
    assert manifest.source_weights_sha256 == sha256_file(weights_file)
    assert len(labels) == 1000
    quant = manifest.quantization
    assert quant is not None
    assert quant.method == ("nncf_ptq" if runtime == "openvino" else "ort_static_qdq")
    assert quant.calibration_images == 32  # the same built-in photos as torch's int8
    fidelity = manifest.fidelity
    assert fidelity is not None
    assert fidelity.images == 16
    assert fidelity.mean_abs_logit_rel_error < 0.1
    assert fidelity.measured_on == measured_here()
    with caplog.at_level(logging.INFO):
        assert find_or_build(settings) == folder
    assert "found in the cache" in caplog.text
    assert "building" not in caplog.text


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_fp32_matches_torch(runtime: RuntimeName, weights_file: Path, model_cache: Path) -> None:
    model = open_served_model(settings_for(weights_file, model_cache, runtime, precision="fp32"))
    assert model.info.runtime == runtime
    assert model.info.fidelity is not None
    assert model.info.fidelity.top1_agreement == 1.0
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    import torch

    with torch.inference_mode():
        expected = fp32_model()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.runtime.infer(x), expected, rtol=1e-3, atol=1e-3)


def test_corrupt_and_foreign_cache_entries_are_rebuilt(
    weights_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(weights_file, tmp_path, "onnxruntime", precision="fp32")
    folder = find_or_build(settings)
    model_file = folder / "model.onnx"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert find_or_build(settings) == folder
    assert "does not match its sha256" in caplog.text
    manifest = json.loads((folder / ARTIFACT_MANIFEST).read_text())
    manifest["source_weights_sha256"] = "0" * 64
    (folder / ARTIFACT_MANIFEST).write_text(json.dumps(manifest))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        find_or_build(settings)
    assert "made from other weights" in caplog.text
    assert read_artifact(folder)[0].source_weights_sha256 == sha256_file(weights_file)


def test_a_cache_that_cannot_be_written_is_a_clear_error(
    weights_file: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache should be")
    settings = settings_for(weights_file, blocker / "cache", "openvino")
    with pytest.raises(CacheUnwritable, match="RESNET_SERVICE_MODEL_CACHE_DIR"):
        find_or_build(settings)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_runtime_that_is_not_installed_names_the_extra(
    runtime: RuntimeName, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, runtime, None)  # import now fails as if not installed
    with pytest.raises(RuntimeUnavailable, match=rf"pip install 'resnet-service\[{runtime}\]'"):
        open_runtime(runtime, "int8", tmp_path / "model", 1)


THREADS_PROBE = """
import asyncio, os, sys
from resnet_service.core.classifier import Classifier
from resnet_service.service.loading import classifier_options
from resnet_service.config import load_settings
from resnet_service.model.served import open_served_model
from tests.harness import jpeg_of
settings = load_settings(**{k: v for k, v in (a.split("=", 1) for a in sys.argv[1:])})
classifier = Classifier(open_served_model(settings), classifier_options(settings))
classifier.start()
asyncio.run(classifier.classify(jpeg_of("coffee")))
import psutil
print(psutil.Process().num_threads())
classifier.stop()
"""


def os_threads(weights: Path, cache: Path, runtime: str, threads: int) -> int:
    args = [
        f"weights_path={weights}",
        f"model_cache_dir={cache}",
        "allow_downloads=false",
        f"runtime={runtime}",
        f"inference_threads={threads}",
        "decode_threads=1",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", THREADS_PROBE, *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("runtime", ["torch", *RUNTIMES])
def test_inference_threads_are_honoured(
    runtime: str, weights_file: Path, model_cache: Path
) -> None:
    """The process's OS threads follow the setting: one inference thread gives a small fixed
    set (event loop, engine, decode, the runtime's one), whatever the host's core count; two
    add the runtime's second."""
    find_or_build(settings_for(weights_file, model_cache, "openvino"))  # built once, shared
    find_or_build(settings_for(weights_file, model_cache, "onnxruntime"))
    one = os_threads(weights_file, model_cache, runtime, 1)
    two = os_threads(weights_file, model_cache, runtime, 2)
    assert one <= 8, one
    assert two > one, (one, two)


# --- served over HTTP, torch-free -------------------------------------------------------------
@pytest.fixture(scope="module", params=RUNTIMES)
def runtime_server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    weights_file: Path,
    model_cache: Path,
) -> Iterator[tuple[str, Server]]:
    args = ["--weights", str(weights_file), "--cache-dir", str(model_cache), "--offline"]
    with serve(tmp_path_factory.mktemp("rt"), *args, "--runtime", request.param) as server:
        yield request.param, server


def test_served_by_a_worker_without_torch(runtime_server: tuple[str, Server]) -> None:
    runtime, server = runtime_server
    (worker,) = server.worker_pids()
    assert f"(runtime {runtime}; torch not imported)" in server.output()
    mapped = {m.path for m in psutil.Process(worker).memory_maps()}
    assert not any("libtorch" in path for path in mapped)  # no torch library at all
    status = Path(f"/proc/{worker}/status").read_text()
    peak_mb = (
        int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM"))) / 1024
    )
    print(f"{runtime} worker peak RSS: {peak_mb:.0f} MB")
    assert peak_mb < 450  # a torch worker peaks at ~1 GB here
    model = httpx.get(f"{server.url}/model").json()
    assert model["runtime"] == runtime
    assert model["fidelity"]["images"] == 16


def test_good_bad_and_batch_over_http(runtime_server: tuple[str, Server]) -> None:
    runtime, server = runtime_server
    good = httpx.post(f"{server.url}/classify", files={"image": jpeg_of("chelsea")})
    assert good.status_code == 200
    assert good.json()["model"]["runtime"] == runtime
    assert len(good.json()["predictions"]) == 5
    bad = httpx.post(f"{server.url}/classify", files={"image": b"not an image"})
    assert bad.status_code == 415
    batch = httpx.post(
        f"{server.url}/classify/batch",
        files=[("images", ("a.jpg", jpeg_of("coffee"))), ("images", ("b.txt", b"nope"))],
    ).json()
    assert [r["error"] is None for r in batch["results"]] == [True, False]
    assert batch["results"][0]["predictions"][0]["index"] >= 0


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_openvino_normalises_8bit_images_in_its_graph(
    precision: Precision, weights_file: Path, model_cache: Path
) -> None:
    """The served path (uint8 NHWC into the compiled graph, mean/std by PrePostProcessor)
    gives the logits of the float path (numpy normalisation, NCHW) on the same pixels."""
    settings = settings_for(weights_file, model_cache, "openvino", precision=precision)
    model = open_served_model(settings)
    runtime = pixel_input(model.runtime)
    assert runtime is not None
    names = ["chelsea", "coffee", "astronaut", "rocket"]
    pixels = np.stack([decode_to_pixels(jpeg_of(n), LOCAL_FILE_LIMITS, model.spec) for n in names])
    in_graph = runtime.infer_pixels(pixels)
    in_numpy = model.runtime.infer(normalise_pixels(pixels, model.spec))
    assert in_graph.shape == (len(names), 1000)
    if precision == "fp32":  # float rounding only
        np.testing.assert_allclose(in_graph, in_numpy, rtol=1e-4, atol=1e-4)
    else:  # an input on a quantisation step's edge may land one step over
        scale = float(np.abs(in_numpy).max())
        assert float(np.abs(in_graph - in_numpy).max()) <= 0.02 * scale
        assert (in_graph.argmax(1) == in_numpy.argmax(1)).all()
