"""Settings: bounds, environment, and start-up errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from resnet_service.config import SettingsError, load_settings
from resnet_service.cpus import (
    ISA_LEVELS,
    MAX_AUTO_WORKERS,
    isa_level,
    resolve_workers,
    threads_per_worker,
    usable_cpus,
)


def test_defaults_are_valid() -> None:
    settings = load_settings()
    assert settings.precision == "int8"
    assert settings.default_top_k == 5
    assert settings.allow_random_weights is False


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNET_SERVICE_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("RESNET_SERVICE_PRECISION", "fp32")
    settings = load_settings()
    assert settings.max_batch_size == 4
    assert settings.precision == "fp32"


def test_overrides_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNET_SERVICE_MAX_BATCH_SIZE", "4")
    assert load_settings(max_batch_size=8).max_batch_size == 8


@pytest.mark.parametrize(
    ("env", "value", "named"),
    [
        ("MAX_BATCH_SIZE", "0", "max_batch_size"),
        ("PRECISION", "int4", "precision"),
        ("QUEUE_CAPACITY", "-1", "queue_capacity"),
        ("MAX_PIXELS", "999999999999", "max_pixels"),
        ("WEIGHTS_PATH", "/no/such/file.pth", "weights_path"),
        ("INFERENCE_THREADS", "many", "inference_threads"),
        ("RUNTIME", "tensorflow", "runtime"),
        ("QUEUE_BUDGET_MS", "0", "queue_budget_ms"),
    ],
)
def test_invalid_values_name_the_setting(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, named: str
) -> None:
    monkeypatch.setenv(f"RESNET_SERVICE_{env}", value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert named in str(info.value)
    assert f"RESNET_SERVICE_{env}" in str(info.value)


@pytest.mark.parametrize(
    ("env", "hint"),
    [("TORCH_THREADS", "INFERENCE_THREADS"), ("WORKRS", "WORKERS"), ("NO_SUCH_THING", None)],
)
def test_unknown_variables_are_refused_with_a_hint(
    monkeypatch: pytest.MonkeyPatch, env: str, hint: str | None
) -> None:
    # A renamed or misspelt variable would otherwise be ignored without a word.
    monkeypatch.setenv(f"RESNET_SERVICE_{env}", "2")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert f"RESNET_SERVICE_{env}: not a setting" in str(info.value)
    if hint:
        assert f"did you mean RESNET_SERVICE_{hint}?" in str(info.value)


def test_unknown_setting_refused() -> None:
    with pytest.raises(SettingsError, match="max_batchsize"):
        load_settings(max_batchsize=3)


def test_cross_field_checks(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="default_top_k"):
        load_settings(default_top_k=10, max_top_k=5)
    with pytest.raises(SettingsError, match="give one of"):
        load_settings(weights_path=tmp_path, bundle_path=tmp_path)
    with pytest.raises(SettingsError, match="model_idle_ttl_s needs a model_repository"):
        load_settings(model_idle_ttl_s=60)
    assert (
        load_settings(model_repository=tmp_path, model_memory_budget_mb=300).model_idle_ttl_s
        is None
    )


def test_threads_follow_cpus_and_workers() -> None:
    cpus = usable_cpus()
    assert cpus >= 1
    assert threads_per_worker(0, 1) == cpus
    assert threads_per_worker(0, cpus) == 1
    assert threads_per_worker(0, cpus * 4) == 1
    assert threads_per_worker(3, 2) == 3
    assert resolve_workers(0) == min(cpus, MAX_AUTO_WORKERS)
    assert resolve_workers(3) == 3


def test_kubernetes_service_links_are_not_taken_for_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What Kubernetes injects into a pod for a Service named "resnet-service".
    monkeypatch.setenv("RESNET_SERVICE_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("RESNET_SERVICE_SERVICE_PORT_HTTP", "8000")
    monkeypatch.setenv("RESNET_SERVICE_PORT_8000_TCP_ADDR", "10.0.0.1")
    assert load_settings().port == 8000
    monkeypatch.setenv("RESNET_SERVICE_PORT", "tcp://10.0.0.1:8000")
    with pytest.raises(SettingsError, match="enableServiceLinks: false"):
        load_settings()


AVX2 = {"avx2", "fma"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


@pytest.mark.parametrize(
    ("flags", "cap", "level"),
    [
        (AVX2, None, "avx2"),
        (AVX2 | {"avx_vnni"}, None, "avx2_vnni"),
        (AVX512, None, "avx512_core"),
        (AVX512 | {"avx512_vnni"}, None, "avx512_core_vnni"),
        (AVX512 | {"avx512_vnni", "avx512_bf16", "amx_int8", "amx_tile"}, None, "avx512_core_amx"),
        (AVX512 | {"avx512_vnni"}, "AVX2", "avx2"),  # capped (ONEDNN_MAX_CPU_ISA)
        (AVX2, "AVX512_CORE_AMX", "avx2"),  # a cap never raises the level
        (AVX512, "ALL", "avx512_core"),
        (set(), None, "sse41"),
    ],
)
def test_instruction_set_level(flags: set[str], cap: str | None, level: str) -> None:
    assert isa_level(flags, cap) == level
    assert level in ISA_LEVELS


def test_a_cap_below_vnni_builds_what_a_host_without_it_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch's int8 qconfig follows VNNI as the kernels see it: under an AVX2 cap the 7-bit
    activations of a host without VNNI (8-bit ones saturate there: measured 2.5 points)."""
    from resnet_service.cpus import has_vnni, vnni_in_effect
    from resnet_service.model.architecture import host_qconfig

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not vnni_in_effect()
    assert host_qconfig() == "x86"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert vnni_in_effect() == has_vnni()
    assert host_qconfig() == ("onednn" if has_vnni() else "x86")
