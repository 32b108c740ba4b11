"""The inference engine: a bounded queue feeding one model thread that micro-batches.

Contract:
- the runtime runs only on the engine's own thread (its thread count fixed at start);
- a lone request runs at once; requests that arrive while a batch runs form the next batch
  (at most ``max_batch_size``; once two or more are waiting, up to ``max_batch_wait_s`` more);
- a full queue raises ``Overloaded`` at once, with a Retry-After estimate;
- work whose deadline passed while queued is dropped with ``DeadlineExceeded``;
- a failure in a batch reaches every waiter of that batch; outputs are counted against inputs;
- a batch asks the runtime for the union of what its requests want (logits always, the
  embedding or the feature map when one asked), and each request gets a copy of its own rows
  of what it asked for only.

Inputs are either preprocessed CHW float32 arrays or 8-bit HWC images (what the decoder
gives): a batch of images goes to the runtime as 8-bit pixels when it normalises in its graph
(``PixelRuntime``), else it is normalised here, batched, with ``normalise``.

numpy only: the engine never imports torch (the torch runtime does, behind the seam).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt
from typing_extensions import TypeIs

from resnet_service.core.engine_spans import Traced, record_batch, traced_now
from resnet_service.core.errors import (
    DeadlineExceeded,
    InferenceFailed,
    NotReady,
    Overloaded,
    ServiceError,
)
from resnet_service.core.images import Pixels
from resnet_service.core.priority import INTERACTIVE, Lanes, Priority
from resnet_service.core.priority import current as current_priority
from resnet_service.core.runtime import (
    LOGITS_ONLY,
    FloatBatch,
    Forward,
    Output,
    Runtime,
    Wants,
    pixel_input,
)

log = logging.getLogger(__name__)

#: Extra seconds an async caller waits past its deadline before giving up on the engine.
_BACKSTOP_S = 5.0
#: Images in a bulk batch while interactive work arrived within ``_INTERACTIVE_WINDOW_S``.
BULK_SLICE: Final = 2
_INTERACTIVE_WINDOW_S: Final = 1.0
Probabilities = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Scores:
    """Class probabilities of one input, with where its time went."""

    probabilities: Probabilities
    queue_s: float
    inference_s: float
    batch_size: int
    #: Set when asked for: the pooled features (D) and the last stage's map (D x h x w).
    embedding: FloatBatch | None = None
    feature_map: FloatBatch | None = None


class EngineObserver(Protocol):
    """Hooks for metrics; called on the engine thread (keep them cheap)."""

    def batch_done(
        self, size: int, inference_s: float, queue_waits_s: Sequence[float], queue_depth: int
    ) -> None: ...


@dataclass(slots=True)
class _Work:
    array: FloatBatch | Pixels
    deadline: float
    enqueued: float = field(default_factory=time.monotonic)
    future: Future[Scores] = field(default_factory=Future)
    #: The request span to link the batch to, when tracing records it.
    traced: Traced | None = None
    wants: Wants = LOGITS_ONLY
    priority: Priority = INTERACTIVE


def _is_pixels(array: FloatBatch | Pixels) -> TypeIs[Pixels]:
    return array.dtype == np.uint8


def forward_batch(
    runtime: Runtime,
    batch: FloatBatch | Pixels,
    wants: Wants,
    normalise: Callable[[Pixels], FloatBatch] | None = None,
) -> Forward:
    """One forward of a batch that is all 8-bit images or all preprocessed arrays, on the
    caller's thread: images go into the graph where the runtime takes them, else through
    ``normalise`` (the engine's model thread and the tag job's workers both call this)."""
    if not _is_pixels(batch):
        return runtime.forward(batch, wants)
    takes_pixels = pixel_input(runtime)
    if takes_pixels is not None:
        return takes_pixels.forward_pixels(batch, wants)
    assert normalise is not None, "a runtime that takes no images needs a normaliser"
    return runtime.forward(normalise(batch), wants)


def softmax(logits: FloatBatch) -> FloatBatch:
    """Row-wise softmax in float32, stable for large logits."""
    shifted: FloatBatch = logits - logits.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


def _row(batch: FloatBatch | None, row: int, wanted: bool) -> FloatBatch | None:
    """A copy of one input's row of an output, when its request asked for it."""
    return batch[row].copy() if wanted and batch is not None else None


