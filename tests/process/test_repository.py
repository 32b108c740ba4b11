"""The model repository over real ``serve`` processes: several models in one replica, a new
version rolled in under load with nothing lost (poll and explicit modes, two workers), a broken
version refused with its reason while the old one serves, tritonclient driving the repository
extension over HTTP and gRPC, and each model's memory.

The models: one OpenVINO int8 artifact built from the test weights (``quantize --out``, the
ImageNet head), copied as versions; and two bundles in ``finetune``'s format with heads of
their own (3 and 4 labels), built by the workers' child builds.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from tests.harness import Server, jpeg_of, serve, wait_until, write_test_bundle

pytestmark = pytest.mark.slow
ADMIN = "admin-secret"
SHAPES = ["circle", "square", "triangle"]
COLOURS = ["red", "green", "blue", "yellow"]
IMAGE = jpeg_of("chelsea", (320, 240))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, weights_file: Path, model_cache: Path) -> Path:
    """The OpenVINO int8 model of the test weights, built once by ``quantize --out``."""
    out = tmp_path_factory.mktemp("artifact") / "imagenet-int8"
    subprocess.run(
        [
            sys.executable, "-m", "resnet_service", "quantize", "--runtime", "openvino",
            "--weights", str(weights_file), "--cache-dir", str(model_cache), "--offline",
            "--out", str(out),
        ],
        check=True,
        capture_output=True,
    )
    return out


def publish(model_dir: Path, version: int, source: Path) -> Path:
    """A version written under a temporary name, then renamed into place (what poll expects)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".{version}.tmp"
    shutil.copytree(source, staging)
    final = model_dir / str(version)
    os.rename(staging, final)
    return final


def classify(client: httpx.Client, model: str | None = None, **params: str) -> httpx.Response:
    query = {**({"model": model} if model else {}), **params}
    return client.post("/classify", params=query, files={"image": ("c.jpg", IMAGE, "image/jpeg")})


def models_of(server: Server) -> dict[str, Any]:
    return {m["name"]: m for m in httpx.get(f"{server.url}/models").json()["models"]}


def repo_args(repository: Path, cache: Path, *extra: str) -> tuple[str, ...]:
    return ("--repository", str(repository), "--cache-dir", str(cache), "--offline", *extra)


