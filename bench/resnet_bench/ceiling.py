"""In-process measurements, no HTTP: the engine ceiling and the model's forward speed."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from typing import Any

import numpy as np

from resnet_bench.loadgen import LoadResult, LoadSummary
from resnet_service.config import Settings
from resnet_service.core.images import LOCAL_FILE_LIMITS as _LIMITS
from resnet_service.core.images import (
    PreprocessSpec,
    decode_and_preprocess,
    decode_rgb,
    decode_to_pixels,
    normalise_pixels,
    preprocess,
)
from resnet_service.core.runtime import FloatBatch, Runtime, pixel_input


def serve_one(runtime: Runtime, image: bytes, spec: PreprocessSpec) -> FloatBatch:
    """Decode and classify one image the way a worker does (8-bit pixels into the graph where
    the runtime takes them)."""
    pixels = decode_to_pixels(image, _LIMITS, spec)[None]
    takes_pixels = pixel_input(runtime)
    if takes_pixels is not None:
        return takes_pixels.infer_pixels(pixels)
    return runtime.infer(normalise_pixels(pixels, spec))


def _decode_infer_worker(
    settings: Settings,
    threads: int,
    image: bytes,
    duration: float,
    ready: Any,
    start: Event,
    results: Any,
) -> None:
    """One ceiling process: decode + preprocess + forward, batch 1, back to back (the served
    path)."""
    from resnet_service.model.served import open_served_model

    model = open_served_model(settings.model_copy(update={"inference_threads": threads}))
    runtime, spec = model.runtime, model.spec
    runtime.bind_thread()
    for _ in range(3):
        serve_one(runtime, image, spec)
    ready.put(1)
    start.wait()
    count, began = 0, time.perf_counter()
    stop_at = began + duration
    while time.perf_counter() < stop_at:
        serve_one(runtime, image, spec)
        count += 1
    results.put((count, time.perf_counter() - began))


@dataclass(frozen=True)
class Ceiling:
    """What ``processes`` independent decode+infer loops of ``threads`` threads each did."""

    layout: str
    processes: int
    threads: int
    images: int
    images_per_s: float


def process_ceiling(
    settings: Settings, image: bytes, processes: int, threads: int, duration: float
) -> Ceiling:
    """Images/s of ``processes`` independent decode+infer loops with ``threads`` each."""
    ctx = mp.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    start = ctx.Event()
    procs = [
        ctx.Process(
            target=_decode_infer_worker,
            args=(settings, threads, image, duration, ready, start, results),
        )
        for _ in range(processes)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=300)
    start.set()
    counts = [results.get(timeout=duration + 300) for _ in procs]
    for proc in procs:
        proc.join(30)
    total = sum(c for c, _ in counts)
    elapsed = max(e for _, e in counts)
    return Ceiling(
        layout=f"{processes} process(es) x {threads} thread(s), decode+infer, batch 1",
        processes=processes,
        threads=threads,
        images=total,
        images_per_s=round(total / elapsed, 2),
    )


def engine_in_process(
    settings: Settings, image: bytes, concurrencies: list[int], duration: float
) -> list[LoadSummary]:
    """The service's own core (decode pool + micro-batching engine) driven by asyncio
    callers, no HTTP: what the HTTP layer costs is the difference to the service."""
    from resnet_service.core.classifier import Classifier
    from resnet_service.model.torch_network import load_model
    from resnet_service.service.loading import classifier_options

    classifier = Classifier(load_model(settings), classifier_options(settings))
    classifier.start()

    async def run(concurrency: int) -> LoadResult:
        for _ in range(3):
            await classifier.classify(image)
        result = LoadResult("in-process", concurrency, None, 0.0)
        stop_at = result.started + duration

        async def caller() -> None:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                await classifier.classify(image)
                result.answered(time.perf_counter() - t0, 200)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        result.elapsed_s = time.perf_counter() - result.started
        return result

    try:
        return [
            LoadSummary.of(asyncio.run(run(c)), layout="engine in-process") for c in concurrencies
        ]
    finally:
        classifier.stop(timeout=10)


def forward_speed(
    settings: Settings,
    threads: int,
    batches: tuple[int, ...] = (1, 8),
    seconds: float = 2.0,
    precisions: tuple[str, ...] = ("int8", "fp32"),
) -> dict[str, dict[str, float]]:
    """Model-only forward, ms per image, per precision, on ``threads`` threads."""
    from resnet_service.model.served import open_served_model

    out: dict[str, dict[str, float]] = {}
    for precision in precisions:
        runtime = open_served_model(
            settings.model_copy(update={"precision": precision, "inference_threads": threads})
        ).runtime
        runtime.bind_thread()
        out[precision] = {}
        for batch in batches:
            x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
            for _ in range(2):
                runtime.infer(x)
            times: list[float] = []
            stop_at = time.perf_counter() + seconds
            while time.perf_counter() < stop_at or len(times) < 3:
                t0 = time.perf_counter()
                runtime.infer(x)
                times.append(time.perf_counter() - t0)
            out[precision][f"batch_{batch}"] = round(float(np.median(times)) / batch * 1000, 3)
    return out


def _previous_path(data: bytes, spec: PreprocessSpec) -> None:
    """The served path before issue 18: full resize then crop, numpy normalisation."""
    preprocess(decode_rgb(data, _LIMITS, spec, fast=True), spec)


def decode_speed(images: dict[str, bytes], seconds: float = 1.0) -> dict[str, dict[str, float]]:
    """Decode + preprocess ms per image, side by side: the served path (8-bit pixels of the
    crop's region; normalisation happens in the graph), the same with numpy normalisation,
    the previous served path, and the exact (reference-equal) path. Rounds interleaved."""
    spec = PreprocessSpec()
    paths: dict[str, Callable[[bytes], object]] = {
        "served_ms": lambda d: decode_to_pixels(d, _LIMITS, spec),
        "served_numpy_normalised_ms": lambda d: decode_and_preprocess(d, _LIMITS, spec),
        "previous_ms": lambda d: _previous_path(d, spec),
        "exact_ms": lambda d: decode_and_preprocess(d, _LIMITS, spec, fast=False),
    }
    out: dict[str, dict[str, float]] = {}
    for name, data in images.items():
        times: dict[str, list[float]] = {label: [] for label in paths}
        stop_at = time.perf_counter() + seconds * len(paths)
        while time.perf_counter() < stop_at or min(len(t) for t in times.values()) < 3:
            for label, path in paths.items():
                t0 = time.perf_counter()
                path(data)
                times[label].append(time.perf_counter() - t0)
        row = {label: round(float(np.median(t)) * 1000, 2) for label, t in times.items()}
        row["served_over_previous"] = round(row["served_ms"] / row["previous_ms"], 3)
        out[name] = row
    return out
