"""Weights resolution, the int8 cache, bundles and fidelity, through the production loader."""

from __future__ import annotations

import functools
import hashlib
import http.server
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from resnet_service.config import load_settings
from resnet_service.core.errors import BundleInvalid, WeightsUnavailable
from resnet_service.core.runtime import ServedModel
from resnet_service.model import bundle as bundle_mod
from resnet_service.model.architecture import host_qconfig
from resnet_service.model.bundle import read_manifest
from resnet_service.model.hub import hub_checkpoint_path
from resnet_service.model.torch_network import imagenet_labels, load_model
from resnet_service.model.weights import (
    FP32_WEIGHTS,
    INT8_WEIGHTS,
    WeightsSource,
    find_in_hub_or_download,
    random_weights,
    resolve_fp32_weights,
    sha256_file,
)
from resnet_service.runtimes.torch_runtime import TorchRuntime
from tests.harness import make_settings
from tests.weights import write_test_bundle, write_weights


def module_of(model: ServedModel) -> torch.nn.Module:
    assert isinstance(model.runtime, TorchRuntime)
    return model.runtime.module


def is_int8(model: ServedModel) -> bool:
    return any("quantized" in type(m).__module__ for m in module_of(model).modules())


# --- resolution order ----------------------------------------------------------------------
def test_explicit_path_first(weights_file: Path) -> None:
    write_weights(hub_checkpoint_path(FP32_WEIGHTS.url))  # also in the hub cache: ignored
    got = resolve_fp32_weights(weights_file, allow_downloads=False, allow_random=False)
    assert got.source is WeightsSource.EXPLICIT_PATH
    assert got.sha256 == sha256_file(weights_file)
    assert got.path == weights_file


def test_hub_cache_second() -> None:
    cached = write_weights(hub_checkpoint_path(FP32_WEIGHTS.url))
    got = resolve_fp32_weights(None, allow_downloads=False, allow_random=False)
    assert got.source is WeightsSource.HUB_CACHE
    assert got.path == cached
    assert got.matches_published_hash is False  # our test file is not torchvision's


def test_no_weights_fails_with_the_remedy() -> None:
    with pytest.raises(WeightsUnavailable) as info:
        resolve_fp32_weights(None, allow_downloads=False, allow_random=False)
    message = info.value.detail
    assert "resnet18-f37072fd.pth" in message
    assert "RESNET_SERVICE_WEIGHTS_PATH" in message
    assert str(hub_checkpoint_path(FP32_WEIGHTS.url)) in message
    assert "RESNET_SERVICE_ALLOW_RANDOM_WEIGHTS" in message