def _copied(forward: Forward) -> Forward:
    """A forward's outputs out of the runtime's buffers (the next forward reuses them)."""
    return Forward(
        logits=forward.logits.copy(),
        embedding=None if forward.embedding is None else forward.embedding.copy(),
        feature_map=None if forward.feature_map is None else forward.feature_map.copy(),
    )


def _joined(parts: list[FloatBatch | None]) -> FloatBatch | None:
    present = [p for p in parts if p is not None]
    return np.concatenate(present) if len(present) == len(parts) and present else None


class ComputeGate:
    """One forward at a time among a worker's engines (one per model version), handed over in
    arrival order: each worker's inference threads are its whole CPU budget, so two models'
    forwards side by side would only oversubscribe the cores, and a lock without order would
    let a flooded model's engine take it back again and again. Hand-written: the standard
    library's locks promise no order.

    While more than one engine has used it lately, a batch takes its turns ``shared_slice``
    images at a time, so another model's request waits behind one slice of a flooded model's
    batch rather than the whole batch of 8."""

    #: Images a turn holds while engines share the gate.
    shared_slice: Final = 1
    #: How long another engine's forward counts as "lately".
    shared_window_s: Final = 1.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy = False
        self._waiting: collections.deque[threading.Event] = collections.deque()
        self._last_turn: dict[int, float] = {}

    def slice_for(self, model: object, batch: int) -> int:
        """Images per turn for a batch of ``model``: all of it unless another model is active
        (two versions of one model swapping are one tenant: no slicing while they do)."""
        now = time.monotonic()
        mine = hash(model)
        with self._lock:
            self._last_turn[mine] = now
            if len(self._last_turn) > 64:  # engines come and go with versions
                self._last_turn = {
                    k: t for k, t in self._last_turn.items() if now - t < self.shared_window_s
                }
            shared = any(
                key != mine and now - at < self.shared_window_s
                for key, at in self._last_turn.items()
            )
        return min(batch, self.shared_slice) if shared else batch

    def __enter__(self) -> None:
        with self._lock:
            if not self._busy:
                self._busy = True
                return
            turn = threading.Event()
            self._waiting.append(turn)
        turn.wait()  # handed over by __exit__ (the gate stays busy in between)

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()
            else:
                self._busy = False


