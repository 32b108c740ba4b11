"""The decode threads: the most urgent image first once the model has room, stale work refused
while there is none, and what waits cancelled at shutdown."""

from __future__ import annotations

from concurrent.futures import CancelledError

import pytest

from resnet_service.core import priority
from resnet_service.core.decode_threads import DecodeThreads
from resnet_service.core.errors import Overloaded
from resnet_service.core.priority import BULK, INTERACTIVE, Priority


class Room:
    """The model's room, opened by the test for each class."""

    def __init__(self) -> None:
        self.classes: set[Priority] = set()

    def __call__(self, wanted: Priority) -> bool:
        return wanted in self.classes

    def open(self, threads: DecodeThreads, *classes: Priority) -> None:
        self.classes.update(classes)
        threads.wake()  # as the engine does when it takes work or ends a batch


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
        room.open(threads, INTERACTIVE, BULK)
        bulk.result(5)
        interactive.result(5)
        assert order == ["interactive", "bulk"]
    finally:
        threads.shutdown()


def test_interactive_work_goes_while_bulk_work_has_no_room() -> None:
    room = Room()
    threads = DecodeThreads(1, room, never_stale)
    try:
        bulk = threads.submit(lambda: "bulk", BULK)
        room.open(threads, INTERACTIVE)  # an interactive batch holds the model: bulk waits
        assert threads.submit(lambda: "interactive", INTERACTIVE).result(5) == "interactive"
        assert not bulk.done()
        room.open(threads, BULK)
        assert bulk.result(5) == "bulk"
    finally:
        threads.shutdown()


def test_an_aged_bulk_image_goes_with_interactive_room() -> None:
    """The age bound holds while interactive work keeps the model busy."""
    room = Room()
    lanes_age_s = priority.BULK_AGE_BOUND_S
    clock = [0.0]
    threads = DecodeThreads(1, room, never_stale, clock=lambda: clock[0])
    try:
        bulk = threads.submit(lambda: "bulk", BULK)
        clock[0] = lanes_age_s + 0.1
        room.open(threads, INTERACTIVE)
        assert bulk.result(5) == "bulk"
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