def test_random_weights_only_behind_the_flag_and_seeded() -> None:
    got = resolve_fp32_weights(None, allow_downloads=False, allow_random=True)
    assert got.source is WeightsSource.RANDOM
    assert got.sha256 == random_weights().sha256


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving ``tmp_path``."""
    handler = functools.partial(_Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    server.shutdown()
    server.server_close()


def test_download_checks_the_published_hash(file_server: tuple[str, Path]) -> None:
    base, root = file_server
    src = write_weights(root / "tmp.pth")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    good = root / f"resnet18-{digest[:8]}.pth"
    src.rename(good)
    got = find_in_hub_or_download(f"{base}/{good.name}", allow_downloads=True)
    assert got is not None
    assert got.source is WeightsSource.DOWNLOAD
    assert got.matches_published_hash is True
    assert got.path == hub_checkpoint_path(good.name)

    bad = root / "resnet18-00000000.pth"
    bad.write_bytes(good.read_bytes())
    assert find_in_hub_or_download(f"{base}/{bad.name}", allow_downloads=True) is None
    assert not hub_checkpoint_path(bad.name).exists()


def test_downloads_off_means_no_download(file_server: tuple[str, Path]) -> None:
    base, root = file_server
    write_weights(root / "resnet18-abcdef12.pth")
    assert find_in_hub_or_download(f"{base}/resnet18-abcdef12.pth", allow_downloads=False) is None


class Payload:
    """Not a tensor: a pickle that ``weights_only=True`` must refuse to build."""


def test_weights_only_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Payload()}, path)
    with pytest.raises(WeightsUnavailable, match="cannot read"):
        resolve_fp32_weights(path, allow_downloads=False, allow_random=False)


def test_garbage_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailable):
        resolve_fp32_weights(path, allow_downloads=False, allow_random=False)


# --- int8 model, cache and fidelity ---------------------------------------------------------
def test_int8_model_and_its_provenance(int8_model: object, weights_file: Path) -> None:
    assert isinstance(int8_model, ServedModel)
    info = int8_model.info
    assert is_int8(int8_model)
    assert info.precision == "int8"
    assert info.weights_source is WeightsSource.EXPLICIT_PATH
    assert info.weights_sha256 == sha256_file(weights_file)
    assert info.random_weights is False
    assert int8_model.labels == imagenet_labels()
    assert len(int8_model.labels) == 1000
    quant = info.quantization
    assert quant is not None
    assert quant.method == "static_ptq"
    assert quant.engine == "x86"
    assert quant.qconfig == host_qconfig()  # onednn with VNNI, x86 (7-bit) on AVX2 alone
    assert quant.calibration_images == 32
    fid = quant.fidelity
    assert fid is not None
    assert fid.images == 16
    assert fid.image_source.endswith("holdout")
    # int8 error on logits, measured on held-out photos (random-feature net: ~4%).
    assert fid.mean_abs_logit_rel_error < 0.08
    assert 0 <= fid.top1_agreement <= 1
    assert fid.max_abs_prob_diff < 0.05


def test_second_start_uses_the_cache(
    weights_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(weights_file, tmp_path)
    first = load_model(settings)
    assert first.info.int8_cache is not None
    with caplog.at_level(logging.INFO):
        second = load_model(settings)
    assert "loaded from cache" in caplog.text
    assert "quantizing" not in caplog.text
    assert second.info.quantization == first.info.quantization
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(module_of(first)(x), module_of(second)(x))


def test_corrupt_cache_is_rebuilt(
    weights_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(weights_file, tmp_path)
    first = load_model(settings)
    assert first.info.int8_cache is not None
    cached = Path(first.info.int8_cache) / "weights.pt"
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        again = load_model(settings)
    assert "rejected" in caplog.text
    assert "does not match" in caplog.text
    assert read_manifest(Path(first.info.int8_cache)).weights_sha256 == sha256_file(cached)
    assert again.info.quantization is not None


def test_cache_made_from_other_weights_is_not_trusted(
    weights_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(weights_file, tmp_path)
    cache_dir = Path(load_model(settings).info.int8_cache or "")
    manifest = read_manifest(cache_dir)
    assert manifest.quantization is not None
    tampered = manifest.quantization.model_copy(update={"source_weights_sha256": "0" * 64})
    (cache_dir / "bundle.json").write_text(
        manifest.model_copy(update={"quantization": tampered}).model_dump_json()
    )
    with caplog.at_level(logging.WARNING):
        load_model(settings)
    assert "made from other weights" in caplog.text


def test_calibration_dir_changes_the_cache_key(weights_file: Path, tmp_path: Path) -> None:
    calib = tmp_path / "calib"
    calib.mkdir()
    from tests.harness import jpeg_of

    for i, name in enumerate(("astronaut", "coffee", "rocket")):
        (calib / f"{i}.jpg").write_bytes(jpeg_of(name))
    (calib / "notes.jpg").write_bytes(b"not really a jpeg")
    default = load_model(make_settings(weights_file, tmp_path / "cache"))
    custom = load_model(make_settings(weights_file, tmp_path / "cache", calibration_dir=calib))
    assert custom.info.int8_cache != default.info.int8_cache
    assert custom.info.quantization is not None
    assert custom.info.quantization.calibration_images == 3
    assert custom.info.quantization.calibration_source == str(calib)


def test_fp32_precision(fp32_loaded: object) -> None:
    assert isinstance(fp32_loaded, ServedModel)
    assert not is_int8(fp32_loaded)
    assert fp32_loaded.info.quantization is None


def test_official_int8_weights_are_preferred(int8_model: object, tmp_path: Path) -> None:
    assert isinstance(int8_model, ServedModel)
    official = hub_checkpoint_path(INT8_WEIGHTS.url)
    official.parent.mkdir(parents=True, exist_ok=True)
    torch.save(module_of(int8_model).state_dict(), official)
    loaded = load_model(load_settings(model_cache_dir=tmp_path, allow_downloads=False))
    assert loaded.info.quantization is not None
    assert loaded.info.quantization.method == "official"
    assert loaded.info.weights_source is WeightsSource.HUB_CACHE
    assert loaded.info.int8_cache is None
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(module_of(loaded)(x), module_of(int8_model)(x))


def test_start_without_weights_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailable, match="RESNET_SERVICE_WEIGHTS_PATH"):
        load_model(load_settings(model_cache_dir=tmp_path, allow_downloads=False))


def test_random_weights_flagged_everywhere(tmp_path: Path) -> None:
    loaded = load_model(
        load_settings(model_cache_dir=tmp_path, allow_downloads=False, allow_random_weights=True)
    )
    assert loaded.info.random_weights is True
    assert loaded.info.weights_source is WeightsSource.RANDOM


# --- bundles -------------------------------------------------------------------------------
def _fp32_bundle(directory: Path, classes: int = 3) -> Path:
    return write_test_bundle(directory, [f"label-{i}" for i in range(classes)])


def test_bundle_served_in_both_precisions(tmp_path: Path) -> None:
    bundle = _fp32_bundle(tmp_path / "bundle")
    fp32 = load_model(load_settings(bundle_path=bundle, precision="fp32", model_cache_dir=tmp_path))
    int8 = load_model(load_settings(bundle_path=bundle, model_cache_dir=tmp_path))
    assert fp32.labels == int8.labels == ["label-0", "label-1", "label-2"]
    assert fp32.info.weights_source is WeightsSource.BUNDLE
    assert fp32.info.provenance == {"note": "test"}
    assert is_int8(int8)
    assert not is_int8(fp32)
    assert int8.info.num_classes == 3


def test_bundle_with_corrupt_weights_is_refused(tmp_path: Path) -> None:
    bundle = _fp32_bundle(tmp_path / "bundle")
    with (bundle / bundle_mod.WEIGHTS).open("ab") as fh:
        fh.write(b"x")
    with pytest.raises(BundleInvalid, match="corrupt"):
        load_model(load_settings(bundle_path=bundle, precision="fp32", model_cache_dir=tmp_path))


def test_directory_without_manifest_is_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleInvalid, match=r"bundle\.json"):
        load_model(load_settings(bundle_path=tmp_path, model_cache_dir=tmp_path))
