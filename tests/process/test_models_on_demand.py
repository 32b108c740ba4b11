"""Models on demand over real ``serve`` processes (2 workers unless said): eight models in a
repository whose memory budget holds about three, requests spread over all of them
(Zipf-skewed and uniform) all answered while the least recently used are evicted; worker
memory bounded by the budget; a model that cannot load refused with its reason while the
others answer; idle models unloaded with their memory given back; a 90/10 traffic split that
holds, changed under load; a shadow version whose disagreement stops its share.

The models: one OpenVINO int8 artifact built from the test weights, copied as versions; a
"disagreeing" version is the same network with its labels.json reversed (its top-1 label
differs from the served one's on every image).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp

from resnet_bench.servers import bucket_quantile, histogram_buckets, metric_sum
from tests.harness import ClassifyLoad, Server, jpeg_of, serve, wait_until

IMAGE = jpeg_of("chelsea", (320, 240))
MODELS = [f"m{i}" for i in range(1, 9)]
#: About three of the test's int8 ResNet18s (65-82 MB each measured on an AMD EPYC Zen 4).
BUDGET_MB = 250


def copy_version(source: Path, root: Path, model: str, version: int) -> Path:
    target = root / model / str(version)
    shutil.copytree(source, target)
    return target


def models_of(server: Server) -> dict[str, Any]:
    return {m["name"]: m for m in httpx.get(f"{server.url}/models").json()["models"]}


def args(root: Path, cache: Path, *extra: str) -> tuple[str, ...]:
    return ("--repository", str(root), "--cache-dir", str(cache), "--offline", *extra)


class RssWatch:
    """The largest resident memory of each worker, sampled every 20 ms while the block runs."""

    def __init__(self, pids: list[int]) -> None:
        self.processes = [psutil.Process(pid) for pid in pids]
        self.peak = dict.fromkeys(pids, 0)
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._halt.wait(0.02):
            for process in self.processes:
                rss = process.memory_info().rss
                self.peak[process.pid] = max(self.peak[process.pid], rss)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self._thread.join(5)


async def spread(url: str, models: list[str], clients: int) -> tuple[list[str], list[float]]:
    """Send one request for each name in ``models`` (in that order, ``clients`` at a time);
    return the failures and every answer's latency."""
    failures: list[str] = []
    latencies: list[float] = []
    todo = iter(models)

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            for model in todo:
                started = time.monotonic()
                files = {"image": ("c.jpg", IMAGE, "image/jpeg")}
                r = await http.post("/classify", params={"model": model}, files=files)
                if r.status_code != 200 or r.json()["model"]["name"] != model:
                    failures.append(f"{model}: {r.status_code} {r.text[:200]}")
                else:
                    latencies.append(time.monotonic() - started)

    await asyncio.gather(*(client() for _ in range(clients)))
    return failures, latencies


def zipf(n: int, seed: int) -> list[str]:
    weights = [1 / (rank**1.1) for rank in range(1, len(MODELS) + 1)]
    return random.Random(seed).choices(MODELS, weights, k=n)


def uniform(n: int, seed: int) -> list[str]:
    return random.Random(seed).choices(MODELS, k=n)


@pytest.fixture(scope="module")
def eight(tmp_path_factory: pytest.TempPathFactory, artifact: Path) -> Path:
    root = tmp_path_factory.mktemp("repo-eight")
    for name in MODELS:
        copy_version(artifact, root, name, 1)
    broken = copy_version(artifact, root, "broken", 1)
    (broken / "model.xml").write_text("<net>not a model</net>")
    return root


