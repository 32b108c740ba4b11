"""The engine's contracts, without HTTP: batching, back-pressure, deadlines, failures, threads."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

import numpy as np
import pytest
import torch
from torch import nn

from resnet_service.config import Precision, RuntimeName
from resnet_service.core import priority
from resnet_service.core.engine import InferenceEngine, Scores, softmax
from resnet_service.core.errors import DeadlineExceeded, InferenceFailed, NotReady, Overloaded
from resnet_service.core.images import Pixels, PreprocessSpec, normalise_pixels
from resnet_service.core.priority import BULK, INTERACTIVE
from resnet_service.core.results import top_k
from resnet_service.core.runtime import LOGITS_ONLY, FloatBatch, Forward, ServedModel, Wants
from resnet_service.runtimes.torch_runtime import TorchRuntime
from tests.harness import wait_until

CLASSES = 10


class GatedRuntime:
    """A real (tiny) linear network in numpy whose forward can be held, to make queue states
    deterministic."""

    name: RuntimeName = "torch"
    precision: Precision = "fp32"
    threads = 1

    def __init__(self) -> None:
        self.weight = np.random.default_rng(0).standard_normal((3, CLASSES)).astype(np.float32)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batch_sizes: list[int] = []
        self.bound_threads: list[str] = []
        self.fail = False
        self.drop_one = False

    def bind_thread(self) -> None:
        self.bound_threads.append(threading.current_thread().name)

    def logits(self, batch: FloatBatch) -> FloatBatch:
        out: FloatBatch = batch.mean(axis=(2, 3)) @ self.weight
        return out

    def infer(self, batch: FloatBatch) -> FloatBatch:
        self.batch_sizes.append(int(batch.shape[0]))
        self.entered.set()
        assert self.gate.wait(10)
        if self.fail:
            raise RuntimeError("boom")
        out = self.logits(batch)
        return out[:-1] if self.drop_one else out

    outputs = LOGITS_ONLY

    def forward(self, batch: FloatBatch, wants: Wants) -> Forward:
        return Forward(self.infer(batch))

    def close(self) -> None:
        pass

    def hold(self) -> None:
        self.gate.clear()
        self.entered.clear()


def image(seed: int = 0) -> FloatBatch:
    return np.random.default_rng(seed).standard_normal((3, 224, 224)).astype(np.float32)


@pytest.fixture
def gated() -> GatedRuntime:
    return GatedRuntime()


def make_engine(runtime: object, classes: int = CLASSES, **kwargs: object) -> InferenceEngine:
    options: dict[str, object] = {"max_batch_size": 8, "queue_capacity": 16}
    options.update(kwargs)
    engine = InferenceEngine(runtime, classes, **options)  # type: ignore[arg-type]
    engine.start()
    return engine


@pytest.fixture
def engine(gated: GatedRuntime) -> Iterator[InferenceEngine]:
    eng = make_engine(gated)
    gated.batch_sizes.clear()
    yield eng
    gated.gate.set()
    eng.stop(timeout=5)


def hold_engine(engine: InferenceEngine, gated: GatedRuntime) -> Future[Scores]:
    """Occupy the model thread with one request; returns its future."""
    gated.hold()
    first = engine.submit(image())
    assert gated.entered.wait(5)
    return first


def test_warm_up_runs_every_batch_shape(gated: GatedRuntime) -> None:
    eng = make_engine(gated, max_batch_size=12)
    try:
        assert gated.batch_sizes == [1, 2, 4, 8, 12, 1]  # then one timed warm call
        assert eng.ready
    finally:
        eng.stop()


def test_lone_request_runs_alone_at_once(engine: InferenceEngine, gated: GatedRuntime) -> None:
    result = engine.submit(image()).result(timeout=5)
    assert gated.batch_sizes == [1]
    assert result.batch_size == 1
    assert result.probabilities.shape == (CLASSES,)
    assert result.probabilities.sum() == pytest.approx(1.0, abs=1e-5)


def test_requests_arriving_during_a_batch_form_the_next(
    engine: InferenceEngine, gated: GatedRuntime
) -> None:
    first = hold_engine(engine, gated)
    waiting = [engine.submit(image(i)) for i in range(5)]
    gated.gate.set()
    assert first.result(5).batch_size == 1
    results = [f.result(5) for f in waiting]
    assert gated.batch_sizes == [1, 5]
    assert {r.batch_size for r in results} == {5}


def test_batches_never_exceed_max_size(gated: GatedRuntime) -> None:
    eng = make_engine(gated, max_batch_size=2)
    gated.batch_sizes.clear()
    try:
        first = hold_engine(eng, gated)
        waiting = [eng.submit(image(i)) for i in range(5)]
        gated.gate.set()
        for fut in [first, *waiting]:
            fut.result(5)
        assert gated.batch_sizes == [1, 2, 2, 1]
    finally:
        eng.stop()


def test_results_follow_their_inputs(engine: InferenceEngine, gated: GatedRuntime) -> None:
    inputs = [image(i) for i in range(6)]
    first = hold_engine(engine, gated)
    futures = [engine.submit(x) for x in inputs]
    gated.gate.set()
    first.result(5)
    expected = torch.from_numpy(gated.logits(np.stack(inputs))).softmax(1)
    for row, fut in enumerate(futures):
        got = fut.result(5).probabilities
        np.testing.assert_allclose(got, expected[row].numpy(), atol=1e-6)


def test_full_queue_raises_overloaded_at_once(gated: GatedRuntime) -> None:
    eng = make_engine(gated, queue_capacity=2)
    try:
        first = hold_engine(eng, gated)
        queued = [eng.submit(image()) for _ in range(2)]
        started = time.monotonic()
        with pytest.raises(Overloaded) as info:
            eng.submit(image())
        assert time.monotonic() - started < 1.0
        assert info.value.retry_after_s >= 1
        gated.gate.set()
        for fut in [first, *queued]:
            fut.result(5)  # accepted work is still served
    finally:
        eng.stop()


def test_expired_work_is_dropped(engine: InferenceEngine, gated: GatedRuntime) -> None:
    first = hold_engine(engine, gated)
    doomed = engine.submit(image(), timeout_s=0.05)
    expired_at = time.monotonic() + 0.05
    alive = engine.submit(image(), timeout_s=30)
    wait_until(lambda: time.monotonic() > expired_at, 5, "the short deadline to pass")
    gated.gate.set()
    first.result(5)
    with pytest.raises(DeadlineExceeded):
        doomed.result(5)
    assert alive.result(5).batch_size == 1
    assert gated.batch_sizes == [1, 1]  # the expired one never reached the model


@pytest.mark.parametrize(
    ("fault", "message"),
    [("fail", "boom"), ("drop_one", "outputs for")],  # an exception; an output missing
)
def test_a_failed_batch_reaches_every_waiter(
    engine: InferenceEngine, gated: GatedRuntime, fault: str, message: str
) -> None:
    first = hold_engine(engine, gated)
    setattr(gated, fault, True)
    futures = [first] + [engine.submit(image(i)) for i in range(3)]
    gated.gate.set()
    for fut in futures:
        with pytest.raises(InferenceFailed, match=message):
            fut.result(5)
    setattr(gated, fault, False)
    assert engine.submit(image()).result(5).batch_size == 1  # the engine lives on


def test_wrong_input_shape_is_refused(engine: InferenceEngine) -> None:
    with pytest.raises(InferenceFailed, match="shape"):
        engine.submit(np.zeros((3, 10, 10), dtype=np.float32))


def test_stop_finishes_queued_work_then_refuses(
    engine: InferenceEngine, gated: GatedRuntime
) -> None:
    first = hold_engine(engine, gated)
    queued = [engine.submit(image(i)) for i in range(3)]
    stopper = threading.Thread(target=engine.stop, kwargs={"timeout": 10})
    stopper.start()
    wait_until(lambda: not engine.ready, 5, "the engine to stop accepting work")
    with pytest.raises(NotReady):
        engine.submit(image())
    gated.gate.set()
    stopper.join(10)
    for fut in [first, *queued]:
        assert fut.result(5).batch_size >= 1


async def test_cancelled_waiters_are_skipped(engine: InferenceEngine, gated: GatedRuntime) -> None:
    first = hold_engine(engine, gated)
    task = asyncio.create_task(engine.infer(image()))
    for _ in range(1000):  # until the waiter is queued (one event-loop turn, normally)
        if engine.queue_depth:
            break
        await asyncio.sleep(0)
    assert engine.queue_depth == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gated.gate.set()
    first.result(5)
    assert (await engine.infer(image())).batch_size == 1
    assert gated.batch_sizes == [1, 1]


def test_the_runtime_is_bound_on_the_engine_thread(gated: GatedRuntime) -> None:
    eng = make_engine(gated)
    try:
        eng.submit(image()).result(5)
        assert gated.bound_threads == ["inference-engine"]
    finally:
        eng.stop()


class ThreadProbe(nn.Module):
    """Records torch's intra-op thread count where the forward runs."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, CLASSES)
        self.threads_seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.threads_seen.append(torch.get_num_threads())
        out: torch.Tensor = self.head(x.mean(dim=(2, 3)))
        return out


