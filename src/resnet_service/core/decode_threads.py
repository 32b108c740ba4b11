"""A model's decode threads: a fixed set of threads fed from two lanes (``priority.Lanes``),
each taking the next image only once the model has room for it.

Hand-written: ``ThreadPoolExecutor`` keeps one FIFO line and a free thread takes the next item
at once, so a bulk backlog would sit ahead of an interactive image, and a thread would hold an
image (decoded, or waiting to be) while the model has no room. Here an image waits as its bytes
until a thread has room to decode it, and then the most urgent image goes.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Final

from resnet_service.core.priority import Lanes, Priority

#: How long a thread blocks without work it has room for before it looks again (for stale
#: work, and at shutdown); new work and ``wake`` end the wait at once.
_POLL_S: Final = 0.02


@dataclass(frozen=True, slots=True)
class _Job:
    run: Callable[[], Any]
    future: Future[Any]


class DecodeThreads:
    """``submit(fn, priority)`` runs ``fn`` on one of ``threads`` threads once ``room(priority)``
    says the model can take its result (``wake`` when that may have changed); cancelling the
    returned future before it runs drops it. While the threads wait for room, work for which ``stale(seconds waited)`` gives an
    error fails with it at once (a shed queue's old work is refused, not kept for the room)."""

    def __init__(
        self,
        threads: int,
        room: Callable[[Priority], bool],
        stale: Callable[[float], Exception | None],
        name: str = "decode",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lanes: Lanes[_Job] = Lanes(clock=clock)
        self._room = room
        self._stale = stale
        self._stopped = threading.Event()
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}_{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, run: Callable[[], Any], priority: Priority) -> Future[Any]:
        if self._stopped.is_set():
            raise RuntimeError("the decode threads are stopped")
        future: Future[Any] = Future()
        self._lanes.put_nowait(_Job(run, future), priority)
        return future

    def wake(self) -> None:
        """The model's room may have opened: look again now (the model thread calls it)."""
        self._lanes.wake()

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                job = self._lanes.get_if(self._room, _POLL_S)
            except queue.Empty:  # nothing with room: what waits may have gone stale
                self._drop_stale()
                continue
            if not job.future.set_running_or_notify_cancel():
                continue  # the caller is gone
            try:
                job.future.set_result(job.run())
            except BaseException as exc:  # the caller's to handle
                job.future.set_exception(exc)

    def _drop_stale(self) -> None:
        errors: list[Exception] = []

        def stale(waited_s: float) -> bool:
            error = self._stale(waited_s)
            if error is not None:
                errors.append(error)
            return error is not None

        for job, error in zip(self._lanes.drop_stale(stale), errors, strict=True):
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)

    def shutdown(self) -> None:
        """Stop taking work; what waits is cancelled (a running decode finishes)."""
        self._stopped.set()
        while True:
            try:
                self._lanes.get_nowait().future.cancel()
            except queue.Empty:
                return
