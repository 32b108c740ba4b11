"""``make bench-on-demand``: models on demand, the traffic split and the shadow against issue
33's goals, over real ``serve`` processes on 127.0.0.1 (an OpenVINO int8 ResNet18 on seeded
random weights: load time, memory and speed do not depend on the weights).

- cold: eight copies of the model in a repository whose budget holds about three, one
  worker; the models asked for in turn, twice round, so that every request finds its model
  evicted (least recently used): each first answer's latency (load + warm + classify). Goal:
  at most 1 s.
- split: a 90/10 split over 2,000 requests (2 workers, 8 clients): the canary's share. Goal:
  8-12%.
- shadow: one worker serving model ``plain`` and model ``shadowed`` (the same network, with
  a shadow version taking ``--fraction`` of its requests); interleaved rounds of a 16-client
  closed loop on each (the project's lean load generator). Goals: the primary's p50 within 5%
  of the plain model's, throughput down by no more than the shadowed fraction.

Writes ``bench/on-demand.json``. Every process it starts is stopped by process group.

    python -m resnet_bench.on_demand [--rounds 4] [--seconds 8] [--fraction 0.1] [--out bench]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from resnet_bench import loadgen
from resnet_bench.images import bench_images
from resnet_bench.runner import machine_info
from resnet_bench.servers import python, running
from resnet_service.cpus import usable_cpus

HOST = "127.0.0.1"
BUDGET_MB = 250


def build_model(workdir: Path) -> Path:
    out = workdir / "model"
    subprocess.run(
        [
            python(),
            "-m",
            "resnet_service",
            "quantize",
            "--runtime",
            "openvino",
            "--allow-random-weights",
            "--cache-dir",
            str(workdir / "cache"),
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    return out


def repository(
    workdir: Path, model: Path, versions: dict[str, int], configs: dict[str, Any]
) -> Path:
    root = workdir / f"repo-{len(list(workdir.glob('repo-*')))}"
    for name, count in versions.items():
        for version in range(1, count + 1):
            shutil.copytree(model, root / name / str(version))
        if name in configs:
            (root / name / "config.json").write_text(json.dumps(configs[name]))
    return root


def serve(root: Path, workdir: Path, name: str, *extra: str) -> Any:
    cmd = [
        python(),
        "-m",
        "resnet_service",
        "serve",
        "--repository",
        str(root),
        "--grpc-port",
        "0",
        *extra,
    ]
    env = {"RESNET_SERVICE_MODEL_CACHE_DIR": str(workdir / "cache")}
    return running(cmd, env, "/readyz", workdir / f"{name}.log")


def cold(workdir: Path, model: Path, image: bytes) -> dict[str, Any]:
    names = [f"m{i}" for i in range(1, 9)]
    root = repository(workdir, model, dict.fromkeys(names, 1), {})
    latencies = []
    with serve(root, workdir, "cold", "--workers", "1", "--memory-budget", str(BUDGET_MB)) as srv:
        url = f"http://{HOST}:{srv.port}"
        with httpx.Client(base_url=url, timeout=60) as client:
            for name in names * 2:
                started = time.perf_counter()
                files = {"image": ("i.jpg", image, "image/jpeg")}
                answer = client.post("/classify", params={"model": name}, files=files)
                answer.raise_for_status()
                latencies.append(time.perf_counter() - started)
            warm = []
            for _ in range(20):
                started = time.perf_counter()
                client.post("/classify", params={"model": "m8"}, files=files).raise_for_status()
                warm.append(time.perf_counter() - started)
    ordered = sorted(latencies)
    return {
        "requests": len(latencies),
        "first_answer_ms": {
            "p50": round(statistics.median(ordered) * 1000, 1),
            "max": round(ordered[-1] * 1000, 1),
        },
        "warm_answer_ms_p50": round(statistics.median(warm) * 1000, 1),
        "goal_ms": 1000,
    }


def split(workdir: Path, model: Path, image: bytes, requests: int = 2000) -> dict[str, Any]:
    root = repository(workdir, model, {"m": 2}, {"m": {"traffic": {"1": 90, "2": 10}}})
    versions: Counter[str] = Counter()
    failures = 0

    async def clients(url: str) -> None:
        nonlocal failures
        left = [requests]

        async def one() -> None:
            nonlocal failures
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                while left[0] > 0:
                    left[0] -= 1
                    files = {"image": ("i.jpg", image, "image/jpeg")}
                    r = await client.post("/classify", params={"model": "m"}, files=files)
                    if r.status_code == 200:
                        versions[r.json()["model"]["version"]] += 1
                    else:
                        failures += 1

        await asyncio.gather(*(one() for _ in range(8)))

    with serve(root, workdir, "split", "--workers", "2") as srv:
        asyncio.run(clients(f"http://{HOST}:{srv.port}"))
    return {
        "requests": requests,
        "failures": failures,
        "canary_share": round(versions["2"] / max(1, sum(versions.values())), 4),
        "goal": [0.08, 0.12],
    }


def _shadow_state(port: int) -> dict[str, Any]:
    models = httpx.get(f"http://{HOST}:{port}/models").json()["models"]
    state: dict[str, Any] = {m["name"]: m["shadow"] for m in models}["shadowed"]
    return state


def _median(rows: list[float]) -> float:
    return round(statistics.median(rows), 1)


def shadow(
    workdir: Path, model: Path, image: bytes, fraction: float, rounds: int, seconds: float
) -> dict[str, Any]:
    """Interleaved rounds, each: a 16-client closed loop on ``plain`` then on ``shadowed``
    (throughput at saturation), then an open loop at half the plain capacity on each (the
    primary's p50 where a shadow has room to run)."""
    config = {"shadowed": {"shadow": {"version": 2, "fraction": fraction}}}
    root = repository(workdir, model, {"plain": 1, "shadowed": 2}, config)
    names = ("plain", "shadowed")
    rps: dict[str, list[float]] = {name: [] for name in names}
    p50: dict[str, list[float]] = {name: [] for name in names}
    compared: dict[str, int] = {"saturated": 0, "half": 0}
    with serve(root, workdir, "shadow", "--workers", "1") as srv:
        payloads = {
            name: loadgen.multipart_request(
                HOST, srv.port, f"/classify?model={name}", "image", "i.jpg", image, "image/jpeg"
            )
            for name in names
        }
        for _ in range(rounds):
            for name in names:
                before = _shadow_state(srv.port)["compared"]
                result = asyncio.run(
                    loadgen.closed_loop(HOST, srv.port, payloads[name], 16, seconds)
                )
                if result.errors:
                    raise RuntimeError(f"{name}: {result.summary()}")
                rps[name].append(result.ok / result.elapsed_s)
                compared["saturated"] += _shadow_state(srv.port)["compared"] - before
            rate = statistics.median(rps["plain"]) / 2
            for name in names:
                before = _shadow_state(srv.port)["compared"]
                result = asyncio.run(
                    loadgen.open_loop(HOST, srv.port, payloads[name], rate, seconds)
                )
                median = result.percentile_ms(50)
                if median is None or result.errors:
                    raise RuntimeError(f"{name}: {result.summary()}")
                p50[name].append(median)
                compared["half"] += _shadow_state(srv.port)["compared"] - before
        state = _shadow_state(srv.port)
    return {
        "fraction": fraction,
        "rounds": rounds,
        "saturated_rps": {name: _median(rows) for name, rows in rps.items()},
        "throughput_cost": round(
            1 - statistics.median(rps["shadowed"]) / statistics.median(rps["plain"]), 4
        ),
        "half_load_p50_ms": {name: _median(rows) for name, rows in p50.items()},
        "p50_delay": round(
            statistics.median(p50["shadowed"]) / statistics.median(p50["plain"]) - 1, 4
        ),
        "compared": compared,
        "skipped": state["skipped"],
        "goals": {"p50_delay_at_most": 0.05, "throughput_cost_at_most": fraction},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=Path("bench"))
    options = parser.parse_args()
    image = bench_images(["jpeg-500x375"])["jpeg-500x375"].data
    with tempfile.TemporaryDirectory(prefix="on-demand-") as tmp:
        workdir = Path(tmp)
        model = build_model(workdir)
        report = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine_info(usable_cpus()),
            "cold": cold(workdir, model, image),
            "split": split(workdir, model, image),
            "shadow": shadow(
                workdir, model, image, options.fraction, options.rounds, options.seconds
            ),
        }
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "on-demand.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
