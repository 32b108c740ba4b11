"""Priority classes: the header's syntax, the two lanes (interactive first, bulk never starved),
the engine's batches and admission's order of refusal."""

from __future__ import annotations

import queue

import numpy as np
import pytest

from resnet_service.core import priority
from resnet_service.core.admission import AdmissionPolicy, Workload
from resnet_service.core.engine import BULK_SLICE
from resnet_service.core.errors import Overloaded
from resnet_service.core.priority import BULK, INTERACTIVE, Lanes
from tests.unit.test_engine import GatedRuntime, hold_engine, image, make_engine


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("u=7", BULK),
        ("u=7, i", BULK),
        ("i, u=7", BULK),
        (" u = 7 ", BULK),
        ("u=3", INTERACTIVE),
        ("u=6", INTERACTIVE),
        ("u=0, i", INTERACTIVE),
        ("i", INTERACTIVE),
        ("", INTERACTIVE),
        (None, INTERACTIVE),
        ("u=seven", INTERACTIVE),  # does not parse: ignored, as RFC 9218 says
        ("garbage;;==", INTERACTIVE),
    ],
)
def test_the_priority_header(value: str | None, expected: str) -> None:
    assert priority.from_header(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bulk", BULK),
        ("interactive", INTERACTIVE),
        (0, None),
        (1, INTERACTIVE),
        (2, BULK),
        (9, BULK),
    ],
)
def test_the_oip_priority_parameter(value: object, expected: str | None) -> None:
    assert priority.from_parameter(value) == expected


@pytest.mark.parametrize("value", ["urgent", "BULK", -1, True, 1.5, None, ["bulk"]])
def test_a_priority_parameter_that_is_no_class(value: object) -> None:
    with pytest.raises(ValueError, match="'interactive' or 'bulk'"):
        priority.from_parameter(value)


def test_the_class_travels_with_the_context() -> None:
    assert priority.current() == INTERACTIVE
    with priority.requested(BULK):
        assert priority.current() == BULK
    assert priority.current() == INTERACTIVE


def test_lanes_serve_interactive_first_and_bulk_once_aged() -> None:
    now = [0.0]
    lanes: Lanes[str] = Lanes(maxsize=4, age_bound_s=1.0, clock=lambda: now[0])
    lanes.put_nowait("b1", BULK)
    lanes.put_nowait("i1", INTERACTIVE)
    lanes.put_nowait("b2", BULK)
    lanes.put_nowait("i2", INTERACTIVE)
    with pytest.raises(queue.Full):
        lanes.put_nowait("over", INTERACTIVE)
    assert lanes.get_nowait() == "i1"  # interactive first ...
    now[0] = 1.5
    assert lanes.get_nowait() == "b1"  # ... unless bulk waited past the bound
    assert lanes.get_nowait() == "b2"  # b2 arrived at 0 too: aged as well
    assert lanes.get_nowait() == "i2"
    with pytest.raises(queue.Empty):
        lanes.get(timeout=0.01)


def test_a_lane_can_be_asked_for_alone() -> None:
    lanes: Lanes[str] = Lanes()
    lanes.put_nowait("b", BULK)
    with pytest.raises(queue.Empty):
        lanes.get_nowait(INTERACTIVE)
    with pytest.raises(queue.Empty):
        lanes.get(timeout=0.01, priority=INTERACTIVE)
    assert lanes.qsize(BULK) == 1
    assert lanes.get_nowait(BULK) == "b"


def test_interactive_work_overtakes_bulk_and_is_batched_apart() -> None:
    gated = GatedRuntime()
    engine = make_engine(gated)
    try:
        first = hold_engine(engine, gated)  # the model is busy with one image
        gated.batch_sizes.clear()
        bulk = [engine.submit(image(i), priority=BULK) for i in range(5)]
        interactive = [engine.submit(image(10 + i), priority=INTERACTIVE) for i in range(2)]
        gated.gate.set()
        first.result(5)
        for future in interactive:
            assert future.result(5).batch_size == 2  # the two, without bulk images
        for future in bulk:
            assert future.result(5).batch_size <= BULK_SLICE  # small: interactive came lately
        # After the held image: the interactive pair, then bulk in small batches.
        assert gated.batch_sizes[0] == 2
        assert max(gated.batch_sizes[1:]) <= BULK_SLICE
        np.testing.assert_allclose(
            interactive[0].result(5).probabilities, engine.submit(image(10)).result(5).probabilities
        )
    finally:
        gated.gate.set()
        engine.stop(timeout=5)


def test_alone_bulk_work_gets_whole_batches() -> None:
    gated = GatedRuntime()
    engine = make_engine(gated)
    try:
        gated.hold()
        first = engine.submit(image(), priority=BULK)  # no interactive work at all
        assert gated.entered.wait(5)
        bulk = [engine.submit(image(i), priority=BULK) for i in range(8)]
        gated.gate.set()
        first.result(5)
        assert [f.result(5).batch_size for f in bulk] == [8] * 8
    finally:
        engine.stop(timeout=5)


def test_while_shedding_bulk_is_refused_and_interactive_admitted() -> None:
    policy = AdmissionPolicy(bound_s=15.0, target_s=0.05, interval_s=0.1)
    workload = Workload(policy, initial_cost_s=0.01)
    held = workload.admit(BULK)  # not shedding: bulk is admitted like any work
    workload.shedding = True
    with pytest.raises(Overloaded, match="bulk"):
        workload.admit(BULK)
    workload.admit(INTERACTIVE).release()  # within the target: admitted
    held.release()
    workload.admit(BULK).release()  # nothing in flight: even bulk goes