# --- load that records who answered ---------------------------------------------------------
@dataclass
class Answers:
    versions: list[tuple[float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def after(self, t: float) -> list[str]:
        return [v for when, v in self.versions if when >= t]


async def _client_loop(url: str, model: str, answers: Answers, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while not stop.is_set():
            files = {"image": ("c.jpg", IMAGE, "image/jpeg")}
            try:
                r = await client.post("/classify", params={"model": model}, files=files)
            except httpx.HTTPError as exc:
                answers.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            if r.status_code != 200:
                answers.failures.append(f"{r.status_code}: {r.text[:200]}")
                continue
            body = r.json()
            answers.versions.append((time.monotonic(), body["model"]["version"]))


class Load:
    """``clients`` closed-loop clients on one model in a thread of their own, until stopped."""

    def __init__(self, url: str, model: str, clients: int = 16) -> None:
        self.url, self.model, self.clients = url, model, clients
        self.answers = Answers()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(_client_loop(self.url, self.model, self.answers, stop))
            for _ in range(self.clients)
        ]
        await asyncio.to_thread(self._halt.wait)
        stop.set()
        await asyncio.gather(*tasks)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self._thread.join(60)

    def count(self) -> int:
        return len(self.answers.versions)

    def last(self, n: int) -> list[str]:
        return [v for _, v in self.answers.versions[-n:]]


def worker_rss(server: Server) -> dict[int, int]:
    return {pid: psutil.Process(pid).memory_info().rss for pid in server.worker_pids()}


# --- several models -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_models(tmp_path_factory: pytest.TempPathFactory, artifact: Path) -> Path:
    root = tmp_path_factory.mktemp("repo-three")
    publish(root / "imagenet", 1, artifact)
    for name, labels, seed in (("shapes", SHAPES, 1), ("colours", COLOURS, 2)):
        staging = tmp_path_factory.mktemp(f"bundle-{name}") / "bundle"
        publish(root / name, 1, write_test_bundle(staging, labels, name=f"{name}-bundle", seed=seed))
        config = {"precision": "fp32"}
        if name == "colours":
            config["display_names"] = {"red": "Red (a colour)"}  # type: ignore[assignment]
        (root / name / "config.json").write_text(json.dumps(config))
    return root


def test_three_models_each_answer_with_their_own_labels(
    tmp_path: Path, three_models: Path, model_cache: Path
) -> None:
    args = repo_args(three_models, model_cache, "--default-model", "imagenet")
    with serve(tmp_path, *args) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        listed = models_of(server)
        assert sorted(listed) == ["colours", "imagenet", "shapes"]
        for model in listed.values():
            (only,) = model["versions"]
            assert (only["version"], only["state"], only["serving"]) == ("1", "READY", True)
        default = classify(c).json()
        assert default["model"]["name"] == "imagenet" and default["model"]["version"] == "1"
        assert c.get("/model").json()["num_classes"] == 1000
        shapes = classify(c, "shapes", top_k="3").json()
        assert {p["label"] for p in shapes["predictions"]} == set(SHAPES)
        assert shapes["model"] == {**shapes["model"], "name": "shapes", "precision": "fp32"}
        colours = classify(c, "colours", top_k="4").json()
        assert {p["label"] for p in colours["predictions"]} == {"Red (a colour)", *COLOURS[1:]}
        assert c.get("/model", params={"model": "colours"}).json()["labels"][0] == "Red (a colour)"

        unknown = classify(c, "nope")
        assert unknown.status_code == 404
        assert "No model named 'nope'" in unknown.json()["detail"]
        assert "'shapes'" in unknown.json()["detail"]
        wrong_version = classify(c, "shapes", version="7")
        assert wrong_version.status_code == 404
        assert "has no version '7'" in wrong_version.json()["detail"]

        # OIP: every model by path, its own outputs; the control routes are off (no token).
        meta = c.get("/v2/models/colours").json()
        assert meta["versions"] == ["1"] and meta["outputs"][0]["shape"] == [-1, 4]
        assert c.get("/v2/models/nope").status_code == 404
        off = c.post("/v2/repository/index")
        assert off.status_code == 403 and "ADMIN_TOKEN" in off.json()["error"]

        # Per-model series from the repository's names only; a request's unknown name adds none.
        text = c.get("/metrics").text
        for name in ("imagenet", "shapes", "colours"):
            assert f'resnet_service_batch_size_count{{model="{name}",version="1"}}' in text
        assert 'model="nope"' not in text


# --- rolling a version in -------------------------------------------------------------------
def truncated_copy(source: Path, into: Path) -> Path:
    """An artifact whose weights file lost its second half (an interrupted copy)."""
    shutil.copytree(source, into)
    weights = into / "model.bin"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return into


def test_poll_rolls_in_a_new_version_under_load_and_refuses_a_broken_one(
    tmp_path: Path, artifact: Path, model_cache: Path
) -> None:
    root = tmp_path / "repo"
    publish(root / "imagenet", 1, artifact)
    args = repo_args(root, model_cache, "--repository-control", "poll", "--repository-poll", "0.3")
    with serve(tmp_path, *args, "--workers", "2") as server, Load(server.url, "imagenet") as load:
        wait_until(lambda: load.count() >= 50, 60, "answers from version 1", server)
        published = time.monotonic()
        publish(root / "imagenet", 2, artifact)
        wait_until(lambda: load.last(40) == ["2"] * 40, 120, "only version 2 answering", server)
        switched = time.monotonic()
        # A broken version 3: refused with its reason, version 2 keeps serving.
        broken = truncated_copy(artifact, root / "imagenet" / ".3.tmp")
        os.rename(broken, root / "imagenet" / "3")

        def refused() -> bool:
            versions = models_of(server)["imagenet"]["versions"]
            return any(v["version"] == "3" and v["state"] == "UNAVAILABLE" for v in versions)

        wait_until(refused, 60, "version 3 refused", server)
        versions_now = {v["version"]: v for v in models_of(server)["imagenet"]["versions"]}
        assert "sha256" in versions_now["3"]["reason"]  # corrupt: the reason says so
        assert versions_now["2"]["serving"] and versions_now["2"]["state"] == "READY"
        served_after = load.count()
        wait_until(lambda: load.count() >= served_after + 50, 60, "answers after v3", server)
    answers = load.answers
    assert answers.failures == []
    versions = [v for _, v in answers.versions]
    assert set(versions) == {"1", "2"}
    last_v1 = max(t for t, v in answers.versions if v == "1")
    assert all(v == "2" for t, v in answers.versions if t > last_v1)
    print(
        f"\npoll switch-over (2 workers): first v2 answer {first(answers, '2') - published:.2f} s "
        f"after the rename, last v1 answer {last_v1 - published:.2f} s, "
        f"{len(versions)} answers, 0 failed; settled {switched - published:.2f} s"
    )


def first(answers: Answers, version: str) -> float:
    return min(t for t, v in answers.versions if v == version)
