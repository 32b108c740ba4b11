"""The peer harness's parts (``resnet_bench.peers``) that need no TorchServe: the files it
archives, the configuration it writes, the requests it sends, how it stops process groups and
reads the ratios. The whole run (``make bench-peers``) installs TorchServe and is never a test."""

from __future__ import annotations

import importlib.util
import inspect
import json
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18

from resnet_bench import loadgen, servers
from resnet_bench.images import bench_images
from resnet_bench.peers import archive, bentoml, load, report, run, service, torchserve
from resnet_bench.runner import MAIN_IMAGE
from resnet_service.model.torch_network import imagenet_labels
from resnet_service.model.weights import WeightsSource, load_state_dict_file, random_weights
from tests.harness import wait_until


def _properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def test_config_binds_every_port_to_loopback_and_batches(tmp_path: Path) -> None:
    ports = torchserve.TorchServePorts(1001, 1002, 1003, 1004, 1005)
    layout = torchserve.TorchServeLayout(workers=3, batch_size=8, max_batch_delay_ms=5)
    props = _properties(torchserve.torchserve_config(ports, layout, tmp_path, "m.mar"))
    assert props["inference_address"] == "http://127.0.0.1:1001"
    assert props["management_address"] == "http://127.0.0.1:1002"
    assert props["metrics_address"] == "http://127.0.0.1:1003"
    assert (props["grpc_inference_address"], props["grpc_inference_port"]) == ("127.0.0.1", "1004")
    assert (props["grpc_management_address"], props["grpc_management_port"]) == (
        "127.0.0.1",
        "1005",
    )
    assert props["model_store"] == str(tmp_path)
    assert props["load_models"] == "m.mar"
    assert props["disable_token_authorization"] == "true"
    model = json.loads(props["models"])[archive.MODEL_NAME]["1.0"]
    assert model["marName"] == "m.mar"
    assert (model["minWorkers"], model["maxWorkers"]) == (3, 3)
    assert (model["batchSize"], model["maxBatchDelay"]) == (8, 5)


def test_env_gives_one_torch_thread_and_private_temp_and_logs(tmp_path: Path) -> None:
    env = torchserve.torchserve_env(torchserve.TorchServeLayout(workers=2), tmp_path)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    assert env["TMPDIR"] == env["TEMP"] == str(tmp_path / "tmp")
    assert Path(env["LOG_LOCATION"]).is_dir()
    assert Path(env["TMPDIR"]).is_dir()


def test_archive_inputs_load_the_way_torchserve_eager_path_does(
    weights_file: Path, tmp_path: Path
) -> None:
    """TorchServe imports model.py, builds its one class with no arguments and loads the
    state_dict into it; the result must be torchvision's ResNet18 with the same tensors."""
    state_dict = load_state_dict_file(weights_file)
    inputs = archive.write_archive_inputs(state_dict, imagenet_labels(), tmp_path)
    spec = importlib.util.spec_from_file_location("model", inputs.model_file)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == "model"]
    assert len(classes) == 1
    model = classes[0]()
    assert isinstance(model, torch.nn.Module)
    model.load_state_dict(torch.load(inputs.serialized_file, weights_only=True))
    reference = resnet18()
    reference.load_state_dict(state_dict)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    labels = json.loads(inputs.labels_file.read_text())
    assert len(labels) == 1000
    assert labels["0"] == imagenet_labels()[0]


def test_weights_come_from_the_explicit_path_else_seeded_random(
    weights_file: Path, tmp_path: Path
) -> None:
    explicit = service.resolve_weights({"RESNET_SERVICE_WEIGHTS_PATH": str(weights_file)})
    assert explicit.source is WeightsSource.EXPLICIT_PATH
    assert service.service_env(explicit) == {"RESNET_SERVICE_ALLOW_DOWNLOADS": "false"}
    fallback = service.resolve_weights({})  # the test's torch hub cache is empty
    assert fallback.source is WeightsSource.RANDOM
    assert service.service_env(fallback)["RESNET_SERVICE_ALLOW_RANDOM_WEIGHTS"] == "true"


def test_same_weights_compares_the_reported_hash_prefix() -> None:
    weights = random_weights()
    probe = load.Probe("tench", 0.5, weights.sha256[:12])
    assert service.same_weights(probe, weights)
    assert not service.same_weights(load.Probe("tench", 0.5, "0" * 12), weights)
    assert not service.same_weights(load.Probe("tench", 0.5, None), weights)


def test_raw_request_is_one_whole_http_post() -> None:
    payload = torchserve.raw_request(8080, "/predictions/resnet18", b"\xff\xd8jpeg", "image/jpeg")
    head, body = payload.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /predictions/resnet18 HTTP/1.1"
    assert "Content-Length: 6" in lines
    assert "Content-Type: image/jpeg" in lines
    assert body == b"\xff\xd8jpeg"