def test_torch_threads_are_fixed_on_the_engine_thread() -> None:
    probe = ThreadProbe()
    eng = make_engine(TorchRuntime(probe, "fp32", threads=2))
    try:
        eng.submit(image()).result(5)
        assert set(probe.threads_seen) == {2}
    finally:
        eng.stop()
        torch.set_num_threads(1)  # torch's setting is process-wide: give the tests theirs back


def test_not_ready_before_start(gated: GatedRuntime) -> None:
    eng = InferenceEngine(gated, CLASSES)
    with pytest.raises(NotReady):
        eng.submit(image())


def test_softmax_and_top_k_match_torch() -> None:
    logits = np.random.default_rng(3).standard_normal((4, 50)).astype(np.float32) * 20
    probs = softmax(logits.copy())
    expected = torch.from_numpy(logits).softmax(1)
    np.testing.assert_allclose(probs, expected.numpy(), rtol=1e-5, atol=1e-7)
    for row in range(4):
        indices, scores = top_k(probs[row], 7)
        want = expected[row].topk(7)
        assert indices == want.indices.tolist()
        assert scores == pytest.approx(want.values.tolist(), abs=1e-6)


def test_top_k_ties_keep_index_order() -> None:
    probs = np.array([0.1, 0.3, 0.3, 0.0, 0.3], dtype=np.float32)
    assert top_k(probs, 2)[0] == [1, 2]
    assert top_k(probs, 5)[0] == [1, 2, 4, 0, 3]


