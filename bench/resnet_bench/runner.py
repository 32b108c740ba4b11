"""``resnet-service bench``: everything measured in one run, reported as ratios.

1. Model forward speed, ms per image at batch 1 and 8, per runtime and precision.
2. Engine ceiling, no HTTP: decode + preprocess + forward in independent processes (one per
   core, and one process using every core), per runtime; and the service's core in-process.
3. The service over HTTP on 127.0.0.1 (real ``serve`` processes), per runtime in the default
   process layout: closed loop at 1, 16 and 64 clients, an open loop near capacity, cold
   start with a warm cache, peak RSS of the whole serving tree, requests per worker; and, for
   the default runtime, both process layouts and larger images.
4. Fidelity of each int8 runtime on a really trained model (digits, fine-tuned here).
5. The naive tutorial baseline (Flask dev server, upload saved to disk, fp32 + dynamic
   quantization of Linear), driven the same way.
The default runtime is the fastest service at 16 clients among those meeting the fidelity
bar, by the median of interleaved rounds with every runtime's server up at once; the default
layout the faster of the two layouts, chosen the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import httpx

from resnet_bench import ceiling, loadgen
from resnet_bench.fidelity import Fidelity, digits_fidelity
from resnet_bench.images import BenchImage, bench_images
from resnet_bench.loadgen import LoadSummary
from resnet_bench.ratios import compute_ratios
from resnet_bench.report import render_chart, render_table
from resnet_bench.results import (
    BenchResult,
    CacheRun,
    ImageInfo,
    InterleavedRounds,
    Measurements,
    NaiveRun,
    ServiceRun,
)
from resnet_bench.servers import Running, python, running, tree_memory
from resnet_service import __version__
from resnet_service.config import RUNTIMES, RuntimeName, Settings
from resnet_service.cpus import usable_cpus
from resnet_service.model.hub import FP32_URL, hub_checkpoint_path
from resnet_service.server.launch import settings_as_env

log = logging.getLogger(__name__)

MAIN_IMAGE: Final = "jpeg-500x375"
#: Load is bounded in time (the level's duration) and in count.
MAX_REQUESTS_PER_LEVEL: Final = 20_000
#: A runtime serves by default only if its int8 model, measured on this host, agrees with
#: torch fp32 this often and loses at most this much accuracy (the fidelity issue's goals).
FIDELITY_BAR: Final = 0.99
MAX_ACCURACY_DROP: Final = 0.015
#: Interleaved rounds at 16 clients that choose the default runtime (full bench only).
CHOICE_ROUNDS: Final = 3


@dataclass(frozen=True)
class BenchOptions:
    out_dir: Path
    quick: bool = False
    skip_naive: bool = False
    runtimes: tuple[RuntimeName, ...] = RUNTIMES

    @property
    def duration(self) -> float:
        return 0.5 if self.quick else 8.0

    @property
    def concurrencies(self) -> list[int]:
        return [1, 2] if self.quick else [1, 16, 64]

    @property
    def c16(self) -> int:
        return 2 if self.quick else 16


def speed_settings(settings: Settings) -> Settings:
    """``settings`` for measuring speed, which does not depend on the weights' values: seeded
    random weights when no weights are on disk, so the harness runs anywhere, even offline."""
    if settings.weights_path is not None or settings.bundle_path is not None:
        return settings
    settings = settings.model_copy(update={"allow_random_weights": True})
    if hub_checkpoint_path(FP32_URL).is_file():
        return settings
    # Without this every start's preflight would import torch to try a download first, and
    # cold start would measure that, not a deployment (whose weights are on disk, found
    # without torch).
    return settings.model_copy(update={"allow_downloads": False})


def machine_info(threads: int) -> dict[str, Any]:
    import importlib.metadata as md

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"resnet_service": __version__}
    for dist in ("torch", "torchvision", "openvino", "onnxruntime", "pillow", "fastapi", "uvicorn"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = "absent"
    return {
        "cpu": cpu,
        "usable_cpus": usable_cpus(),
        "logical_cpus": os.cpu_count(),
        "inference_threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def serving(
    settings: Settings, workers: int, log_file: Path, **update: object
) -> AbstractContextManager[Running]:
    """``serve`` with ``workers`` processes of (usable CPUs / workers) inference threads each
    and ``update`` over ``settings``, until its /readyz answers; stopped after."""
    layout = settings.model_copy(
        update={"workers": workers, "inference_threads": max(1, usable_cpus() // workers), **update}
    )
    cmd = [python(), "-m", "resnet_service", "serve", "--workers", str(workers)]
    return running(cmd, settings_as_env(layout), "/readyz", log_file)


def _payload(port: int, path: str, field: str, image: BenchImage) -> bytes:
    name = f"{image.name}.{image.content_type.split('/')[1]}"
    return loadgen.multipart_request(
        "127.0.0.1", port, path, field, name, image.data, image.content_type
    )


def closed_loop_load(
    port: int, path: str, field: str, image: BenchImage, c: int, s: float
) -> LoadSummary:
    payload = _payload(port, path, field, image)
    result = asyncio.run(
        loadgen.closed_loop("127.0.0.1", port, payload, c, s, MAX_REQUESTS_PER_LEVEL)
    )
    return LoadSummary.of(result, image=image.name)


def _open_loop(port: int, image: BenchImage, rate: float, duration: float) -> LoadSummary:
    payload = _payload(port, "/classify", "image", image)
    result = asyncio.run(loadgen.open_loop("127.0.0.1", port, payload, rate, duration))
    return LoadSummary.of(result, image=image.name)


def _burst(port: int, image: BenchImage, count: int) -> LoadSummary:
    """``count`` simultaneous single-image requests on an idle replica."""
    payload = _payload(port, "/classify", "image", image)
    result = asyncio.run(loadgen.burst("127.0.0.1", port, payload, count))
    return LoadSummary.of(result, image=image.name)


def distinct_payloads(port: int, image: BenchImage, count: int) -> list[bytes]:
    """``count`` requests whose bytes all differ (a tag after the JPEG's end marker, which
    decoders ignore) at the same decode cost: every one a response-cache miss."""
    return [
        _payload(port, "/classify", "image", replace(image, data=image.data + i.to_bytes(4)))
        for i in range(count)
    ]


#: Distinct images cycled by the cache-miss load: far more than a 1 MB cache holds (~240).
_MISS_IMAGES: Final = 1024


def bench_cache(
    settings: Settings,
    runtime: RuntimeName,
    workers: int,
    image: BenchImage,
    opts: BenchOptions,
    workdir: Path,
) -> CacheRun:
    """The response cache at ``c16``: one repeated image (hits), and distinct images (misses),
    on a replica with a 1 MB cache, against the same distinct images with the cache off."""
    distinct: dict[str, LoadSummary] = {}
    repeated: LoadSummary | None = None
    for label, cache_mb in (("off", 0.0), ("on", 1.0)):
        log_file = workdir / f"cache-{label}.log"
        with serving(
            settings, workers, log_file, runtime=runtime, response_cache_mb=cache_mb
        ) as srv:
            misses = distinct_payloads(srv.port, image, _MISS_IMAGES)
            result = asyncio.run(
                loadgen.closed_loop(
                    "127.0.0.1", srv.port, misses, opts.c16, opts.duration, MAX_REQUESTS_PER_LEVEL
                )
            )
            distinct[label] = LoadSummary.of(result)
            if cache_mb:
                repeated = closed_loop_load(
                    srv.port, "/classify", "image", image, opts.c16, opts.duration
                )
    assert repeated is not None  # the "on" replica ran it
    return CacheRun(distinct["off"], distinct["on"], repeated)


def _oip_load(port: int, image: BenchImage, c: int, s: float) -> LoadSummary:
    """The same image through the Open Inference Protocol's REST infer (binary tensor)."""
    model = httpx.get(f"http://127.0.0.1:{port}/model", timeout=10).json()["name"]
    payload = loadgen.oip_request("127.0.0.1", port, model, image.data)
    result = asyncio.run(
        loadgen.closed_loop("127.0.0.1", port, payload, c, s, MAX_REQUESTS_PER_LEVEL)
    )
    return LoadSummary.of(result, image=image.name, route="/v2/models/{name}/infer")


