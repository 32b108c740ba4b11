"""Request priority: ``interactive`` (the default: someone waits on the answer) or ``bulk``
(a pipeline, a tagging loop), and the two-lane queues that serve interactive work first.

A request says it is bulk with RFC 9218's lowest urgency, ``Priority: u=7`` (the RFC reserves
it for background work such as software updates), on HTTP (the JSON API and OIP REST) and as
gRPC metadata. Where work waits (the decode threads' line, the model's queue) interactive work
is taken first; a bulk item that has waited longer than ``BULK_AGE_BOUND_S`` is taken before
newer interactive work, so bulk work is delayed under pressure, never starved.

The class travels in a context variable, set by the face for the request's task: the core's
calls (``Classifier.classify`` and the engine's ``submit``) read it without every face and
route passing it along.

``Lanes`` is hand-written: the standard library's queues are FIFO or strictly by priority (which
starves the lower class), and neither has an age bound.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Final, Generic, Literal, TypeVar

Priority = Literal["interactive", "bulk"]
INTERACTIVE: Final[Priority] = "interactive"
BULK: Final[Priority] = "bulk"
PRIORITIES: Final[tuple[Priority, ...]] = (INTERACTIVE, BULK)

#: A bulk item waiting longer than this is served before newer interactive work.
BULK_AGE_BOUND_S: Final = 1.0
#: RFC 9218's urgency that marks a request bulk (its lowest, "background").
BULK_URGENCY: Final = 7

_current: ContextVar[Priority] = ContextVar("priority", default=INTERACTIVE)

T = TypeVar("T")


def current() -> Priority:
    """The class of the request being served here (interactive unless a face said bulk)."""
    return _current.get()


@contextmanager
def requested(priority: Priority) -> Iterator[None]:
    """Serve what runs inside as ``priority``."""
    token = _current.set(priority)
    try:
        yield
    finally:
        _current.reset(token)


def from_header(value: str | None) -> Priority:
    """The class an RFC 9218 ``Priority`` field value asks for: bulk for ``u=7``. A value that
    does not parse is ignored (the RFC's rule), which leaves the default."""
    if not value:
        return INTERACTIVE
    for member in value.split(","):
        key, _, urgency = member.strip().partition("=")
        if key.strip() == "u":
            return BULK if urgency.strip() == str(BULK_URGENCY) else INTERACTIVE
    return INTERACTIVE


def from_parameter(value: object) -> Priority | None:
    """The class an OIP ``priority`` request parameter asks for, None for the default (then the
    transport's header or metadata decides). A name (``interactive``, ``bulk``), or Triton's
    levels as tritonclient's ``priority=`` sends them: 0 is the default, 1 the highest (here
    interactive) and any lower level (2 and up) bulk. ValueError says what is accepted."""
    if isinstance(value, str) and value in PRIORITIES:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return None if value == 0 else INTERACTIVE if value == 1 else BULK
    raise ValueError(
        f"priority {value!r} is not a class: send 'interactive' or 'bulk', or a Triton level "
        "(0 default, 1 interactive, 2 or more bulk)."
    )


class Lanes(Generic[T]):
    """A bounded queue of two lanes: interactive first, bulk once it has aged past the bound.
    ``put_nowait``/``get``/``get_nowait``/``qsize`` as ``queue.Queue`` (raising its ``Full``
    and ``Empty``), safe from any thread."""

    def __init__(
        self,
        maxsize: int = 0,
        age_bound_s: float = BULK_AGE_BOUND_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.maxsize = maxsize
        self._age_bound_s = age_bound_s
        self._clock = clock
        self._lanes: dict[Priority, collections.deque[tuple[float, T]]] = {
            p: collections.deque() for p in PRIORITIES
        }
        self._changed = threading.Condition()

    def qsize(self, priority: Priority | None = None) -> int:
        if priority is not None:
            return len(self._lanes[priority])
        return sum(len(lane) for lane in self._lanes.values())

    def put_nowait(self, item: T, priority: Priority = INTERACTIVE) -> None:
        with self._changed:
            if self.maxsize and self.qsize() >= self.maxsize:
                raise queue.Full
            self._lanes[priority].append((self._clock(), item))
            self._changed.notify()

    def get_nowait(self, priority: Priority | None = None) -> T:
        """The next item (of ``priority`` only, when given); ``queue.Empty`` when none."""
        with self._changed:
            return self._take(priority)

    def get(self, timeout: float | None = None, priority: Priority | None = None) -> T:
        """The next item (of ``priority`` only, when given), waiting up to ``timeout``."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.qsize(priority) > 0, timeout):
                raise queue.Empty
            return self._take(priority)

    def get_if(self, allowed: Callable[[Priority], bool], timeout: float) -> T:
        """The next item whose class ``allowed`` says may go now, waiting up to ``timeout``
        (``queue.Empty`` then); ``wake`` makes it ask again. An aged bulk item is asked for as
        interactive, so that the age bound holds however busy interactive work keeps the
        model."""
        chosen: list[Priority] = []

        def ready() -> bool:
            lane = self._choose(allowed)
            chosen[:] = [] if lane is None else [lane]
            return lane is not None

        with self._changed:
            if not self._changed.wait_for(ready, timeout):
                raise queue.Empty
            return self._lanes[chosen[0]].popleft()[1]

    def wake(self) -> None:
        """Wake every ``get_if`` to ask ``allowed`` again."""
        with self._changed:
            self._changed.notify_all()

    def _choose(self, allowed: Callable[[Priority], bool]) -> Priority | None:
        interactive, bulk = self._lanes[INTERACTIVE], self._lanes[BULK]
        if bulk and self._clock() - bulk[0][0] > self._age_bound_s and allowed(INTERACTIVE):
            return BULK
        if interactive and allowed(INTERACTIVE):
            return INTERACTIVE
        if bulk and allowed(BULK):
            return BULK
        return None

    def drop_stale(self, stale: Callable[[float], bool]) -> list[T]:
        """Take out, oldest first in each lane, every item for which ``stale(seconds waited)``
        holds (the heads: waits only grow towards them)."""
        dropped: list[T] = []
        with self._changed:
            now = self._clock()
            for lane in self._lanes.values():
                while lane and stale(now - lane[0][0]):
                    dropped.append(lane.popleft()[1])
        return dropped

    def _take(self, priority: Priority | None) -> T:
        if priority is not None:
            lane = self._lanes[priority]
            if not lane:
                raise queue.Empty
            return lane.popleft()[1]
        interactive, bulk = self._lanes[INTERACTIVE], self._lanes[BULK]
        aged = bool(bulk) and self._clock() - bulk[0][0] > self._age_bound_s
        if interactive and not aged:
            return interactive.popleft()[1]
        if bulk:
            return bulk.popleft()[1]
        raise queue.Empty
