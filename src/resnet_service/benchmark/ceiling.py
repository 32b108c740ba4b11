"""In-process measurements, no HTTP: the engine ceiling and the model's forward speed."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from multiprocessing.synchronize import Event
from typing import Any

import numpy as np

from resnet_service.benchmark.loadgen import LoadResult
from resnet_service.config import Settings
from resnet_service.images import LOCAL_FILE_LIMITS as _LIMITS
from resnet_service.images import decode_and_preprocess


def _decode_infer_worker(
    settings: Settings,
    threads: int,
    image: bytes,
    duration: float,
    ready: Any,
    start: Event,
    results: Any,
) -> None:
    """One ceiling process: decode + preprocess + forward, batch 1, back to back."""
    from resnet_service.model.serving import open_served_model

    model = open_served_model(settings.model_copy(update={"inference_threads": threads}))
    runtime, spec = model.runtime, model.spec
    runtime.bind_thread()
    for _ in range(3):
        runtime.infer(decode_and_preprocess(image, _LIMITS, spec)[None])
    ready.put(1)
    start.wait()
    count, began = 0, time.perf_counter()
    stop_at = began + duration
    while time.perf_counter() < stop_at:
        runtime.infer(decode_and_preprocess(image, _LIMITS, spec)[None])
        count += 1
    results.put((count, time.perf_counter() - began))


def process_ceiling(
    settings: Settings, image: bytes, processes: int, threads: int, duration: float
) -> dict[str, Any]:
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
    return {
        "layout": f"{processes} process(es) x {threads} thread(s), decode+infer, batch 1",
        "processes": processes,
        "threads": threads,
        "images": total,
        "images_per_s": round(total / elapsed, 2),
    }


def engine_in_process(
    settings: Settings, image: bytes, concurrencies: list[int], duration: float
) -> list[dict[str, Any]]:
    """The service's own core (decode pool + micro-batching engine) driven by asyncio
    callers, no HTTP: what the HTTP layer costs is the difference to the service."""
    from resnet_service.classifier import Classifier
    from resnet_service.model.loader import load_model

    classifier = Classifier(load_model(settings), settings)
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
            {**asyncio.run(run(c)).summary(), "layout": "engine in-process"} for c in concurrencies
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
    from resnet_service.model.serving import open_served_model

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


def decode_speed(images: dict[str, bytes], seconds: float = 1.0) -> dict[str, dict[str, float]]:
    """Decode + preprocess ms per image, our fast path vs the exact (reference-equal) path."""
    from resnet_service.images import PreprocessSpec

    spec = PreprocessSpec()
    out: dict[str, dict[str, float]] = {}
    for name, data in images.items():
        row = {}
        for label, fast in (("fast_ms", True), ("exact_ms", False)):
            times: list[float] = []
            stop_at = time.perf_counter() + seconds
            while time.perf_counter() < stop_at or len(times) < 3:
                t0 = time.perf_counter()
                decode_and_preprocess(data, _LIMITS, spec, fast=fast)
                times.append(time.perf_counter() - t0)
            row[label] = round(float(np.median(times)) * 1000, 2)
        out[name] = row
    return out
