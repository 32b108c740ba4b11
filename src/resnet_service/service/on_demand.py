"""Models on demand: a worker's repository models are *available* without being loaded; the
first request for one loads it, within a memory budget, and idle ones unload.

- A request for an available version asks this loader for it and waits (asynchronously,
  within its deadline) for the load; requests that arrive meanwhile wait for the same load.
- Before a load, the least recently used unpinned versions are unloaded until the budget
  holds the newcomer (its memory as measured at its last load, else the largest measured so
  far, else its files' size). An evicted version finishes what it accepted first
  (``Reconciler.retire``) and goes back to *available*.
- A version no request reached for ``model_idle_ttl_s`` is unloaded the same way.

One thread per worker does every load and unload, under the reconciler's lock, so a
repository pass and a load never interleave. Triton and ModelMesh keep such policies in
their own schedulers; here it is one small loop over the worker's model table.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import logging
import queue
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Final, Protocol

from resnet_service.config import Settings
from resnet_service.core.errors import DeadlineExceeded, ModelLoadFailed
from resnet_service.service.models import ServedVersion, VersionState
from resnet_service.service.state import ServiceState

log = logging.getLogger("resnet_service.on_demand")

#: How often the loader looks for idle versions (and the longest a stop waits for it).
_TICK_S: Final = 0.5
#: A version never loaded, with nothing measured yet: its files' size times this.
_FILES_TO_RESIDENT: Final = 2.0

#: glibc's ``mallopt`` parameter number of the mmap threshold.
_M_MMAP_THRESHOLD: Final = -3
_MMAP_THRESHOLD_BYTES: Final = 128 * 1024

Key = tuple[str, str]


def return_large_blocks() -> None:
    """Fix glibc's mmap threshold at its default 128 KiB. glibc raises it after every large
    block it frees (up to 32 MiB), so once one model was unloaded the next one's buffers came
    from the heap, and unloading it no longer gave them back: measured over 8 load-unload
    cycles of two int8 ResNet18s, the worker's idle floor grew from 179 to 241 MB; fixed, it
    stayed at 163-168 MB. Only for models on demand (mapping large blocks costs a few system
    calls a batch)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        return  # not glibc: its allocator has its own policy


class Loader(Protocol):
    """What this loader asks of the repository's reconciler (``service.reconciler``)."""

    state: ServiceState
    settings: Settings

    def locked(self) -> AbstractContextManager[None]: ...

    def load_available(self, name: str, number: str) -> ModelLoadFailed | None: ...

    def retire(
        self, entry: ServedVersion, reason: str = "retired", keep_available: bool = False
    ) -> None: ...

    def files_bytes(self, name: str, number: str) -> int: ...

    def pinned(self, name: str) -> bool: ...


