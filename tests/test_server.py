"""Against a real uvicorn process on 127.0.0.1: readiness, concurrency, overload, SIGTERM."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import jpeg_of
from tests.server import is_ready, serve, wait_until

pytestmark = pytest.mark.slow


def model_args(weights_file: Path, cache: Path, *extra: str) -> list[str]:
    return ["--weights", str(weights_file), "--cache-dir", str(cache), "--offline", *extra]


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


def test_readiness_before_and_after_warm_up(weights_file: Path, tmp_path: Path) -> None:
    # A fresh model cache: the server must calibrate, so there is a start-up window to see.
    with serve(tmp_path, *model_args(weights_file, tmp_path / "cache"), wait_ready=False) as server:
        early = httpx.get(f"{server.url}/readyz")
        assert early.status_code == 503
        assert early.json()["code"] == "not_ready"
        assert int(early.headers["retry-after"]) >= 1
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        wait_until(lambda: is_ready(server.url), 180, "readiness", server)
        ready = httpx.get(f"{server.url}/readyz").json()
        assert ready["status"] == "ready"
        assert "engine warmed up" in server.output()


def test_64_concurrent_clients_are_batched(
    weights_file: Path, model_cache: Path, tmp_path: Path
) -> None:
    data = jpeg_of("chelsea")
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
        metrics = httpx.get(f"{server.url}/metrics").text
        rejected = {
            labels["reason"]: value
            for name, labels, value in metric_samples(metrics, "resnet_service_rejections")
            if name.endswith("_total")
        }
        assert rejected["overloaded"] == statuses.count(503)


def test_sigterm_under_load_loses_no_accepted_request(
    weights_file: Path, model_cache: Path, tmp_path: Path
) -> None:
    args = model_args(weights_file, model_cache, "--threads", "1", "--drain-delay", "0.5")
    count = 24
    with serve(tmp_path, *args) as server:

        async def scenario() -> tuple[list[httpx.Response], int]:
            task = asyncio.ensure_future(
                post_many(server.url, jpeg_of("rocket", (4032, 3024)), count)
            )
            async with httpx.AsyncClient(base_url=server.url) as probe:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    text = (await probe.get("/metrics")).text
                    in_flight = metric_samples(text, "resnet_service_in_flight_requests")[0][2]
                    if in_flight >= count + 1:  # every upload accepted (+ this scrape)
                        break
                    await asyncio.sleep(0.005)
                else:
                    raise AssertionError("requests never all in flight")
                server.terminate()
                await asyncio.sleep(0.1)
                draining = await probe.get("/readyz")
            return await task, draining.status_code

        responses, readiness_after_sigterm = asyncio.run(scenario())
        assert readiness_after_sigterm == 503
        assert [r.status_code for r in responses] == [200] * count
        server.process.wait(60)
        assert server.process.returncode in (0, -15)
        assert "draining" in server.output()


def test_start_without_weights_exits_with_the_remedy(tmp_path: Path) -> None:
    env = {"TORCH_HOME": str(tmp_path / "empty-torch-home")}
    with (
        pytest.raises(AssertionError, match="server exited") as info,
        serve(tmp_path, "--offline", "--cache-dir", str(tmp_path), env=env),
    ):
        pass
    assert "RESNET_SERVICE_WEIGHTS_PATH" in str(info.value)
    assert "server exited (3)" in str(info.value)


def test_two_workers_share_one_metrics_view(
    weights_file: Path, model_cache: Path, tmp_path: Path
) -> None:
    args = model_args(weights_file, model_cache, "--workers", "2")
    with serve(tmp_path, *args) as server:
        wait_until(
            lambda: all(is_ready(server.url) for _ in range(6)), 120, "both workers ready", server
        )
        model = httpx.get(f"{server.url}/model").json()
        assert model["runtime"]["workers"] == 2
        assert model["runtime"]["torch_threads"] >= 1
        responses = asyncio.run(post_many(server.url, jpeg_of("coffee"), 20))
        assert [r.status_code for r in responses] == [200] * 20
        metrics = httpx.get(f"{server.url}/metrics").text
        served = sum(
            value
            for name, labels, value in metric_samples(metrics, "resnet_service_requests")
            if name.endswith("_total") and labels["route"] == "/classify"
        )
        assert served == 20
