"""The classifier's first stage: image bytes -> a decoded, model-sized image in the engine's
queue. Decoding runs on a bounded pool of plain threads (never the event loop), just in time
(a thread takes an image only while the engine has room for it), and an image that waited too
long for a decoder while the service is overloaded is dropped before any CPU is spent on it
(fresh over stale; see ``core.admission``)."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from concurrent.futures import Future
from contextvars import Context, copy_context
from dataclasses import dataclass
from typing import Protocol

from resnet_service.core import priority
from resnet_service.core.admission import Workload
from resnet_service.core.decode_threads import DecodeThreads
from resnet_service.core.engine import EngineObserver, InferenceEngine, Scores
from resnet_service.core.errors import DeadlineExceeded, NotReady, Overloaded
from resnet_service.core.images import ImageLimits, Pixels, PreprocessSpec, decode_sized
from resnet_service.core.priority import Priority
from resnet_service.core.runtime import LOGITS_ONLY, Wants


@dataclass(frozen=True, slots=True)
class Decoded:
    """One decoded image (8-bit, model-sized), with its decode time and how long it waited for
    a decode thread."""

    array: Pixels
    decode_s: float
    waited_s: float
    #: The upright (width, height) of the image as sent.
    size: tuple[int, int]


@dataclass(frozen=True, slots=True)
class Queued:
    """A decoded image and its place in the model's queue."""

    decoded: Decoded
    scores: Future[Scores]


class DecodeObserver(EngineObserver, Protocol):
    """Engine hooks plus the decode stage (implemented by the metrics module)."""

    def decoded(self, seconds: float) -> None: ...

    def cache_lookup(self, hit: bool, cached_bytes: int) -> None: ...


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """What the decode stage checks and waits for."""

    threads: int
    images: ImageLimits
    spec: PreprocessSpec
    fast: bool
    request_timeout_s: float
    #: The engine's batch: a decode thread waits while this much goes before its image.
    batch: int
    #: Images queued for the model at most (the pool's backlog is bounded alike).
    queue_capacity: int


class DecodeStage:
    """A bounded decode pool in front of one engine."""

    def __init__(
        self,
        limits: DecodeLimits,
        engine: InferenceEngine,
        workload: Workload,
        observer: DecodeObserver | None,
    ) -> None:
        self.limits = limits
        self.engine = engine
        self.workload = workload
        self._observer = observer
        self._pool = DecodeThreads(limits.threads, self._has_room, self._stale_error)
        engine.on_room(self._pool.wake)
        # Decodes waiting or running; bounded like the engine queue so memory stays bounded.
        self._decoding = 0
        self._lock = threading.Lock()
        self._capacity = limits.queue_capacity + limits.threads

    @property
    def in_flight(self) -> int:
        """Decodes waiting for a thread or running."""
        return self._decoding

    def shutdown(self) -> None:
        self._pool.shutdown()

    def _stale_error(self, waited_s: float) -> Overloaded | None:
        """The refusal of an image that waited this long for a decoder, or None while it may
        still be served."""
        if not self.workload.stale(waited_s):
            return None
        return Overloaded(
            f"this image waited {waited_s * 1000:.0f} ms for a decoder while the service is "
            "overloaded, and was dropped in favour of newer requests; retry later",
            retry_after_s=1,
        )

    def _has_room(self, wanted: Priority) -> bool:
        """Just in time: a decode thread takes an image only while fewer than a batch of what
        goes before it wait for the model (``InferenceEngine.has_room``). Past that an image
        waits as its bytes, where a standing queue's stale work is dropped before any CPU is
        spent on it and where it does not take the cores from other models or from an
        interactive batch."""
        return self.engine.has_room(wanted, self.limits.batch)

    def _decode_sync(self, data: bytes, submitted: float, wants: Wants) -> Queued:
        """Decode one image and queue it for the model, on a decode thread (so that the room
        check and the put are one thread's steps), in the request's context (its priority,
        and its span for the batch's trace)."""
        limits = self.limits
        started = time.monotonic()
        waited = started - submitted
        if waited > limits.request_timeout_s:
            raise DeadlineExceeded("the request's deadline passed while it waited for a decoder")
        if (stale := self._stale_error(waited)) is not None:
            raise stale
        pixels, size = decode_sized(data, limits.images, limits.spec, fast=limits.fast)
        decoded = Decoded(pixels, time.monotonic() - started, waited, size)
        return Queued(decoded, self.engine.submit(pixels, limits.request_timeout_s, wants))

    def _release_slot(self, _: object = None) -> None:
        with self._lock:
            self._decoding -= 1

    async def decode(
        self, data: bytes, wants: Wants = LOGITS_ONLY, context: Context | None = None
    ) -> Queued:
        """Decode on the pool and queue for the model, in ``context`` (the caller's by
        default); ``Overloaded`` at once when the pool's backlog is full."""
        context = context or copy_context()
        with self._lock:
            if self._decoding >= self._capacity:
                raise Overloaded(
                    "too many images are waiting to be decoded; retry later",
                    retry_after_s=self.workload.retry_after_s(),
                )
            self._decoding += 1
        try:
            decode = functools.partial(
                context.run, self._decode_sync, data, time.monotonic(), wants
            )
            future: Future[Queued] = self._pool.submit(decode, priority.current())
        except RuntimeError:  # pool shut down
            self._release_slot()
            raise NotReady("the service is shutting down") from None
        # Released when the decode ends *or* is cancelled before it ran (caller gone).
        future.add_done_callback(self._release_slot)
        queued = await asyncio.wrap_future(future)
        if self._observer:
            self._observer.decoded(queued.decoded.decode_s)
        return queued