def test_eight_models_in_a_budget_of_three_all_answered_within_memory(
    tmp_path: Path, eight: Path, model_cache: Path
) -> None:
    extra = ("--memory-budget", str(BUDGET_MB), "--workers", "2")
    with serve(tmp_path, *args(eight, model_cache, *extra)) as server:
        listed = models_of(server)
        assert {v["state"] for name in MODELS for v in listed[name]["versions"]} == {"AVAILABLE"}
        pids = server.worker_pids()
        base = max(psutil.Process(pid).memory_info().rss for pid in pids)  # runtime started
        primed = metric_sum(server.url, "resnet_service_model_loads", outcome="ok")
        with RssWatch(pids) as watch:
            failures, zipf_latency = asyncio.run(spread(server.url, zipf(96, 0), 4))
            zipf_loads = metric_sum(server.url, "resnet_service_model_loads", outcome="ok") - primed
            zipf_waits = histogram_buckets(server.url, "resnet_service_cold_request_wait_seconds")
            more, uniform_latency = asyncio.run(spread(server.url, uniform(96, 1), 4))
        assert failures + more == []
        listed = models_of(server)
        measured = [
            v["memory_mb"] for name in MODELS for v in listed[name]["versions"] if v["memory_mb"]
        ]
        margin = max(measured) * 2**20  # one model's
        bound = base + BUDGET_MB * 2**20 + margin
        peak = max(watch.peak.values())
        loads = metric_sum(server.url, "resnet_service_model_loads", outcome="ok") - primed
        evictions = metric_sum(server.url, "resnet_service_model_unloads", reason="budget")
        waits = histogram_buckets(server.url, "resnet_service_cold_request_wait_seconds")
        print(
            f"\n[on demand] 8 models, budget {BUDGET_MB} MB, 2 workers, 4 clients: 96 Zipf + 96 "
            f"uniform requests, 0 errors; hit rate Zipf {1 - zipf_loads / 96:.2f}, uniform "
            f"{1 - (loads - zipf_loads) / 96:.2f}; {evictions:.0f} evictions; cold wait p50/p99 "
            f"≤ {bucket_quantile({}, zipf_waits, 0.5):g}/{bucket_quantile({}, zipf_waits, 0.99):g}"
            f" s (Zipf), ≤ {bucket_quantile(zipf_waits, waits, 0.5):g}/"
            f"{bucket_quantile(zipf_waits, waits, 0.99):g} s (uniform); answer p50 Zipf "
            f"{sorted(zipf_latency)[48] * 1000:.0f} ms, uniform "
            f"{sorted(uniform_latency)[48] * 1000:.0f} ms; peak worker RSS "
            f"{peak / 2**20:.0f} MB (bound {bound / 2**20:.0f} = base {base / 2**20:.0f} + "
            f"budget + {margin / 2**20:.0f})"
        )
        assert peak <= bound, f"a worker reached {peak / 2**20:.0f} MB, over {bound / 2**20:.0f}"
        assert evictions > 0  # eight models cannot all fit: the budget was applied
        assert server.worker_pids() == pids  # nothing crashed

        # A version that cannot load is refused with its reason; the others keep answering.
        with httpx.Client(base_url=server.url, timeout=60) as client:
            files = {"image": ("c.jpg", IMAGE, "image/jpeg")}
            for _ in range(2):  # the first load fails; then its state says why (per worker)
                bad = client.post("/classify", params={"model": "broken"}, files=files)
                assert (bad.status_code, bad.json()["code"]) in (
                    (400, "model_load_failed"),
                    (404, "model_not_found"),
                ), bad.text
                assert "model.xml does not match its sha256" in bad.json()["detail"]
            good = client.post("/classify", params={"model": "m1"}, files=files)
            assert good.status_code == 200
        assert server.worker_pids() == pids


def test_idle_models_unload_and_give_their_memory_back(
    tmp_path: Path, eight: Path, model_cache: Path
) -> None:
    """Each cycle loads two models, then waits for the idle TTL to unload both. The first
    cycle also pays the worker's first requests (the image codecs, the HTTP stack: ~5 MB,
    kept; the runtime itself was started before serving, see ``OnDemand.prime``); after it,
    the idle worker's memory goes back to that floor each time."""
    with serve(tmp_path, *args(eight, model_cache, "--idle-ttl", "0.5")) as server:
        (pid,) = server.worker_pids()
        start = psutil.Process(pid).memory_info().rss
        floors = []
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for _ in range(4):
                for model in ("m1", "m2"):
                    files = {"image": ("c.jpg", IMAGE, "image/jpeg")}
                    assert client.post("/classify", params={"model": model}, files=files).is_success

                def all_unloaded() -> bool:
                    listed = models_of(server)
                    return all(listed[m]["versions"][0]["state"] == "AVAILABLE" for m in MODELS)

                wait_until(all_unloaded, 30, "the idle models to unload", server)
                floors.append(psutil.Process(pid).memory_info().rss)
        assert metric_sum(server.url, "resnet_service_model_unloads", reason="idle") == 8
        # Over the Open Inference Protocol too (tritonclient), a cold model loads and answers.
        port = httpx.get(f"{server.url}/model", params={"model": "m1"}).json()["settings"]
        for client, module in (
            (thttp.InferenceServerClient(f"127.0.0.1:{server.port}"), thttp),
            (tgrpc.InferenceServerClient(f"127.0.0.1:{port['grpc_port']}"), tgrpc),
        ):
            cold = "m3" if module is thttp else "m4"
            assert models_of(server)[cold]["versions"][0]["state"] == "AVAILABLE"
            image = module.InferInput("image", [1], "BYTES")
            image.set_data_from_numpy(np.array([IMAGE], dtype=object))
            wanted = module.InferRequestedOutput("probabilities", class_count=3)
            answer = client.infer(cold, [image], outputs=[wanted])
            assert answer.as_numpy("probabilities").shape == (1, 3)
            assert models_of(server)[cold]["versions"][0]["state"] == "READY"
    growth = [round((floor - floors[0]) / 2**20, 1) for floor in floors[1:]]
    print(
        f"\n[idle TTL] before: {start / 2**20:.1f} MB, after the first cycle "
        f"{floors[0] / 2**20:.1f} MB; after the next three: {growth} MB more"
    )
    # One model's buffers kept would be 65-80 MB; measured -0.2 to +0.8 MB (the goal: 2).
    assert max(growth) <= 4, f"the idle worker kept {max(growth)} MB more over 3 more cycles"