async def test_real_int8_model_batches_concurrent_work(int8_model: ServedModel) -> None:
    eng = make_engine(int8_model.runtime, len(int8_model.labels), queue_capacity=64)
    try:
        inputs = [image(i) for i in range(24)]
        results = await asyncio.gather(*(eng.infer(x) for x in inputs))
        assert max(r.batch_size for r in results) > 1
        assert eng.items_run == 24
        expected = softmax(int8_model.runtime.infer(np.stack(inputs)))
        for row, result in enumerate(results):
            assert int(result.probabilities.argmax()) == int(expected[row].argmax())
            np.testing.assert_allclose(result.probabilities, expected[row], atol=1e-4)
    finally:
        eng.stop()


def pixels(seed: int = 0) -> Pixels:
    return np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)


def test_8bit_images_are_normalised_batched_for_a_float_runtime(gated: GatedRuntime) -> None:
    normalise = functools.partial(normalise_pixels, spec=PreprocessSpec())
    eng = make_engine(gated, normalise=normalise)
    try:
        gated.batch_sizes.clear()
        first = hold_engine(eng, gated)
        images = [pixels(i) for i in range(3)]
        futures = [eng.submit(img) for img in images] + [eng.submit(image(7))]  # mixed
        gated.gate.set()
        first.result(5)
        got = [f.result(5).probabilities for f in futures]
        assert gated.batch_sizes == [1, 4]  # the images and the float array shared a batch
        for img, probs in zip([*[normalise(i) for i in images], image(7)], got, strict=True):
            expected = softmax(gated.logits(img[None]))[0]
            np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    finally:
        eng.stop(timeout=5)