def _server(name: str, rps: float, p99: float, concurrency: int = 16) -> load.ServerResult:
    level = load.LevelResult(concurrency, 100, 100, 0, 0, rps, 1.0, 2.0, p99)
    return load.ServerResult(
        name, "layout", 1.0, load.Probe("x", 1.0), [level], {"peak_rss_mb": 1.0}
    )


def test_ratios_read_against_each_peer_s_goal_at_16_clients() -> None:
    ratios = report.Ratios.of(_server("us", 180, 60), _server("TorchServe", 20, 300), 16)
    assert (ratios.throughput, ratios.p99) == (9.0, 0.2)
    assert ratios.throughput_goal == 8.0
    assert ratios.throughput_goal_met
    assert ratios.p99_goal_met
    assert ratios.at_goal_concurrency
    bento = report.Ratios.of(_server("us", 50, 60), _server("BentoML", 20, 300), 16)
    assert (bento.peer, bento.throughput_goal) == ("BentoML", 3.0)
    assert not bento.throughput_goal_met  # 2.5x: below BentoML's 3x
    short = report.Ratios.of(_server("us", 40, 60, 2), _server("them", 20, 100, 2), 2)
    assert not short.throughput_goal_met
    assert not short.p99_goal_met
    assert not short.at_goal_concurrency


def test_stop_group_outlasts_a_leader_that_exits_first() -> None:
    """``torchserve --foreground`` dies at once on SIGTERM while its JVM and workers live on:
    the group is stopped only when no member is left, by SIGKILL if one ignores SIGTERM."""
    script = "sleep 30 & (trap '' TERM; exec sleep 30) & exec sleep 30"
    process = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    wait_until(lambda: len(servers._group_members(process.pid)) == 3, 5, "three group members")
    servers.stop_process_group(process, grace=0.5)
    assert servers._group_members(process.pid) == []
    assert process.returncode is not None


def test_stop_group_stops_what_a_finished_leader_left_running() -> None:
    """A shell that started a server in the background and exited: the server is stopped."""
    process = subprocess.Popen(["sh", "-c", "sleep 30 & exit 0"], start_new_session=True)
    process.wait(10)
    assert len(servers._group_members(process.pid)) == 1  # the background sleep
    servers.stop_process_group(process, grace=5)
    assert servers._group_members(process.pid) == []


def test_main_refuses_a_level_without_clients() -> None:
    with pytest.raises(SystemExit):
        run.main(["--concurrency", "0"])


def test_a_level_without_answers_gives_no_ratio_and_valid_json() -> None:
    """A peer that answered nothing yields n/a, never NaN or infinity in peers.json."""
    empty = loadgen.LoadResult("closed", 16, None, 2.0)
    empty.failures[loadgen.LOST] += 3
    level = load.LevelResult.of(empty)
    assert (level.rps, level.p99_ms, level.errors) == (0.0, None, 3)
    peer = load.ServerResult("them", "layout", 1.0, load.Probe("x", 1.0), [level], {})
    ratios = report.Ratios.of(_server("us", 90, 60), peer, 16)
    assert (ratios.throughput, ratios.p99) == (None, None)
    assert not ratios.throughput_goal_met
    assert not ratios.p99_goal_met
    json.dumps(asdict(ratios), allow_nan=False)


def test_report_says_when_a_goal_is_missed_or_read_below_16_clients() -> None:
    us, them = _server("us", 40, 60, 2), _server("TorchServe", 20, 100, 2)
    peer_report = report.PeerReport(
        date="today",
        machine={"cpu": "some CPU", "usable_cpus": 2},
        peer_versions={},
        image="jpeg-500x375",
        image_bytes=1,
        weights_source="random",
        weights_sha256="0" * 12,
        same_weights=True,
        duration_s=2.0,
        servers=[us, them],
        ratios=[report.Ratios.of(us, them, 2)],
    )
    text = report.render(peer_report)
    assert "| us | layout | 2 | 40 |" in text
    assert (
        "TorchServe throughput at 2 clients: **2.0** (goal ≥ 8.0: NOT met, but the goal is set "
        "at 16" in text
    )
    assert "p99 at 2 clients: **0.6** (goal ≤ 0.3: NOT met" in text


def test_the_bentoml_service_is_valid_python_with_its_settings_filled_in(tmp_path: Path) -> None:
    weights = service.resolve_weights({})
    folder = bentoml.write_service(weights, tmp_path, workers=2)
    source = (folder / "service.py").read_text()
    compile(source, "service.py", "exec")  # what bentoml serve will import
    assert "@bentoml.service(workers=2" in source
    assert f"max_batch_size={bentoml.MAX_BATCH_SIZE}" in source
    assert "weights_only=True" in source
    assert len(json.loads((folder / "labels.json").read_text())) == 1000
    state = torch.load(folder / "weights.pt", weights_only=True)
    assert set(state) == set(weights.state_dict)
    request = bentoml.request_bytes(1234, bench_images([MAIN_IMAGE])[MAIN_IMAGE])
    assert request.startswith(b"POST /classify HTTP/1.1\r\n")
    assert b'name="images"' in request
