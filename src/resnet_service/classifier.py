"""The transport-free core: image bytes -> Top-k, shared by the HTTP routes and the CLI.

Decoding runs on a bounded pool of plain threads (never the event loop); the model runs on the
engine thread. Both faces call ``classify``/``classify_many``, so the input contract and the
numbers are the same everywhere.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from resnet_service.config import Settings
from resnet_service.cpus import threads_per_worker
from resnet_service.engine import EngineObserver, InferenceEngine, Prediction
from resnet_service.errors import InvalidParameter, NotReady, Overloaded, ServiceError
from resnet_service.images import ImageLimits, decode_and_preprocess, install_bomb_guard
from resnet_service.model.loader import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Timings:
    """Where one request's time went, in seconds."""

    decode_s: float
    queue_s: float
    inference_s: float
    total_s: float


@dataclass(frozen=True, slots=True)
class Classification:
    """One image's Top-k with its timings."""

    prediction: Prediction
    timings: Timings


class DecodeObserver(EngineObserver, Protocol):
    """Engine hooks plus the decode stage (implemented by the metrics module)."""

    def decoded(self, seconds: float) -> None: ...


class Classifier:
    """Owns the decode pool and the inference engine for one loaded model."""

    def __init__(
        self, model: LoadedModel, settings: Settings, observer: DecodeObserver | None = None
    ) -> None:
        self.model = model
        self.settings = settings
        # workers=0 outside `serve` (tests, a bare uvicorn) means this is the only process.
        self.torch_threads = threads_per_worker(settings.torch_threads, settings.workers or 1)
        self.decode_threads = settings.decode_threads or self.torch_threads
        self.limits = ImageLimits(settings.max_upload_bytes, settings.max_pixels)
        self.max_top_k = min(settings.max_top_k, model.info.num_classes)
        spec = model.spec
        self.engine = InferenceEngine(
            model.module,
            model.labels,
            max_batch_size=settings.max_batch_size,
            max_batch_wait_s=settings.max_batch_wait_ms / 1000,
            queue_capacity=settings.queue_capacity,
            torch_threads=self.torch_threads,
            input_shape=(3, spec.crop_size, spec.crop_size),
            observer=observer,
        )
        self._observer = observer
        self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
        # Decodes waiting or running; bounded like the engine queue so memory stays bounded.
        self._decoding = 0
        self._decoding_lock = threading.Lock()
        self._decode_capacity = settings.queue_capacity + self.decode_threads

    def start(self) -> None:
        """Warm the model up on its thread; returns when ready."""
        install_bomb_guard()
        self.engine.start(warmup=True)

    def stop(self, timeout: float | None = None) -> None:
        """Finish queued work (within ``timeout``), then stop the engine and the decode pool."""
        self.engine.stop(self.settings.shutdown_grace_s if timeout is None else timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        return self.engine.ready

    def check_top_k(self, top_k: int | None) -> int:
        """``top_k`` or the default, within 1..min(max_top_k, classes)."""
        k = self.settings.default_top_k if top_k is None else top_k
        k = min(k, self.max_top_k) if top_k is None else k
        if not 1 <= k <= self.max_top_k:
            raise InvalidParameter(
                f"top_k must be between 1 and {self.max_top_k} (the model has "
                f"{self.model.info.num_classes} classes); got {top_k}"
            )
        return k

    # --- decoding ------------------------------------------------------------------------
    def _decode_sync(self, data: bytes) -> tuple[torch.Tensor, float]:
        started = time.perf_counter()
        array = decode_and_preprocess(data, self.limits, self.model.spec)
        return torch.from_numpy(array), time.perf_counter() - started

    def _release_decode_slot(self, _: object = None) -> None:
        with self._decoding_lock:
            self._decoding -= 1

    async def decode(self, data: bytes) -> tuple[torch.Tensor, float]:
        """Decode on the pool; ``Overloaded`` at once when the pool's backlog is full."""
        with self._decoding_lock:
            if self._decoding >= self._decode_capacity:
                raise Overloaded(
                    "too many images are waiting to be decoded; retry later",
                    retry_after_s=self.engine.retry_after_s(),
                )
            self._decoding += 1
        try:
            future = self._pool.submit(self._decode_sync, data)
        except RuntimeError:  # pool shut down
            self._release_decode_slot()
            raise
        # Released when the decode ends *or* is cancelled before it ran (caller gone).
        future.add_done_callback(self._release_decode_slot)
        tensor, seconds = await asyncio.wrap_future(future)
        if self._observer:
            self._observer.decoded(seconds)
        return tensor, seconds

    # --- classification ------------------------------------------------------------------
    async def classify(self, data: bytes, top_k: int | None = None) -> Classification:
        """Bytes -> Top-k; raises a ``ServiceError`` subclass for anything the caller can fix."""
        return await self._classify(data, self.check_top_k(top_k))

    async def _classify(self, data: bytes, k: int) -> Classification:
        started = time.perf_counter()
        if not self.engine.ready:
            raise NotReady("the model is not ready (starting up or shutting down)")
        tensor, decode_s = await self.decode(data)
        prediction = await self.engine.infer(tensor, k, self.settings.request_timeout_s)
        return Classification(
            prediction,
            Timings(
                decode_s=decode_s,
                queue_s=prediction.queue_s,
                inference_s=prediction.inference_s,
                total_s=time.perf_counter() - started,
            ),
        )

    async def classify_many(
        self, images: list[bytes], top_k: int | None = None
    ) -> list[Classification | ServiceError]:
        """Many images at once: each gets a result or its own error, in order. At most half the
        queue is in flight per call, so a long list waits its turn instead of being refused,
        while its images still reach the engine together and share batches."""
        k = self.check_top_k(top_k)
        gate = asyncio.Semaphore(max(1, self.settings.queue_capacity // 2))

        async def one(data: bytes) -> Classification:
            async with gate:
                return await self._classify(data, k)

        results = await asyncio.gather(*(one(data) for data in images), return_exceptions=True)
        out: list[Classification | ServiceError] = []
        for result in results:
            if isinstance(result, Classification | ServiceError):
                out.append(result)
            elif isinstance(result, BaseException):
                raise result
        return out