class OnDemand:
    """The loader of one worker's models on demand."""

    def __init__(
        self,
        reconciler: Loader,
        budget_bytes: int | None,
        idle_ttl_s: float | None,
    ) -> None:
        self.reconciler = reconciler
        self.table = reconciler.state.models
        self.metrics = reconciler.state.metrics
        self.budget_bytes = budget_bytes
        self.idle_ttl_s = idle_ttl_s
        self._pending: dict[Key, concurrent.futures.Future[None]] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[Key | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        return_large_blocks()

    # --- what requests call --------------------------------------------------------------
    def request(self, model: str, version: str) -> concurrent.futures.Future[None]:
        """The load of ``model`` ``version`` (one per version however many ask)."""
        key = (model, version)
        with self._lock:
            future = self._pending.get(key)
            if future is None:
                future = self._pending[key] = concurrent.futures.Future()
                self._queue.put(key)
            return future

    async def wait(self, model: str, version: str, timeout_s: float) -> None:
        """Wait for ``model`` ``version`` to load (``DeadlineExceeded`` past ``timeout_s``,
        ``ModelLoadFailed`` when it could not be loaded)."""
        started = time.monotonic()
        future = asyncio.wrap_future(self.request(model, version))
        try:
            await asyncio.wait_for(asyncio.shield(future), max(timeout_s, 0.0))
        except TimeoutError:
            raise DeadlineExceeded(
                f"Model '{model}' version {version} did not load within the request's "
                f"deadline ({timeout_s:.1f} s); retry."
            ) from None
        finally:
            self.metrics.cold_wait_seconds.labels(model).observe(time.monotonic() - started)

    # --- the loader thread ---------------------------------------------------------------
    def prime(self) -> None:
        """Start the runtime before serving: load the first available version and unload it.
        A runtime's one-time start (OpenVINO: ~70 MB of plugin, threads and kernels, kept
        after its models go) then belongs to the worker's base memory, instead of being
        counted against the budget as part of whichever model a request loads first."""
        with self.reconciler.locked():
            if self.table.resident():
                return
            available = [e for e in self.table.index() if e.state is VersionState.AVAILABLE]
            for first in available:  # the first that loads (one may fail: it says why)
                if self.reconciler.load_available(first.model, first.version) is not None:
                    continue
                loaded = self.table.entry(first.model, first.version)
                if loaded is not None:
                    self.reconciler.retire(loaded, reason="start", keep_available=True)
                    self.table.put(replace(first, memory_bytes=None))  # it measured the runtime
                return

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="models-on-demand", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(self.reconciler.settings.shutdown_grace_s + 60)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                key = self._queue.get(timeout=_TICK_S)
            except queue.Empty:
                key = None
            try:
                if key is not None:
                    self._load(key)
                self._expire_idle()
            except Exception:
                log.exception("models on demand: a pass failed")

    def _load(self, key: Key) -> None:
        with self.reconciler.locked():
            error: BaseException | None = None
            entry = self.table.entry(*key)
            if entry is not None and entry.state is VersionState.AVAILABLE:
                self._make_room(key)
                error = self.reconciler.load_available(*key)
            elif entry is None or entry.state is not VersionState.READY:
                state = entry.state if entry is not None else "gone from the repository"
                error = ModelLoadFailed(f"Model '{key[0]}' version {key[1]} is {state}.")
        with self._lock:
            future = self._pending.pop(key)
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    # --- memory --------------------------------------------------------------------------
    def _estimate(self, key: Key) -> int:
        entry = self.table.entry(*key)
        if entry is not None and entry.memory_bytes is not None:
            return entry.memory_bytes
        measured = sorted(e.memory_bytes for e in self.table.index() if e.memory_bytes is not None)
        if measured:  # the median: a process's first load also pays the runtime's start
            return measured[len(measured) // 2]
        return int(self.reconciler.files_bytes(*key) * _FILES_TO_RESIDENT)

    def _make_room(self, key: Key) -> None:
        """Evict the least recently used unpinned versions until ``key`` fits the budget."""
        if self.budget_bytes is None:
            return
        need = self._estimate(key)
        while True:
            loaded = self.table.resident()
            used = sum(e.memory_bytes or 0 for e in loaded)
            if used + need <= self.budget_bytes:
                return
            victims = [e for e in loaded if e.state is VersionState.READY and self._evictable(e)]
            if not victims:
                log.warning(
                    "model %s version %s: loading beyond the memory budget (%.0f MB used of "
                    "%.0f MB, every loaded model is pinned)",
                    *key,
                    used / 2**20,
                    self.budget_bytes / 2**20,
                )
                return
            victim = min(victims, key=lambda e: e.classifier.last_used if e.classifier else 0)
            self.reconciler.retire(victim, reason="budget", keep_available=True)

    def _evictable(self, entry: ServedVersion) -> bool:
        return not self.reconciler.pinned(entry.model)

    def _expire_idle(self) -> None:
        if self.idle_ttl_s is None:
            return
        now = time.monotonic()
        idle = [
            e
            for e in self.table.resident()
            if e.state is VersionState.READY
            and self._evictable(e)
            and e.classifier is not None
            and now - e.classifier.last_used > self.idle_ttl_s
            and e.classifier.idle
        ]
        if not idle:
            return
        with self.reconciler.locked():
            for entry in idle:
                current = self.table.entry(entry.model, entry.version)
                classifier = entry.classifier
                if (
                    current is not None
                    and classifier is not None
                    and current.classifier is classifier
                    and time.monotonic() - classifier.last_used > self.idle_ttl_s
                ):  # a request may have reached it since: then it stays
                    self.reconciler.retire(current, reason="idle", keep_available=True)
