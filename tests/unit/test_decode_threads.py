"""The decode threads: the most urgent image first once the model has room, stale work refused
while there is none, and what waits cancelled at shutdown."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import pytest

from resnet_service.core.decode_threads import DecodeThreads
from resnet_service.core.errors import Overloaded
from resnet_service.core.priority import BULK, INTERACTIVE


class Room:
    """The model's room, opened and closed by the test."""

    def __init__(self) -> None:
        self.open = threading.Event()

    def __call__(self, timeout_s: float) -> bool:
        return self.open.wait(timeout_s)


def never_stale(_: float) -> Exception | None:
    return None


def test_the_most_urgent_image_goes_first_once_there_is_room() -> None:
    room = Room()
    threads = DecodeThreads(1, room, never_stale)
    order: list[str] = []
    try:
        bulk = threads.submit(lambda: order.append("bulk"), BULK)
        interactive = threads.submit(lambda: order.append("interactive"), INTERACTIVE)
        assert not bulk.done()  # no room: nothing is taken, not even to hold
        room.open.set()
        bulk.result(5)
        interactive.result(5)
        assert order == ["interactive", "bulk"]
    finally:
        threads.shutdown()


def test_stale_work_is_refused_while_the_model_has_no_room() -> None:
    refusal = Overloaded("stale", retry_after_s=1)

    def stale(waited_s: float) -> Exception | None:
        return refusal if waited_s > 0.05 else None

    threads = DecodeThreads(2, Room(), stale)  # the room never opens
    try:
        future = threads.submit(lambda: "decoded", INTERACTIVE)
        with pytest.raises(Overloaded) as refused:
            future.result(5)
        assert refused.value is refusal
    finally:
        threads.shutdown()


def test_shutdown_cancels_what_waits() -> None:
    threads = DecodeThreads(1, Room(), never_stale)
    waiting = threads.submit(lambda: "decoded", BULK)
    threads.shutdown()
    with pytest.raises(CancelledError):
        waiting.result(5)
    with pytest.raises(RuntimeError):
        threads.submit(lambda: "late", INTERACTIVE)