class InferenceEngine:
    """Micro-batching executor of one runtime on one dedicated thread."""

    def __init__(
        self,
        runtime: Runtime,
        num_classes: int,
        *,
        max_batch_size: int = 16,
        max_batch_wait_s: float = 0.002,
        queue_capacity: int = 256,
        input_shape: tuple[int, int, int] = (3, 224, 224),
        observer: EngineObserver | None = None,
        normalise: Callable[[Pixels], FloatBatch] | None = None,
        trace_attributes: Mapping[str, str] | None = None,
        compute: ComputeGate | None = None,
    ) -> None:
        self._runtime = runtime
        #: Shared by every engine of a worker: one forward at a time on its threads.
        self._compute = compute or ComputeGate()
        self._pixel_runtime = pixel_input(runtime)
        self._normalise = normalise
        channels, height, width = input_shape
        #: The shape of an 8-bit image input (accepted when images can be normalised).
        self.pixel_shape = (height, width, channels)
        self._num_classes = num_classes
        self.max_batch_size = max_batch_size
        self._max_wait = max_batch_wait_s
        self._queue: Lanes[_Work] = Lanes(maxsize=queue_capacity)
        #: When interactive work last arrived (bulk batches stay small for a while after).
        self._interactive_at = -math.inf
        self.input_shape = input_shape
        self._observer = observer
        #: What every batch span says about the model (name, version, runtime).
        self._trace_attributes = dict(trace_attributes or {"runtime": runtime.name})
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._startup_error: BaseException | None = None
        self._in_batch = 0
        #: The class of the batch being run (None between batches).
        self._running: Priority | None = None
        #: Called whenever the model thread takes work or ends a batch (``has_room`` may say
        #: yes now): the decode threads' wake-up.
        self._room_listeners: list[Callable[[], None]] = []
        #: Smoothed seconds of model time per image (for Retry-After and admission).
        self.per_item_s = 0.005
        self.items_run = 0

    # --- lifecycle -----------------------------------------------------------------------
    def start(self, warmup: bool = True, timeout: float = 300.0) -> None:
        """Start the model thread; returns once it is warmed up and accepting work."""
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(
            target=self._main, args=(warmup,), name="inference-engine", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"engine did not warm up within {timeout}s")
        if self._startup_error is not None:
            raise RuntimeError("engine failed to start") from self._startup_error

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop accepting work, finish what is queued (within ``timeout``), then end the thread."""
        self._stopping.set()
        self._made_room()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("engine thread still busy after %ss; failing what is queued", timeout)
        self._fail_queued(NotReady("the service is shutting down"))

    @property
    def ready(self) -> bool:
        return (
            self._ready.is_set()
            and not self._stopping.is_set()
            and self._startup_error is None
            and self._thread is not None
            and self._thread.is_alive()
        )

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def has_room(self, priority: Priority, depth: int) -> bool:
        """Whether an image of ``priority`` may be decoded now. Decode threads ask, so that
        images are decoded just in time: what waits beyond a batch ahead waits as its encoded
        bytes, cheap to drop, not as pixels. An interactive image has room while fewer than
        ``depth`` interactive images wait (bulk ones wait behind it anyway); a bulk image while
        fewer than ``depth`` images wait and no interactive work is queued or running, so that
        an interactive batch has the cores to itself (bulk takes what is left). Always, once
        the engine stops (the submit then says so)."""
        if self._stopping.is_set():
            return True
        waiting = self._queue.qsize(INTERACTIVE)
        if priority == INTERACTIVE:
            return waiting < depth
        return waiting == 0 and self._running != INTERACTIVE and self._queue.qsize() < depth

    def on_room(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (from the model thread) whenever ``has_room`` may have changed to
        yes; it must not block."""
        self._room_listeners.append(listener)

    def _made_room(self) -> None:
        for listener in self._room_listeners:
            listener()

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained, from depth and recent service time."""
        backlog = self._queue.qsize() + self._in_batch + 1
        return max(1, min(60, math.ceil(backlog * self.per_item_s)))

    # --- submission ----------------------------------------------------------------------
    @property
    def outputs(self) -> Wants:
        """What a request may ask for besides the probabilities."""
        return self._runtime.outputs

    def submit(
        self,
        array: FloatBatch | Pixels,
        timeout_s: float = 30.0,
        wants: Wants = LOGITS_ONLY,
        priority: Priority | None = None,
    ) -> Future[Scores]:
        """Queue one CHW float array or HWC uint8 image, in the lane of ``priority`` (the
        request's, by default); the future resolves to its Scores (with the outputs ``wants``
        names) or a ServiceError."""
        if not wants <= self._runtime.outputs:
            raise InferenceFailed(
                f"the model's graph does not yield {sorted(wants - self.outputs)}"
            )
        if not self.ready:
            raise NotReady("the model is not ready (starting up or shutting down)")
        if not self.accepts(array):
            raise InferenceFailed(
                f"expected a float32 array of shape {self.input_shape} or a uint8 image of "
                f"shape {self.pixel_shape}, got {array.dtype} {array.shape}"
            )
        work = _Work(
            array=array,
            deadline=time.monotonic() + timeout_s,
            traced=traced_now(),
            wants=wants,
            priority=priority or current_priority(),
        )
        if work.priority == INTERACTIVE:
            self._interactive_at = work.enqueued
        try:
            self._queue.put_nowait(work, work.priority)
        except queue.Full:
            raise Overloaded(
                f"the inference queue is full ({self._queue.maxsize} waiting); retry later",
                retry_after_s=self.retry_after_s(),
            ) from None
        return work.future

    def accepts(self, array: FloatBatch | Pixels) -> bool:
        """Whether ``array`` (model-sized pixels or a preprocessed tensor) fits this model."""
        if array.dtype == np.uint8:
            return array.shape == self.pixel_shape and (
                self._pixel_runtime is not None or self._normalise is not None
            )
        return array.shape == self.input_shape

    async def infer(
        self, array: FloatBatch | Pixels, timeout_s: float = 30.0, wants: Wants = LOGITS_ONLY
    ) -> Scores:
        """``submit`` for asyncio callers; cancelling the await drops the queued work."""
        return await self.answer(self.submit(array, timeout_s, wants), timeout_s)

    @staticmethod
    async def answer(future: Future[Scores], timeout_s: float) -> Scores:
        """Await what ``submit`` returned; cancelling the await drops the queued work."""
        try:
            # The engine enforces the deadline; this backstop only fires if its thread is gone.
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s + _BACKSTOP_S)
        except TimeoutError:
            raise DeadlineExceeded("no answer from the model within the deadline") from None

    # --- the model thread ----------------------------------------------------------------
    def _main(self, warmup: bool) -> None:
        try:
            self._runtime.bind_thread()
            if warmup:
                self._warm_up()
        except BaseException as exc:  # reported to start()
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        while True:
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                if self._stopping.is_set():
                    return
                continue
            batch = self._collect(first)
            self._running = first.priority
            self._made_room()
            try:
                self._execute(batch)
            except Exception as exc:  # never let one batch kill the model thread
                log.exception("engine error on a batch of %d", len(batch))
                failure = InferenceFailed(f"internal engine error: {type(exc).__name__}: {exc}")
                for work in batch:
                    if not work.future.done():
                        work.future.set_exception(failure)
            finally:
                self._running = None
                self._made_room()

    def warmup_batch_sizes(self) -> list[int]:
        """Powers of two up to the max batch, and the max itself."""
        sizes = [1]
        while sizes[-1] * 2 < self.max_batch_size:
            sizes.append(sizes[-1] * 2)
        if self.max_batch_size > 1:
            sizes.append(self.max_batch_size)
        return sizes

    def _warm_input(self, size: int) -> FloatBatch | Pixels:
        """Zeros shaped like what will be served: images where the runtime takes them."""
        if self._pixel_runtime is not None:
            return np.zeros((size, *self.pixel_shape), dtype=np.uint8)
        return np.zeros((size, *self.input_shape), dtype=np.float32)

    def _warm_up(self) -> None:
        started = time.perf_counter()
        for size in self.warmup_batch_sizes():
            out = self._run(self._warm_input(size), self._runtime.outputs).logits
            if out.shape != (size, self._num_classes):
                raise InferenceFailed(
                    f"model output {out.shape} does not match {self._num_classes} labels"
                )
        # Timed once warm: a first call pays for kernel set-up (measured 10x a warm one), and
        # this is the prior admission starts from.
        t0 = time.perf_counter()
        self._run(self._warm_input(1), LOGITS_ONLY)
        self.per_item_s = time.perf_counter() - t0
        log.info(
            "engine warmed up (%s %s, batch sizes %s, %d threads) in %.2fs",
            self._runtime.name,
            self._runtime.precision,
            self.warmup_batch_sizes(),
            self._runtime.threads,
            time.perf_counter() - started,
        )

    def _collect(self, first: _Work) -> list[_Work]:
        """The batch ``first`` starts. Interactive work is batched with interactive work only;
        a bulk batch stays small (``BULK_SLICE``) while interactive work arrived lately, so
        that interactive work waits behind a couple of bulk images, not a batch of them."""
        lane = INTERACTIVE if first.priority == INTERACTIVE else None
        limit = self.max_batch_size
        if lane is None and time.monotonic() - self._interactive_at < _INTERACTIVE_WINDOW_S:
            limit = min(limit, BULK_SLICE)
        batch = [first]
        wait_until = time.monotonic() + self._max_wait
        while len(batch) < limit:
            try:
                batch.append(self._queue.get_nowait(lane))
                continue
            except queue.Empty:
                pass
            remaining = wait_until - time.monotonic()
            # A lone request never waits; a forming batch waits briefly for stragglers.
            if len(batch) == 1 or remaining <= 0:
                break
            try:
                batch.append(self._queue.get(remaining, lane))
            except queue.Empty:
                break
        return batch

    def _live(self, batch: list[_Work], now: float) -> list[_Work]:
        """The work still wanted: cancelled callers dropped, expired deadlines failed."""
        live: list[_Work] = []
        for work in batch:
            if not work.future.set_running_or_notify_cancel():
                continue  # the caller gave up (client disconnected)
            if work.deadline <= now:
                work.future.set_exception(
                    DeadlineExceeded("the request's deadline passed while it waited for the model")
                )
                continue
            live.append(work)
        return live

    def _execute(self, batch: list[_Work]) -> None:
        now = time.monotonic()
        live = self._live(batch, now)
        if not live:
            return
        self._in_batch = len(live)
        traced = [work.traced for work in live if work.traced is not None]
        started_ns = time.time_ns() if traced else 0
        started = time.perf_counter()
        try:
            probabilities, outputs = self._forward(live)
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, ServiceError)
                else InferenceFailed(
                    f"the model failed on a batch of {len(live)}: {type(exc).__name__}: {exc}"
                )
            )
            log.exception("batch of %d failed", len(live))
            if traced:
                self._trace(traced, started_ns, len(live), error.code)
            for work in live:
                work.future.set_exception(error)
            return
        finally:
            self._in_batch = 0
        elapsed = time.perf_counter() - started
        if traced:
            self._trace(traced, started_ns, len(live))
        self.per_item_s = 0.8 * self.per_item_s + 0.2 * (elapsed / len(live))
        self.items_run += len(live)
        waits = [now - work.enqueued for work in live]
        for row, work in enumerate(live):
            work.future.set_result(
                Scores(
                    probabilities=probabilities[row],
                    queue_s=waits[row],
                    inference_s=elapsed,
                    batch_size=len(live),
                    embedding=_row(outputs.embedding, row, Output.EMBEDDING in work.wants),
                    feature_map=_row(outputs.feature_map, row, Output.FEATURE_MAP in work.wants),
                )
            )
        if self._observer:
            self._observer.batch_done(len(live), elapsed, waits, self._queue.qsize())

    def _trace(
        self, traced: list[Traced], started_ns: int, size: int, error: str | None = None
    ) -> None:
        record_batch(traced, started_ns, time.time_ns(), size, self._trace_attributes, error)

    def _run(self, batch: FloatBatch | Pixels, wants: Wants) -> Forward:
        """One forward of a batch that is all images or all preprocessed arrays."""
        return forward_batch(self._runtime, batch, wants, self._normalise)

    def _as_float(self, array: FloatBatch | Pixels) -> FloatBatch:
        if not _is_pixels(array):
            return array
        assert self._normalise is not None
        return self._normalise(array)

    def _forward(self, live: list[_Work]) -> tuple[Probabilities, Forward]:
        """Probabilities (a copy) and the batch's outputs: the rows are copied out by the
        caller before the next forward reuses the runtime's buffers. The batch runs in the
        turns the compute gate gives it (slices when another model is active)."""
        arrays = [work.array for work in live]
        if len({a.dtype for a in arrays}) > 1:  # images beside preprocessed arrays: rare
            arrays = [self._as_float(a) for a in arrays]
        batch = np.stack(arrays)
        wants = frozenset().union(*(work.wants for work in live))
        step = self._compute.slice_for(
            self._trace_attributes.get("model.name", id(self)), len(live)
        )
        if step >= len(live):
            with self._compute:
                outputs = self._run(batch, wants)  # type: ignore[arg-type]  # one dtype, either
                return self._probabilities(outputs, len(live)), outputs
        slices = []
        for start in range(0, len(live), step):
            with self._compute:
                part = self._run(batch[start : start + step], wants)  # type: ignore[arg-type]
                slices.append(_copied(part))
        outputs = Forward(
            logits=np.concatenate([p.logits for p in slices]),
            embedding=_joined([p.embedding for p in slices]),
            feature_map=_joined([p.feature_map for p in slices]),
        )
        return self._probabilities(outputs, len(live)), outputs

    def _probabilities(self, outputs: Forward, count: int) -> Probabilities:
        logits = outputs.logits
        if logits.ndim != 2 or logits.shape != (count, self._num_classes):
            raise InferenceFailed(f"the model returned {logits.shape} outputs for {count} inputs")
        return softmax(logits.astype(np.float32, copy=True))

    def _fail_queued(self, error: ServiceError) -> None:
        while True:
            try:
                work = self._queue.get_nowait()
            except queue.Empty:
                return
            if work.future.set_running_or_notify_cancel():
                work.future.set_exception(error)
