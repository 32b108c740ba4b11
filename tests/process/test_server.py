"""Against a real uvicorn process on 127.0.0.1: readiness, concurrency, overload, SIGTERM."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import jpeg_of, serve, wait_until


def model_args(weights_file: Path, cache: Path, *extra: str) -> list[str]:
    """The torch runtime here: these tests cover its end-to-end path (the default runtime,
    OpenVINO, is served by most other end-to-end tests)."""
    args = ["--weights", str(weights_file), "--cache-dir", str(cache), "--offline"]
    return [*args, "--runtime", "torch", *extra]


def metric_samples(text: str, family: str) -> list[tuple[str, dict[str, str], float]]:
    for fam in text_string_to_metric_families(text):
        if fam.name == family:
            return [(s.name, s.labels, s.value) for s in fam.samples]
    raise AssertionError(f"metric family {family} missing")


async def post_many(
    url: str, data: bytes, count: int, path: str = "/classify"
) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post(path, files={"image": ("p.jpg", data, "image/jpeg")})
                for _ in range(count)
            )
        )


def probe_readyz(url: str) -> str:
    """One readiness probe: "refused" (nothing listens yet), or the status code."""
    try:
        return str(httpx.get(f"{url}/readyz", timeout=5).status_code)
    except httpx.ConnectError:
        return "refused"


def test_workers_listen_only_once_warm_and_readiness_never_flips(
    weights_file: Path, tmp_path: Path
) -> None:
    # A fresh model cache: the preflight calibrates, so there is a start-up window to watch.
    args = model_args(weights_file, tmp_path / "cache", "--workers", "2")
    with serve(tmp_path, *args, wait_ready=False) as server:
        seen: list[str] = []

        def ready() -> bool:
            seen.append(probe_readyz(server.url))
            return seen[-1] == "200"

        wait_until(ready, 240, "readiness", server)
        # Before: nothing listens, or a warm worker says the replica is still starting; never
        # a worker that takes a connection and then cannot serve it.
        assert set(seen[:-1]) <= {"refused", "503"}, seen
        after = [probe_readyz(server.url) for _ in range(40)]
        assert after == ["200"] * 40  # one answer whichever worker takes the probe
        for pid in server.worker_pids():
            lines = [line for line in server.output().splitlines() if f"[{pid}]" in line]
            warm = next(i for i, line in enumerate(lines) if "engine warmed up" in line)
            listening = next(i for i, line in enumerate(lines) if "listening on" in line)
            assert warm < listening  # warm first, then listening


def test_64_concurrent_clients_are_batched(
    weights_file: Path, model_cache: Path, tmp_path: Path
) -> None:
    data = jpeg_of("chelsea")
    # A burst of 64 on one single-threaded worker is ~0.5-1 s of work, far inside the
    # deadline: with default settings it is queued and served whole, never cut.
    with serve(tmp_path, *model_args(weights_file, model_cache)) as server:
        reference = httpx.post(f"{server.url}/classify", files={"image": ("p.jpg", data)}).json()
        responses = asyncio.run(post_many(server.url, data, 64))
        assert [r.status_code for r in responses] == [200] * 64
        expected = [p["index"] for p in reference["predictions"]]
        for response in responses:
            assert [p["index"] for p in response.json()["predictions"]] == expected
        assert max(r.json()["batch_size"] for r in responses) > 1
        metrics = httpx.get(f"{server.url}/metrics").text
        buckets = {
            labels["le"]: value
            for name, labels, value in metric_samples(metrics, "resnet_service_batch_size")
            if name.endswith("_bucket")
        }
        count = next(
            v
            for n, _, v in metric_samples(metrics, "resnet_service_batch_size")
            if n.endswith("_count")
        )
        assert buckets["1.0"] < count  # some forward passes carried more than one image
        requests = sum(
            value
            for name, labels, value in metric_samples(metrics, "resnet_service_requests")
            if name.endswith("_total")
            and labels["route"] == "/classify"
            and labels["status"] == "200"
        )
        assert requests == 65


def test_overload_gives_503_and_retry_after_never_500(
    weights_file: Path, model_cache: Path, tmp_path: Path
) -> None:
    env = {"RESNET_SERVICE_QUEUE_CAPACITY": "1", "RESNET_SERVICE_DECODE_THREADS": "1"}
    args = model_args(weights_file, model_cache, "--max-batch-size", "1", "--threads", "1")
    with serve(tmp_path, *args, env=env) as server:
        responses = asyncio.run(post_many(server.url, jpeg_of("astronaut", (1600, 1200)), 64))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(503) > 0
        assert statuses.count(200) > 0
        for response in responses:
            if response.status_code == 503:
                assert response.json()["code"] == "overloaded"
                assert int(response.headers["retry-after"]) >= 1

        def refused() -> float:  # refusals from the request head are counted within 0.1 s
            metrics = httpx.get(f"{server.url}/metrics").text
            return sum(
                value
                for name, labels, value in metric_samples(metrics, "resnet_service_rejections")
                if name.endswith("_total") and labels["reason"] == "overloaded"
            )

        wait_until(lambda: refused() == statuses.count(503), 5, "every refusal counted", server)


def test_start_without_weights_exits_with_the_remedy(tmp_path: Path) -> None:
    env = {"TORCH_HOME": str(tmp_path / "empty-torch-home")}
    with (
        pytest.raises(AssertionError, match="server exited") as info,
        serve(tmp_path, "--offline", "--cache-dir", str(tmp_path), env=env),
    ):
        pass
    assert "RESNET_SERVICE_WEIGHTS_PATH" in str(info.value)
    assert "server exited (3)" in str(info.value)


def test_two_workers_share_the_load_and_one_metrics_view(
    weights_file: Path, model_cache: Path, tmp_path: Path
) -> None:
    # The default runtime (OpenVINO): two workers start in seconds.
    args = ["--weights", str(weights_file), "--cache-dir", str(model_cache), "--offline"]
    args += ["--workers", "2"]
    budget = {"RESNET_SERVICE_QUEUE_BUDGET_MS": "30000"}  # a burst test, as above
    with serve(tmp_path, *args, env=budget) as server:
        model = httpx.get(f"{server.url}/model").json()
        assert model["settings"]["workers"] == 2
        assert model["settings"]["inference_threads"] >= 1
        responses = asyncio.run(post_many(server.url, jpeg_of("coffee"), 32))
        assert [r.status_code for r in responses] == [200] * 32
        metrics = httpx.get(f"{server.url}/metrics").text
        served = sum(
            value
            for name, labels, value in metric_samples(metrics, "resnet_service_requests")
            if name.endswith("_total") and labels["route"] == "/classify"
        )
        assert served == 32
        per_worker = {
            labels["worker"]: value
            for name, labels, value in metric_samples(metrics, "resnet_service_worker_requests")
            if name.endswith("_total")
        }
        # 32 connections spread by the kernel over both workers' sockets (SO_REUSEPORT).
        assert set(per_worker) == {"0", "1"}, per_worker
        assert min(per_worker.values()) >= 4, per_worker


def test_a_taken_port_is_refused_at_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "resnet_service", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 3
    assert f"cannot bind 127.0.0.1:{port}" in proc.stderr