def served_version(body: dict[str, Any]) -> str:
    return str(body["model"]["version"])


def reversed_labels(source: Path, target: Path) -> None:
    """A copy of a built model that names its classes in reverse (its manifest updated)."""
    shutil.copytree(source, target)
    labels = json.loads((target / "labels.json").read_text())
    data = json.dumps(labels[::-1]).encode()
    (target / "labels.json").write_bytes(data)
    manifest = json.loads((target / "artifact.json").read_text())
    manifest["files"]["labels.json"] = hashlib.sha256(data).hexdigest()
    (target / "artifact.json").write_text(json.dumps(manifest))


def test_traffic_split_holds_changes_under_load_and_the_shadow_rule_stops_a_canary(
    tmp_path: Path, artifact: Path, model_cache: Path
) -> None:
    root = tmp_path / "repo"
    for version in (1, 2):
        copy_version(artifact, root, "split", version)
    config = root / "split" / "config.json"
    config.write_text(json.dumps({"traffic": {"1": 90, "2": 10}}))
    copy_version(artifact, root, "canary", 1)
    reversed_labels(artifact, root / "canary" / "2")
    (root / "canary" / "config.json").write_text(
        json.dumps(
            {
                "traffic": {"1": 80, "2": 20},
                "shadow": {"version": 2, "fraction": 1.0, "min_agreement": 0.9, "window": 20},
            }
        )
    )
    extra = ("--workers", "2", "--repository-control", "poll", "--repository-poll", "0.5")
    with serve(tmp_path, *args(root, model_cache, *extra)) as server:
        listed = models_of(server)
        assert {v["state"] for m in ("split", "canary") for v in listed[m]["versions"]} == {"READY"}
        with ClassifyLoad(server.url, served_version, model="split", clients=8) as load:
            wait_until(lambda: load.count() >= 1000, 240, "1,000 answers", server)
            first = load.last(load.count())[:1000]
            # The split changes under load: every request is still answered.
            config.write_text(json.dumps({"traffic": {"1": 50, "2": 50}}))
            wait_until(
                lambda: all(
                    v["traffic_share"] == 0.5 for v in models_of(server)["split"]["versions"]
                ),
                30,
                "the new split",
                server,
            )
            changed_at = time.monotonic()
            wait_until(lambda: len(load.answers.after(changed_at)) >= 400, 120, "400 more", server)
        assert load.answers.failures == []
        share = Counter(first)["2"] / len(first)
        after = Counter(load.answers.after(changed_at))["2"] / len(load.answers.after(changed_at))
        print(f"\n[split] 90/10 over 1,000: version 2 got {share:.1%}; then 50/50: {after:.1%}")
        assert 0.08 <= share <= 0.12
        assert 0.45 <= after <= 0.55
        with httpx.Client(base_url=server.url, timeout=60) as client:  # a request may pin one
            files = {"image": ("c.jpg", IMAGE, "image/jpeg")}
            pinned = client.post(
                "/classify", params={"model": "split", "version": "1"}, files=files
            )
            assert pinned.json()["model"]["version"] == "1"

        # The canary disagrees with version 1 on every image: the rule stops its share.
        # Two clients: a shadow compares only while the primary has nothing queued.
        with ClassifyLoad(server.url, served_version, model="canary", clients=2) as load:
            # Each worker keeps its own shadow; both clients' connections may land on one
            # worker, so the figures are those of a worker that stopped it.
            stopping: dict[str, Any] = {}

            def stopped() -> bool:
                canary = models_of(server)["canary"]
                if canary["shadow"] is None or canary["shadow"]["stopped"] is None:
                    return False
                stopping.update(canary)
                return True

            wait_until(stopped, 120, "the shadow rule to stop the canary", server)
            stopped_at = time.monotonic()
            wait_until(lambda: len(load.answers.after(stopped_at)) >= 400, 120, "400 more", server)
        assert load.answers.failures == []
        canary = stopping
        assert canary["shadow"]["agreement"] < 0.9
        assert next(v["traffic_share"] for v in canary["versions"] if v["version"] == "2") == 0
        # A worker that stopped it sends it nothing; each of the two applies the rule to its own
        # requests (20 a window): 400 answers on, both have.
        assert set(load.last(200)) == {"1"}
        assert metric_sum(server.url, "resnet_service_shadow_compared", result="differed") > 0
