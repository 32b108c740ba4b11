"""The engine's contracts, without HTTP: batching, back-pressure, deadlines, failures, threads."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

import pytest
import torch
from torch import nn

from resnet_service.engine import InferenceEngine, Prediction
from resnet_service.errors import DeadlineExceeded, InferenceFailed, NotReady, Overloaded
from resnet_service.model.loader import LoadedModel

LABELS = [f"class-{i}" for i in range(10)]


class GatedModel(nn.Module):
    """A real (tiny) network whose forward can be held, to make queue states deterministic."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 10)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batch_sizes: list[int] = []
        self.threads_seen: list[int] = []
        self.fail = False
        self.drop_one = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(int(x.shape[0]))
        self.threads_seen.append(torch.get_num_threads())
        self.entered.set()
        assert self.gate.wait(10)
        if self.fail:
            raise RuntimeError("boom")
        out: torch.Tensor = self.head(x.mean(dim=(2, 3)))
        return out[:-1] if self.drop_one else out

    def hold(self) -> None:
        self.gate.clear()
        self.entered.clear()


def tensor(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 224, 224, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def gated() -> GatedModel:
    return GatedModel().eval()


def make_engine(model: nn.Module, labels: list[str] = LABELS, **kwargs: object) -> InferenceEngine:
    options: dict[str, object] = {"max_batch_size": 8, "queue_capacity": 16, "torch_threads": 1}
    options.update(kwargs)
    engine = InferenceEngine(model, labels, **options)  # type: ignore[arg-type]
    engine.start()
    return engine


@pytest.fixture
def engine(gated: GatedModel) -> Iterator[InferenceEngine]:
    eng = make_engine(gated)
    gated.batch_sizes.clear()
    yield eng
    gated.gate.set()
    eng.stop(timeout=5)


def hold_engine(engine: InferenceEngine, gated: GatedModel) -> Future[Prediction]:
    """Occupy the model thread with one request; returns its future."""
    gated.hold()
    first = engine.submit(tensor(), 3)
    assert gated.entered.wait(5)
    return first


def test_warm_up_runs_every_batch_shape(gated: GatedModel) -> None:
    eng = make_engine(gated, max_batch_size=12)
    try:
        assert gated.batch_sizes == [1, 2, 4, 8, 12]
        assert eng.ready
    finally:
        eng.stop()


def test_lone_request_runs_alone_at_once(engine: InferenceEngine, gated: GatedModel) -> None:
    result = engine.submit(tensor(), 3).result(timeout=5)
    assert gated.batch_sizes == [1]
    assert result.batch_size == 1
    assert len(result.indices) == 3
    assert result.labels == [LABELS[i] for i in result.indices]
    assert result.scores == sorted(result.scores, reverse=True)


def test_requests_arriving_during_a_batch_form_the_next(
    engine: InferenceEngine, gated: GatedModel
) -> None:
    first = hold_engine(engine, gated)
    waiting = [engine.submit(tensor(i), 2) for i in range(5)]
    gated.gate.set()
    assert first.result(5).batch_size == 1
    results = [f.result(5) for f in waiting]
    assert gated.batch_sizes == [1, 5]
    assert {r.batch_size for r in results} == {5}


def test_batches_never_exceed_max_size(gated: GatedModel) -> None:
    eng = make_engine(gated, max_batch_size=2)
    gated.batch_sizes.clear()
    try:
        first = hold_engine(eng, gated)
        waiting = [eng.submit(tensor(i), 1) for i in range(5)]
        gated.gate.set()
        for fut in [first, *waiting]:
            fut.result(5)
        assert gated.batch_sizes == [1, 2, 2, 1]
    finally:
        eng.stop()


def test_results_follow_their_inputs(engine: InferenceEngine, gated: GatedModel) -> None:
    inputs = [tensor(i) for i in range(6)]
    first = hold_engine(engine, gated)
    futures = [engine.submit(t, 10) for t in inputs]
    gated.gate.set()
    first.result(5)
    with torch.inference_mode():
        expected = gated.head(torch.stack(inputs).mean(dim=(2, 3))).softmax(1)
    for row, fut in enumerate(futures):
        got = fut.result(5)
        assert got.indices == expected[row].argsort(descending=True).tolist()
        assert got.scores == pytest.approx(sorted(expected[row].tolist(), reverse=True), abs=1e-6)


def test_full_queue_raises_overloaded_at_once(gated: GatedModel) -> None:
    eng = make_engine(gated, queue_capacity=2)
    try:
        first = hold_engine(eng, gated)
        queued = [eng.submit(tensor(), 1) for _ in range(2)]
        started = time.monotonic()
        with pytest.raises(Overloaded) as info:
            eng.submit(tensor(), 1)
        assert time.monotonic() - started < 1.0
        assert info.value.retry_after_s >= 1
        gated.gate.set()
        for fut in [first, *queued]:
            fut.result(5)  # accepted work is still served
    finally:
        eng.stop()


def test_expired_work_is_dropped(engine: InferenceEngine, gated: GatedModel) -> None:
    first = hold_engine(engine, gated)
    doomed = engine.submit(tensor(), 1, timeout_s=0.05)
    alive = engine.submit(tensor(), 1, timeout_s=30)
    time.sleep(0.1)
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
    engine: InferenceEngine, gated: GatedModel, fault: str, message: str
) -> None:
    first = hold_engine(engine, gated)
    setattr(gated, fault, True)
    futures = [first] + [engine.submit(tensor(i), 1) for i in range(3)]
    gated.gate.set()
    for fut in futures:
        with pytest.raises(InferenceFailed, match=message):
            fut.result(5)
    setattr(gated, fault, False)
    assert engine.submit(tensor(), 1).result(5).batch_size == 1  # the engine lives on