def _per_worker_requests(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        s.labels["worker"]: s.value
        for fam in text_string_to_metric_families(text)
        if fam.name == "resnet_service_worker_requests"
        for s in fam.samples
        if s.name.endswith("_total")
    }


def bench_service(
    settings: Settings,
    runtime: RuntimeName,
    workers: int,
    images: dict[str, BenchImage],
    opts: BenchOptions,
    workdir: Path,
    *,
    full: bool,
) -> ServiceRun:
    """One runtime in one process layout, over HTTP. ``full`` adds the other images."""
    threads = max(1, usable_cpus() // workers)
    log.info("service: %s, %d worker(s) x %d thread(s)", runtime, workers, threads)
    started = time.perf_counter()
    log_file = workdir / f"service-{runtime}-w{workers}.log"
    with serving(settings, workers, log_file, runtime=runtime) as srv:
        cold_start = time.perf_counter() - started
        main = images[MAIN_IMAGE]
        burst = _burst(srv.port, main, 64 if not opts.quick else 8)
        closed = [
            closed_loop_load(srv.port, "/classify", "image", main, c, opts.duration)
            for c in opts.concurrencies
        ]
        rate = max(1.0, round(0.8 * loadgen.at(closed, opts.c16).rps, 1))
        open_loop = _open_loop(srv.port, main, rate, opts.duration)
        others = (
            tuple(
                closed_loop_load(srv.port, "/classify", "image", img, opts.c16, opts.duration)
                for name, img in images.items()
                if name != MAIN_IMAGE
            )
            if full
            else ()
        )
        oip = _oip_load(srv.port, main, opts.c16, opts.duration) if full else None
        per_worker = _per_worker_requests(srv.port)
        memory = tree_memory(srv.process.pid)
    return ServiceRun(
        runtime=runtime,
        workers=workers,
        inference_threads=threads,
        layout=f"{runtime}, {workers} worker(s) x {threads} thread(s)",
        cold_start_s=round(cold_start, 2),
        burst=burst,
        closed_loop=tuple(closed),
        open_loop=open_loop,
        other_images=others,
        oip_v2_rest=oip,
        requests_per_worker=per_worker,
        memory=memory,
    )


def bench_naive(
    settings: Settings, images: dict[str, BenchImage], opts: BenchOptions, workdir: Path
) -> NaiveRun:
    """The tutorial design, same weights, same load."""
    env = {}
    if settings.weights_path is not None:
        env["NAIVE_WEIGHTS"] = str(settings.weights_path)
    cmd = [python(), "-m", "resnet_bench.naive_app"]
    log.info("naive baseline: Flask dev server, fp32 + dynamic Linear quantization")
    with running(cmd, env, "/health", workdir / "naive.log") as srv:
        main = images[MAIN_IMAGE]
        closed = tuple(
            closed_loop_load(srv.port, "/predict", "file", main, c, opts.duration)
            for c in opts.concurrencies
        )
        memory = tree_memory(srv.process.pid)
    return NaiveRun("Flask dev server (threaded), 1 process", closed, memory)


def interleaved_rounds(
    settings: Settings,
    configs: dict[str, tuple[RuntimeName, int]],
    image: BenchImage,
    opts: BenchOptions,
    workdir: Path,
) -> InterleavedRounds:
    """The service at 16 clients in each configuration (name: runtime, workers), all running
    at once (idle ones cost no CPU) and measured in interleaved rounds, A B C A B C ..., so
    that a noisy neighbour hurts each alike. One sample each, minutes apart, once put a
    runtime with half the forward time level with torch on this shared host."""
    rps: dict[str, list[float]] = {name: [] for name in configs}
    with ExitStack() as stack:
        servers = {}
        for name, (rt, workers) in configs.items():
            log.info("interleaved rounds: starting %s", name)
            log_file = workdir / f"rounds-{name}.log"
            # Several servers at once: gRPC on any free port.
            servers[name] = stack.enter_context(
                serving(settings, workers, log_file, runtime=rt, grpc_port=0)
            )
        for i in range(CHOICE_ROUNDS):
            for name, srv in servers.items():
                log.info("interleaved rounds: round %d, %s", i + 1, name)
                row = closed_loop_load(srv.port, "/classify", "image", image, opts.c16, 8.0)
                rps[name].append(row.rps)
    return InterleavedRounds(
        concurrency=opts.c16,
        rounds=CHOICE_ROUNDS,
        rps=rps,
        median_rps={name: statistics.median(v) for name, v in rps.items()},
    )


def sample_rps(services: Mapping[str, ServiceRun], concurrency: int) -> dict[str, float]:
    """Each service's one sample of requests/s at ``concurrency``."""
    return {name: svc.at(concurrency).rps for name, svc in services.items()}


def choose_layout(samples: Mapping[str, float], choice: InterleavedRounds | None) -> str:
    """The faster process layout of the default runtime at 16 clients (``samples``: layout
    -> req/s): by the interleaved rounds' medians when they ran, else by the one sample each."""

    def speed(name: str) -> float:
        if choice is not None:
            return float(choice.median_rps[name])
        return float(samples[name])

    return max(samples, key=speed)


def eligible_runtimes(
    measured: Iterable[str], fidelity: Fidelity | None, opts: BenchOptions
) -> list[RuntimeName]:
    """The ``measured`` runtimes whose int8 model meets the fidelity bar (torch's own int8
    path is the reference the others are held to when no fidelity ran)."""
    agreement = {} if fidelity is None else fidelity.runtimes
    measured = set(measured)
    return [
        rt
        for rt in opts.runtimes
        if rt in measured
        if rt not in agreement or agreement[rt].meets(FIDELITY_BAR, MAX_ACCURACY_DROP)
    ]


def choose_default(
    samples: Mapping[str, float],
    fidelity: Fidelity | None,
    choice: InterleavedRounds | None,
    opts: BenchOptions,
) -> RuntimeName:
    """The fastest eligible runtime at 16 clients (``samples``: runtime -> req/s): by the
    interleaved rounds' medians when they ran (the full bench), else by the one sample each
    (quick mode)."""

    def speed(rt: RuntimeName) -> float:
        if choice is not None:
            return float(choice.median_rps[rt])
        return float(samples[rt])

    return max(eligible_runtimes(samples, fidelity, opts), key=speed)


@dataclass(frozen=True)
class ModelStage:
    """Per runtime: the model's forward speed and the engine's ceiling."""

    #: Runtime -> precision -> "batch_N" -> ms per image.
    forward_ms_per_image: dict[str, dict[str, dict[str, float]]]
    ceiling_by_runtime: dict[str, ceiling.Ceiling]


def _stage_models(
    settings: Settings, opts: BenchOptions, images: dict[str, BenchImage]
) -> ModelStage:
    cpus = usable_cpus()
    stage = ModelStage({}, {})
    for runtime in opts.runtimes:
        log.info("%s: forward speed and ceiling", runtime)
        rt = settings.model_copy(update={"runtime": runtime})
        stage.forward_ms_per_image[runtime] = ceiling.forward_speed(
            rt,
            cpus,
            seconds=0.5 if opts.quick else 2.0,
            precisions=("int8",) if opts.quick else ("int8", "fp32"),
        )
        stage.ceiling_by_runtime[runtime] = ceiling.process_ceiling(
            rt, images[MAIN_IMAGE].data, cpus, 1, opts.duration
        )
    return stage


def _measure(
    settings: Settings, opts: BenchOptions, images: dict[str, BenchImage], workdir: Path
) -> Measurements:
    """Every stage, in order; each stage's typed result feeds the later choices."""
    cpus = usable_cpus()
    main = images[MAIN_IMAGE]
    date = datetime.now(UTC).isoformat(timespec="seconds")
    machine = machine_info(cpus)
    decode_ms = ceiling.decode_speed(
        {k: v.data for k, v in images.items()}, seconds=0.3 if opts.quick else 1.0
    )
    models = _stage_models(settings, opts, images)
    fidelity = None
    if not opts.quick:
        log.info("fidelity of each int8 runtime on a fine-tuned model")
        fidelity = digits_fidelity(settings, opts.runtimes, workdir)
    by_runtime: dict[str, ServiceRun] = {
        rt: bench_service(settings, rt, cpus, images, opts, workdir, full=False)
        for rt in opts.runtimes
    }
    runtime_choice = None
    if not opts.quick and len(opts.runtimes) > 1:
        per_runtime: dict[str, tuple[RuntimeName, int]] = {
            rt: (rt, cpus) for rt in eligible_runtimes(by_runtime, fidelity, opts)
        }
        runtime_choice = interleaved_rounds(settings, per_runtime, main, opts, workdir)
    default = choose_default(sample_rps(by_runtime, opts.c16), fidelity, runtime_choice, opts)
    # The default runtime's run in the default layout is the same run in both tables.
    default_layout = f"workers_{cpus}"
    layouts = {default_layout: by_runtime[default]}
    if cpus > 1 and not opts.quick:
        layouts["workers_1"] = bench_service(
            settings, default, 1, images, opts, workdir, full=False
        )
    layout_choice = None
    if len(layouts) > 1:
        per_layout = {name: (default, svc.workers) for name, svc in layouts.items()}
        layout_choice = interleaved_rounds(settings, per_layout, main, opts, workdir)
    best_name = choose_layout(sample_rps(layouts, opts.c16), layout_choice)
    best = layouts[best_name]
    if not opts.quick:  # larger images and the OIP face, for the default runtime
        full = bench_service(settings, default, best.workers, images, opts, workdir, full=True)
        best = replace(best, other_images=full.other_images, oip_v2_rest=full.oip_v2_rest)
        layouts[best_name] = best
        if best_name == default_layout:  # one run, shown in both tables: both get the figures
            by_runtime[default] = best
    default_settings = settings.model_copy(update={"runtime": default, "inference_threads": cpus})
    engine = ceiling.engine_in_process(
        default_settings, main.data, sorted({1, opts.c16}), opts.duration
    )
    cache = None
    if not opts.quick:
        log.info("response cache: repeated and distinct images")
        cache = bench_cache(settings, default, best.workers, main, opts, workdir)
    naive = None if opts.skip_naive else bench_naive(settings, images, opts, workdir)
    return Measurements(
        date=date,
        quick=opts.quick,
        machine=machine,
        images={k: ImageInfo(len(v.data), v.size) for k, v in images.items()},
        decode_ms=decode_ms,
        forward_ms_per_image=models.forward_ms_per_image,
        ceiling_by_runtime=models.ceiling_by_runtime,
        fidelity=fidelity,
        service_by_runtime=by_runtime,
        runtime_choice=runtime_choice,
        default_runtime=default,
        service=layouts,
        layout_choice=layout_choice,
        service_default_layout=best_name,
        engine_in_process=engine,
        response_cache=cache,
        naive=naive,
    )


def run_benchmark(settings: Settings, opts: BenchOptions) -> BenchResult:
    """Run every stage; write ``bench.json`` and ``bench.png`` under ``opts.out_dir``."""
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="resnet-bench-"))
    settings = settings.model_copy(update={"model_cache_dir": settings.model_cache_dir})
    images = bench_images([MAIN_IMAGE] if opts.quick else None)
    started = time.perf_counter()
    measured = _measure(settings, opts, images, workdir)
    result = BenchResult(
        measured=measured,
        ratios=compute_ratios(measured, opts.c16),
        seconds=round(time.perf_counter() - started, 1),
    )
    # The edge: from here on the run is bench.json's document, which the report renders (as
    # scripts/update_docs.py does from the file).
    document = result.to_json()
    (opts.out_dir / "bench.json").write_text(json.dumps(document, indent=2, ensure_ascii=False))
    render_chart(document, opts.out_dir / "bench.png")
    print(render_table(document))
    return result