def test_8bit_images_need_a_way_to_be_normalised(engine: InferenceEngine) -> None:
    with pytest.raises(InferenceFailed, match="uint8 image"):
        engine.submit(pixels())  # this engine has no normaliser and a float-only runtime
    with pytest.raises(InferenceFailed, match="shape"):
        engine.submit(pixels()[:100])


# --- the compute gate shared by a worker's engines ---------------------------------------------------------------
def test_a_batch_is_sliced_only_while_another_engine_is_active() -> None:
    from resnet_service.core.engine import ComputeGate

    gate = ComputeGate()
    one, other = object(), object()
    assert gate.slice_for(one, 8) == 8  # alone: the whole batch in one turn
    assert gate.slice_for(other, 8) == ComputeGate.shared_slice
    assert gate.slice_for(one, 8) == ComputeGate.shared_slice
    assert gate.slice_for(one, 1) == 1


def test_beside_another_active_model_a_batch_runs_in_slices_with_the_same_results(
    gated: GatedRuntime,
) -> None:
    from resnet_service.core.engine import ComputeGate

    gate = ComputeGate()
    other_runtime = GatedRuntime()
    mine = make_engine(gated, compute=gate)
    other = make_engine(other_runtime, compute=gate)
    try:
        other.submit(image(99)).result(5)  # the other model is active
        gated.batch_sizes.clear()
        inputs = [image(i) for i in range(5)]
        first = hold_engine(mine, gated)
        futures = [mine.submit(x) for x in inputs]
        gated.gate.set()
        first.result(5)
        expected = torch.from_numpy(gated.logits(np.stack(inputs))).softmax(1)
        for row, fut in enumerate(futures):
            scores = fut.result(5)
            assert scores.batch_size == 5  # one batch of the engine ...
            np.testing.assert_allclose(scores.probabilities, expected[row].numpy(), atol=1e-6)
        assert gated.batch_sizes == [1] + [1] * 5  # ... in turns of one image at the gate
    finally:
        mine.stop(timeout=5)
        other.stop(timeout=5)


def test_room_opens_when_the_model_takes_queued_work(
    engine: InferenceEngine, gated: GatedRuntime
) -> None:
    """What the decode threads ask: fewer than ``depth`` of what goes before an image wait,
    and for bulk, no interactive work queued or running; told when it may have opened."""
    opened = threading.Event()
    engine.on_room(opened.set)
    first = hold_engine(engine, gated)  # an interactive batch runs
    assert not engine.has_room(BULK, 8)  # the cores are the interactive batch's
    assert engine.has_room(INTERACTIVE, 1)
    queued = [engine.submit(image(i)) for i in range(3)]
    assert not engine.has_room(INTERACTIVE, 3)  # three wait: no room below three
    assert engine.has_room(INTERACTIVE, 4)
    with priority.requested(BULK):
        bulk = engine.submit(image(9))
    assert engine.has_room(INTERACTIVE, 4)  # a bulk image waits behind interactive ones
    opened.clear()
    gated.gate.set()  # the model takes the three, then the bulk image, and is idle again
    for future in [first, *queued, bulk]:
        assert future.result(timeout=5).probabilities.shape == (CLASSES,)
    assert opened.wait(5)
    wait_until(lambda: engine.has_room(BULK, 1), 5, "room for bulk work")
