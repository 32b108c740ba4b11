"""The tag job: a listing thread, worker processes, and the writer that commits parts.

The main thread hands each worker at most two tasks at a time (16 inputs each) and commits
the rows that come back every ``commit_rows`` rows or ``commit_interval_s`` seconds, so a
crash re-does at most one interval. Between the listing and the workers sits a bounded queue:
memory holds a few thousand listed inputs, never the library. A worker that dies is replaced
and its tasks handed out again; an input that was in a task that killed two workers gets an
error row instead of a third try. SIGINT and SIGTERM stop the listing, let the tasks out
finish, commit, and exit: a rerun resumes.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Final

from resnet_service.faces.tag.rows import WORKER_CRASHED, RowError, TagRow
from resnet_service.faces.tag.sources import Item
from resnet_service.faces.tag.store import Committed, OutputStore, PendingRows
from resnet_service.faces.tag.worker import Done, Failed, Ready, Task, WorkerSpec, main

log = logging.getLogger(__name__)

#: Inputs a task carries: two batches of 8, so a worker decodes while the job writes.
TASK_ITEMS: Final = 16
#: Tasks out per worker: one it works on, one waiting in its pipe.
TASKS_PER_WORKER: Final = 2
#: Listed inputs held between the listing and the workers.
LISTING_BUFFER: Final = 4096
#: A task in which this many workers died is answered with error rows.
MAX_TASK_DEATHS: Final = 2
_END: Final = object()


@dataclass(frozen=True, slots=True)
class JobOptions:
    processes: int
    commit_rows: int = 1000
    commit_interval_s: float = 5.0
    task_items: int = TASK_ITEMS


@dataclass(slots=True)
class Progress:
    """What the job has done so far (the progress bar and the summary read it)."""

    listed: int = 0
    skipped: int = 0
    done: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    committed_rows: int = 0
    listing_done: bool = False
    worker_restarts: int = 0
    #: When every worker had its model loaded (monotonic); the throughput counts from here.
    workers_ready_at: float | None = None

    @property
    def error_rows(self) -> int:
        return sum(self.errors.values())


class JobFailed(Exception):
    """The job itself could not go on (the model would not load, a worker kept dying)."""


def to_tag(
    items: Iterable[Item], committed: Committed, progress: Progress, stop: threading.Event
) -> Iterator[Item]:
    """The listed inputs that are not committed as they are now, each path once (a local job's
    listing and the Ray job's windows both take their inputs from here)."""
    seen: set[str] = set()
    for item in items:
        if stop.is_set():
            return
        progress.listed += 1
        if item.path in seen or (
            item.error is None and committed.has(item.path, item.size, item.source_version)
        ):
            progress.skipped += 1
            continue
        seen.add(item.path)
        yield item
    progress.listing_done = True


class _Listing(threading.Thread):
    """Lists in the background into a bounded queue, skipping what is committed."""

    def __init__(self, items: Iterable[Item], committed: Committed, progress: Progress) -> None:
        super().__init__(name="tag-listing", daemon=True)
        self.items = items
        self.committed = committed
        self.progress = progress
        self.queue: queue.Queue[object] = queue.Queue(LISTING_BUFFER)
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for item in to_tag(self.items, self.committed, self.progress, self.stop):
                while not self.stop.is_set():
                    try:
                        self.queue.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # a source that failed mid-way: the job reports it
            self.error = exc
        finally:
            self.progress.listing_done = True
            self.queue.put(_END)

    def take(self, count: int) -> tuple[list[Item], bool]:
        """Up to ``count`` listed inputs without waiting long; True once the listing ended."""
        items: list[Item] = []
        deadline = time.monotonic() + 0.05
        while len(items) < count:
            try:
                got = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return items, False
            if got is _END:
                return items, True
            assert isinstance(got, Item)
            items.append(got)
        return items, False


@dataclass(slots=True)
class _Worker:
    process: BaseProcess
    conn: Connection
    tasks: dict[int, Task] = field(default_factory=dict)
    ready: bool = False


class TagJob:
    """Runs the inputs through worker processes into the store."""

    def __init__(
        self,
        spec: WorkerSpec,
        store: OutputStore,
        options: JobOptions,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.spec = spec
        self.store = store
        self.options = options
        self.progress = Progress()
        self.on_progress = on_progress
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._pending = PendingRows(store, options.commit_rows, options.commit_interval_s)
        self._task_ids = iter(range(1, 1 << 62))
        self._deaths: Counter[int] = Counter()
        self._retry: list[Task] = []
        self._stopping = threading.Event()
        self._listing_ended = False
        #: The signal that stopped the job, if one did.
        self.stopped_by: int | None = None

    # --- workers -----------------------------------------------------------------------------
    def _start_worker(self) -> _Worker:
        ours, theirs = self._ctx.Pipe()
        process = self._ctx.Process(
            target=main, args=(theirs, self.spec, os.getpid()), name="tag-worker", daemon=True
        )
        process.start()
        theirs.close()
        worker = _Worker(process, ours)
        self._workers.append(worker)
        return worker

    def _wait_ready(self, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        for worker in self._workers:
            while not worker.ready:
                if not worker.conn.poll(max(0.0, deadline - time.monotonic())):
                    raise JobFailed(f"a worker did not load the model within {timeout_s:.0f} s")
                self._receive(worker)

    def _receive(self, worker: _Worker) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            self._replace(worker)
            return
        if isinstance(message, Ready):
            worker.ready = True
        elif isinstance(message, Failed):
            raise JobFailed(f"a worker could not open the model: {message.reason}")
        elif isinstance(message, Done):
            worker.tasks.pop(message.task_id, None)
            self._deaths.pop(message.task_id, None)
            self._add(message.rows)

    def _replace(self, dead: _Worker) -> None:
        """A worker died: its tasks go out again (or become error rows), a new one starts."""
        dead.conn.close()
        dead.process.join(5)
        self._workers.remove(dead)
        self.progress.worker_restarts += 1
        log.warning("a tag worker died (exit code %s); starting another", dead.process.exitcode)
        if self.progress.worker_restarts > 10 * max(1, self.options.processes):
            raise JobFailed("tag workers keep dying; see the messages above")
        for task in dead.tasks.values():
            self._deaths[task.id] += 1
            if self._deaths[task.id] >= MAX_TASK_DEATHS:
                self._add([_crashed(item) for item in task.items])
            else:
                self._retry.append(task)
        replacement = self._start_worker()
        self._wait_ready_one(replacement)

    def _wait_ready_one(self, worker: _Worker) -> None:
        while not worker.ready:
            if not worker.conn.poll(600):
                raise JobFailed("a replacement worker did not load the model")
            self._receive(worker)

    def _dispatch(self, worker: _Worker, task: Task) -> None:
        worker.tasks[task.id] = task
        try:
            worker.conn.send(task)
        except (BrokenPipeError, OSError):
            self._replace(worker)

    # --- rows --------------------------------------------------------------------------------
    def _add(self, rows: list[TagRow]) -> None:
        self._pending.add(self.store.table(rows))
        self.progress.done += len(rows)
        for row in rows:
            if row.error is not None:
                self.progress.errors[row.error.code] += 1

    def _maybe_commit(self, force: bool = False) -> None:
        self.progress.committed_rows += self._pending.commit_if_due(force)

    # --- the run -----------------------------------------------------------------------------
    def request_stop(self, signum: int) -> None:
        """Stop after the inputs out are done and committed (a signal handler calls this)."""
        self.stopped_by = signum
        self._stopping.set()

    def run(self, items: Iterator[Item], committed: Committed) -> Progress:
        """Tag ``items`` (those not in ``committed``); returns what was done."""
        listing = _Listing(items, committed, self.progress)
        for _ in range(self.options.processes):
            self._start_worker()
        try:
            self._wait_ready()
            self.progress.workers_ready_at = time.monotonic()
            listing.start()
            self._loop(listing)
            self._maybe_commit(force=True)
        finally:
            listing.stop.set()
            self._stop_workers()
        if listing.error is not None and not self._stopping.is_set():
            raise JobFailed(f"listing failed: {listing.error}") from listing.error
        return self.progress

    def _loop(self, listing: _Listing) -> None:
        while True:
            if self._stopping.is_set():
                listing.stop.set()
                self._listing_ended = True
            for worker in list(self._workers):
                while len(worker.tasks) < TASKS_PER_WORKER:
                    task = self._next_task(listing)
                    if task is None:
                        break
                    self._dispatch(worker, task)
            idle = all(not w.tasks for w in self._workers)
            if self._listing_ended and not self._retry and idle:
                return
            self._pump(0.05)
            self._maybe_commit()
            if self.on_progress is not None:
                self.on_progress(self.progress)

    def _next_task(self, listing: _Listing) -> Task | None:
        if self._retry:
            return self._retry.pop()
        if self._listing_ended:
            return None
        items, self._listing_ended = listing.take(self.options.task_items)
        return Task(next(self._task_ids), items) if items else None

    def _pump(self, timeout_s: float) -> None:
        """Take whatever the workers sent; notice one that died."""
        by_handle: dict[object, _Worker] = {}
        for worker in self._workers:
            by_handle[worker.conn] = worker
            by_handle[worker.process.sentinel] = worker
        for handle in wait(list(by_handle), timeout_s):  # type: ignore[arg-type]
            worker = by_handle[handle]
            if worker not in self._workers:
                continue  # replaced while handling another handle of this round
            if handle is worker.conn or worker.conn.poll():
                self._receive(worker)
            elif not worker.process.is_alive():
                self._replace(worker)

    def _stop_workers(self) -> None:
        for worker in self._workers:
            with contextlib.suppress(OSError):
                worker.conn.send(None)
        for worker in self._workers:
            worker.process.join(10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(5)
            worker.conn.close()
        self._workers = []


def _crashed(item: Item) -> TagRow:
    return TagRow(
        item.path,
        item.size,
        item.source_version,
        error=RowError(
            WORKER_CRASHED,
            f"a worker process died {MAX_TASK_DEATHS} times while it held this input (among "
            f"{TASK_ITEMS}); it may crash the decoder, or memory ran out",
        ),
    )


def install_stop_handlers(request_stop: Callable[[int], None]) -> Callable[[], None]:
    """SIGINT and SIGTERM stop the job cleanly (``request_stop``); returns the undo."""

    def handler(signum: int, frame: FrameType | None) -> None:
        del frame
        log.warning("signal %d: finishing the inputs out, committing, then stopping", signum)
        request_stop(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def undo() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return undo
