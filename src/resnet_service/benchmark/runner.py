"""``resnet-service bench``: everything measured in one run, reported as ratios.

1. Engine ceiling, no HTTP: decode + preprocess + int8 forward in independent processes (one
   per core, and one process using every core), and the service's own core in-process.
2. The service over HTTP on 127.0.0.1 (a real uvicorn process) in both process layouts:
   closed loop at concurrency 1, 4, 16, 64, an open loop near capacity, other image sizes.
3. The naive tutorial baseline (Flask dev server, upload saved to disk, fp32 + dynamic
   quantization of Linear), driven the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from resnet_service import __version__
from resnet_service.benchmark import ceiling, loadgen
from resnet_service.benchmark.images import BenchImage, bench_images
from resnet_service.benchmark.report import render_chart, render_table
from resnet_service.benchmark.servers import memory_mb, python, running
from resnet_service.config import Settings
from resnet_service.cpus import resolve_workers, usable_cpus
from resnet_service.serve import settings_as_env

log = logging.getLogger(__name__)

MAIN_IMAGE = "jpeg-500x375"
#: Load is bounded in time (the level's duration) and in count.
MAX_REQUESTS_PER_LEVEL = 20_000
GOALS = {
    "service_over_ceiling_c16": ("≥", 0.85),
    "service_over_naive_throughput_c16": ("≥", 5.0),
    "p99_c16_over_p50_c1": ("≤", 3.0),
}


@dataclass(frozen=True)
class BenchOptions:
    out_dir: Path
    quick: bool = False
    skip_naive: bool = False

    @property
    def duration(self) -> float:
        return 0.5 if self.quick else 8.0

    @property
    def concurrencies(self) -> list[int]:
        return [1, 2] if self.quick else [1, 4, 16, 64]

    @property
    def c16(self) -> int:
        return 2 if self.quick else 16


def machine_info(threads: int) -> dict[str, Any]:
    import fastapi
    import PIL
    import torch
    import torchvision

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "usable_cpus": usable_cpus(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "resnet_service": __version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "pillow": PIL.__version__,
            "fastapi": fastapi.__version__,
        },
    }


def _load(
    host: str,
    port: int,
    path: str,
    field: str,
    image: BenchImage,
    concurrency: int,
    duration: float,
) -> dict[str, Any]:
    payload = loadgen.multipart_request(
        host,
        port,
        path,
        field,
        f"{image.name}.{image.content_type.split('/')[1]}",
        image.data,
        image.content_type,
    )
    result = asyncio.run(
        loadgen.closed_loop(host, port, payload, concurrency, duration, MAX_REQUESTS_PER_LEVEL)
    )
    return {**result.summary(), "image": image.name}


def _open_loop(port: int, image: BenchImage, rate: float, duration: float) -> dict[str, Any]:
    payload = loadgen.multipart_request(
        "127.0.0.1", port, "/classify", "image", "p.jpg", image.data, image.content_type
    )
    result = asyncio.run(loadgen.open_loop("127.0.0.1", port, payload, rate, duration))
    return {**result.summary(), "image": image.name}


def bench_service(
    settings: Settings,
    workers: int,
    images: dict[str, BenchImage],
    opts: BenchOptions,
    workdir: Path,
) -> dict[str, Any]:
    """One process layout of the service over HTTP."""
    cpus = usable_cpus()
    threads = max(1, cpus // workers)
    layout = settings.model_copy(update={"workers": workers, "torch_threads": threads})
    env = settings_as_env(layout)
    cmd = [python(), "-m", "resnet_service", "serve", "--workers", str(workers)]
    log.info("service: %d worker(s) x %d torch thread(s)", workers, threads)
    with running(
        cmd, env, "/readyz", workdir / f"service-w{workers}.log", ready_count=4 * workers
    ) as srv:
        main = images[MAIN_IMAGE]
        closed = [
            _load("127.0.0.1", srv.port, "/classify", "image", main, c, opts.duration)
            for c in opts.concurrencies
        ]
        c16 = next(r for r in closed if r["concurrency"] == opts.c16)
        rate = max(1.0, round(0.8 * c16["rps"], 1))
        open_loop = _open_loop(srv.port, main, rate, opts.duration)
        others = [
            _load("127.0.0.1", srv.port, "/classify", "image", img, opts.c16, opts.duration)
            for name, img in images.items()
            if name != MAIN_IMAGE
        ]
        memory = memory_mb(srv.process.pid)
    return {
        "workers": workers,
        "torch_threads": threads,
        "layout": f"{workers} worker process(es) x {threads} torch thread(s)",
        "closed_loop": closed,
        "open_loop": open_loop,
        "other_images": others,
        "memory": memory,
    }


def bench_naive(
    settings: Settings, images: dict[str, BenchImage], opts: BenchOptions, workdir: Path
) -> dict[str, Any]:
    """The tutorial design, same weights, same load."""
    env = {}
    if settings.weights_path is not None:
        env["NAIVE_WEIGHTS"] = str(settings.weights_path)
    cmd = [python(), "-m", "resnet_service.benchmark.naive_app"]
    log.info("naive baseline: Flask dev server, fp32 + dynamic Linear quantization")
    with running(cmd, env, "/health", workdir / "naive.log") as srv:
        main = images[MAIN_IMAGE]
        closed = [
            _load("127.0.0.1", srv.port, "/predict", "file", main, c, opts.duration)
            for c in opts.concurrencies
        ]
        memory = memory_mb(srv.process.pid)
    return {
        "layout": "Flask dev server (threaded), 1 process",
        "closed_loop": closed,
        "memory": memory,
    }


def _at(rows: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    return next(r for r in rows if r["concurrency"] == concurrency)


def compute_ratios(result: dict[str, Any], opts: BenchOptions) -> dict[str, Any]:
    c = opts.c16
    service = result["service"][result["service_default_layout"]]
    svc16, svc1 = _at(service["closed_loop"], c), _at(service["closed_loop"], 1)
    best_ceiling = max(result["ceiling"]["layouts"], key=lambda r: r["images_per_s"])
    engine16 = _at(result["ceiling"]["engine_in_process"], c)
    engine1 = _at(result["ceiling"]["engine_in_process"], 1)
    fwd = result["forward_ms_per_image"]
    # The load generator runs on the same cores as the server (the ceiling has no client):
    # its CPU share of the machine, to read the service/ceiling ratio against.
    client_share = svc16["client_cpu_s"] / (svc16["elapsed_s"] * usable_cpus())
    ratios: dict[str, Any] = {
        "concurrency_for_c16_figures": c,
        "service_over_ceiling_c16": round(svc16["rps"] / best_ceiling["images_per_s"], 3),
        "load_generator_cpu_share_c16": round(client_share, 3),
        "service_over_ceiling_c16_client_cpu_excluded": round(
            svc16["rps"] / (best_ceiling["images_per_s"] * (1 - client_share)), 3
        ),
        "service_over_engine_in_process_rps_c16": round(svc16["rps"] / engine16["rps"], 3),
        "service_over_engine_in_process_rps_c1": round(svc1["rps"] / engine1["rps"], 3),
        "service_over_engine_in_process_p50_c1": round(svc1["p50_ms"] / engine1["p50_ms"], 3),
        "service_over_engine_in_process_p99_c16": round(svc16["p99_ms"] / engine16["p99_ms"], 3),
        "p99_c16_over_p50_c1": round(svc16["p99_ms"] / svc1["p50_ms"], 3),
        # Little's law: with c clients and throughput X, mean latency is c/X, so p99 at c=16
        # can't be below 16/X. These two show how far the tail is from that floor.
        "littles_law_floor_c16_ms": round(c / svc16["rps"] * 1000, 2),
        "p99_c16_over_littles_law_floor": round(svc16["p99_ms"] / (c / svc16["rps"] * 1000), 3),
        "p99_c16_over_p50_c16": round(svc16["p99_ms"] / svc16["p50_ms"], 3),
        "int8_over_fp32_forward_speed_batch_1": round(
            fwd["fp32"]["batch_1"] / fwd["int8"]["batch_1"], 2
        ),
        "int8_over_fp32_forward_speed_batch_8": round(
            fwd["fp32"]["batch_8"] / fwd["int8"]["batch_8"], 2
        ),
        "int8_over_fp32_ceiling_throughput": round(
            result["ceiling"]["best_layout_int8_images_per_s"]
            / result["ceiling"]["best_layout_fp32_images_per_s"],
            2,
        ),
        "service_peak_rss_mb": service["memory"]["peak_rss_mb"],
    }
    if "naive" in result:
        naive16 = _at(result["naive"]["closed_loop"], c)
        naive1 = _at(result["naive"]["closed_loop"], 1)
        ratios["service_over_naive_throughput_c16"] = round(
            svc16["rps"] / max(naive16["rps"], 1e-9), 2
        )
        ratios["naive_over_service_p99_c16"] = round(naive16["p99_ms"] / svc16["p99_ms"], 2)
        ratios["naive_over_service_p50_c1"] = round(naive1["p50_ms"] / svc1["p50_ms"], 2)
        ratios["naive_peak_rss_mb"] = result["naive"]["memory"]["peak_rss_mb"]
    ratios["goals"] = {
        name: {
            "goal": f"{op} {target}",
            "value": ratios.get(name),
            "met": None
            if name not in ratios
            else (ratios[name] >= target if op == "≥" else ratios[name] <= target),
        }
        for name, (op, target) in GOALS.items()
    }
    return ratios


def run_benchmark(settings: Settings, opts: BenchOptions) -> dict[str, Any]:
    """Run every stage; write ``bench.json`` and ``bench.png`` under ``opts.out_dir``."""
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="resnet-bench-"))
    cpus = usable_cpus()
    images = bench_images([MAIN_IMAGE] if opts.quick else None)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": opts.quick,
        "machine": machine_info(cpus),
        "images": {k: {"bytes": len(v.data), "size": list(v.size)} for k, v in images.items()},
    }
    log.info("model forward speed (int8 vs fp32)")
    result["forward_ms_per_image"] = ceiling.forward_speed(
        settings, cpus, seconds=0.5 if opts.quick else 2.0
    )
    from resnet_service.model.loader import load_model

    result["weights"] = {
        "source": (info := load_model(settings).info).weights_source.value,
        "random_weights": info.random_weights,
        "note": "speed does not depend on the weights' values",
    }
    result["decode_ms"] = ceiling.decode_speed(
        {k: v.data for k, v in images.items()}, seconds=0.3 if opts.quick else 1.0
    )
    log.info("engine ceiling (no HTTP)")
    main = images[MAIN_IMAGE].data
    layouts = [ceiling.process_ceiling(settings, main, cpus, 1, opts.duration)]
    if cpus > 1:
        layouts.append(ceiling.process_ceiling(settings, main, 1, cpus, opts.duration))
    best = max(layouts, key=lambda r: r["images_per_s"])
    fp32 = ceiling.process_ceiling(
        settings.model_copy(update={"precision": "fp32"}),
        main,
        best["processes"],
        best["threads"],
        opts.duration,
    )
    per_size = {
        name: ceiling.process_ceiling(
            settings, img.data, best["processes"], best["threads"], opts.duration
        )["images_per_s"]
        for name, img in images.items()
    }
    engine_settings = settings.model_copy(update={"torch_threads": cpus})
    result["ceiling"] = {
        "image": MAIN_IMAGE,
        "layouts": layouts,
        "best_layout": best["layout"],
        "best_layout_int8_images_per_s": best["images_per_s"],
        "best_layout_fp32_images_per_s": fp32["images_per_s"],
        "best_layout_images_per_s_by_image": per_size,
        "engine_in_process": ceiling.engine_in_process(
            engine_settings, main, sorted({1, opts.c16}), opts.duration
        ),
    }
    result["service"] = {}
    for workers in [resolve_workers(0)] if opts.quick else sorted({1, cpus}):
        result["service"][f"workers_{workers}"] = bench_service(
            settings, workers, images, opts, workdir
        )
    result["service_default_layout"] = max(
        result["service"],
        key=lambda k: _at(result["service"][k]["closed_loop"], opts.c16)["rps"],
    )
    if not opts.skip_naive:
        result["naive"] = bench_naive(settings, images, opts, workdir)
    result["ratios"] = compute_ratios(result, opts)
    result["seconds"] = round(time.perf_counter() - started, 1)
    (opts.out_dir / "bench.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    render_chart(result, opts.out_dir / "bench.png")
    print(render_table(result))
    return result