def test_wrong_input_shape_is_refused(engine: InferenceEngine) -> None:
    with pytest.raises(InferenceFailed, match="shape"):
        engine.submit(torch.zeros(3, 10, 10), 1)


def test_stop_finishes_queued_work_then_refuses(engine: InferenceEngine, gated: GatedModel) -> None:
    first = hold_engine(engine, gated)
    queued = [engine.submit(tensor(i), 1) for i in range(3)]
    stopper = threading.Thread(target=engine.stop, kwargs={"timeout": 10})
    stopper.start()
    time.sleep(0.05)
    with pytest.raises(NotReady):
        engine.submit(tensor(), 1)
    gated.gate.set()
    stopper.join(10)
    for fut in [first, *queued]:
        assert fut.result(5).batch_size >= 1


async def test_cancelled_waiters_are_skipped(engine: InferenceEngine, gated: GatedModel) -> None:
    first = hold_engine(engine, gated)
    task = asyncio.create_task(engine.infer(tensor(), 1))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gated.gate.set()
    first.result(5)
    assert (await engine.infer(tensor(), 1)).batch_size == 1
    assert gated.batch_sizes == [1, 1]


def test_torch_threads_are_fixed_on_the_engine_thread(gated: GatedModel) -> None:
    before = torch.get_num_threads()
    eng = make_engine(gated, torch_threads=2)
    try:
        eng.submit(tensor(), 1).result(5)
        assert set(gated.threads_seen) == {2}
    finally:
        eng.stop()
    assert torch.get_num_threads() in (before, 2)


def test_not_ready_before_start(gated: GatedModel) -> None:
    eng = InferenceEngine(gated, LABELS)
    with pytest.raises(NotReady):
        eng.submit(tensor(), 1)


async def test_real_int8_model_batches_concurrent_work(int8_model: LoadedModel) -> None:
    eng = make_engine(int8_model.module, int8_model.labels, max_batch_size=8, queue_capacity=64)
    try:
        inputs = [tensor(i) for i in range(24)]
        results = await asyncio.gather(*(eng.infer(t, 5) for t in inputs))
        assert max(r.batch_size for r in results) > 1
        assert eng.items_run == 24
        with torch.inference_mode():
            expected = int8_model.module(torch.stack(inputs)).softmax(1).topk(5, dim=1)
        for row, result in enumerate(results):
            assert result.indices[0] == expected.indices[row, 0].item()
            assert result.scores[0] == pytest.approx(expected.values[row, 0].item(), abs=1e-4)
    finally:
        eng.stop()
