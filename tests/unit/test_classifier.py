"""The transport-free core: bytes in, Top-k out, errors per image, shared by HTTP and CLI."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
import torch

from resnet_service.config import Settings
from resnet_service.core.classifier import Classifier
from resnet_service.core.errors import InvalidParameter, NotReady, Overloaded, UnsupportedImage
from resnet_service.core.images import decode_and_preprocess
from resnet_service.core.results import Classification
from resnet_service.core.runtime import ServedModel
from resnet_service.service.loading import classifier_options
from tests.harness import LIMITS, SPEC, jpeg_of, wait_until


@pytest.fixture
async def classifier(int8_model: ServedModel, settings: Settings) -> AsyncIterator[Classifier]:
    clf = Classifier(int8_model, classifier_options(settings))
    clf.start()
    yield clf
    clf.stop(timeout=5)


async def test_classify_matches_the_model_directly(
    classifier: Classifier, int8_model: ServedModel
) -> None:
    data = jpeg_of("chelsea")
    result = await classifier.classify(data, 5)
    x = decode_and_preprocess(data, LIMITS, SPEC)[None]
    expected = torch.from_numpy(int8_model.runtime.infer(x)).softmax(1)[0].numpy()
    # int8 logits are quantized, so exact ties happen: they are ordered by class index.
    assert result.prediction.indices == np.argsort(-expected, kind="stable")[:5].tolist()
    assert np.allclose(result.prediction.scores, np.sort(expected)[::-1][:5], atol=1e-5)
    timings = result.timings
    assert 0 < timings.decode_s <= timings.total_s
    assert timings.inference_s > 0


async def test_default_top_k(classifier: Classifier) -> None:
    result = await classifier.classify(jpeg_of("coffee"))
    assert len(result.prediction.indices) == 5


@pytest.mark.parametrize("top_k", [0, -1, 1001])
async def test_top_k_out_of_range(classifier: Classifier, top_k: int) -> None:
    with pytest.raises(InvalidParameter, match="between 1 and 1000"):
        await classifier.classify(jpeg_of("coffee"), top_k)


async def test_top_k_is_capped_at_the_class_count(classifier: Classifier) -> None:
    """The settings bound what may be asked; the model's classes what is served."""
    classifier.max_top_k = 3  # as for a 3-class model
    assert classifier.check_top_k(5) == 3
    assert classifier.check_top_k(None) == 3  # the default (5), capped too
    assert classifier.check_top_k(2) == 2
    with pytest.raises(InvalidParameter, match="capped"):
        classifier.check_top_k(1001)


async def test_one_bad_image_does_not_sink_the_batch(classifier: Classifier) -> None:
    images = [jpeg_of("coffee"), b"%PDF-1.4 not an image", jpeg_of("rocket"), b""]
    results = await classifier.classify_many(images, 3)
    assert isinstance(results[0], Classification)
    assert isinstance(results[1], UnsupportedImage)
    assert isinstance(results[2], Classification)
    assert results[3].code == "empty_upload"  # type: ignore[union-attr]
    single = await classifier.classify(jpeg_of("rocket"), 3)
    assert isinstance(results[2], Classification)
    assert results[2].prediction.indices == single.prediction.indices


async def test_many_images_share_batches(classifier: Classifier) -> None:
    results = await classifier.classify_many([jpeg_of("astronaut", (320, 240))] * 24, 1)
    sizes = [r.prediction.batch_size for r in results if isinstance(r, Classification)]
    assert len(sizes) == 24
    assert max(sizes) > 1


async def test_not_ready_before_start(int8_model: ServedModel, settings: Settings) -> None:
    clf = Classifier(int8_model, classifier_options(settings))
    with pytest.raises(NotReady):
        await clf.classify(jpeg_of("coffee"))


async def test_cancelled_callers_give_back_their_decode_slots(
    int8_model: ServedModel, settings: Settings
) -> None:
    clf = Classifier(
        int8_model,
        classifier_options(settings.model_copy(update={"queue_capacity": 2, "decode_threads": 1})),
    )
    clf.start()
    try:
        big = jpeg_of("astronaut", (2000, 1500))
        tasks = [asyncio.create_task(clf.classify(big)) for _ in range(3)]
        await asyncio.sleep(0)  # all three hold a decode slot; two wait behind the first
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(
            wait_until, lambda: clf.decoding.in_flight == 0, 10, "the running decode to end"
        )
        results = await clf.classify_many([jpeg_of("coffee")] * 3)
        assert all(isinstance(r, Classification) for r in results)
    finally:
        clf.stop(timeout=5)


async def test_a_long_list_waits_its_turn_instead_of_being_refused(
    int8_model: ServedModel, settings: Settings
) -> None:
    clf = Classifier(
        int8_model, classifier_options(settings.model_copy(update={"queue_capacity": 4}))
    )
    clf.start()
    try:
        results = await clf.classify_many([jpeg_of("coffee", (320, 240))] * 12, 1)
        assert all(isinstance(r, Classification) for r in results)
    finally:
        clf.stop(timeout=5)


async def test_preprocessed_arrays_skip_decoding(
    classifier: Classifier, int8_model: ServedModel
) -> None:
    data = jpeg_of("rocket")
    array = decode_and_preprocess(data, LIMITS, SPEC)
    from_bytes = await classifier.classify(data, 3)
    from_array = await classifier.classify_array(array, 3)
    assert from_array.prediction.indices == from_bytes.prediction.indices
    np.testing.assert_allclose(from_array.probabilities, from_bytes.probabilities, atol=1e-6)
    assert from_array.timings.decode_s == 0
    with pytest.raises(InvalidParameter, match="shape"):
        await classifier.classify_array(np.zeros((3, 8, 8), dtype=np.float32))


async def test_admission_measures_work_and_refuses_past_the_budget(
    int8_model: ServedModel, settings: Settings
) -> None:
    clf = Classifier(
        int8_model, classifier_options(settings.model_copy(update={"queue_budget_ms": 1}))
    )
    clf.start()
    try:
        with clf.admit() as ticket:  # an idle worker admits anything
            ticket.uploaded()
            results = await clf.classify_many([jpeg_of("coffee", (320, 240))] * 8, 1)
        assert all(isinstance(r, Classification) for r in results)
        assert clf.workload.processing == 0
        assert clf.workload.uploading == 0
        assert clf.workload.completed == 8
        assert 0 < clf.workload.cost_s < 1  # measured, no longer the prior
        first = clf.admit()  # uploading: counts as work ahead of the next request
        with pytest.raises(Overloaded) as refused:
            clf.admit()
        assert refused.value.retry_after_s >= 1
        first.uploaded()
        clf.admit().uploaded()  # nothing ahead any more
    finally:
        clf.stop(timeout=5)


async def test_images_are_decoded_just_in_time(int8_model: ServedModel, settings: Settings) -> None:
    """A backlog waits as bytes: at most a batch of decoded images queues ahead of the model
    (and one more per decode thread), however many requests wait."""
    clf = Classifier(
        int8_model,
        classifier_options(settings.model_copy(update={"max_batch_size": 2, "decode_threads": 2})),
    )
    clf.start()
    depths: list[int] = []
    submit = clf.engine.submit

    def recording_submit(*args, **kwargs):  # type: ignore[no-untyped-def]
        depths.append(clf.engine.queue_depth)
        return submit(*args, **kwargs)

    clf.engine.submit = recording_submit  # type: ignore[method-assign]
    try:
        results = await clf.classify_many([jpeg_of("coffee")] * 24)
        assert all(isinstance(r, Classification) for r in results)
        assert len(depths) == 24
        assert max(depths) <= 2 + 2 - 1  # a batch, plus what the other decoder had checked
    finally:
        clf.stop(timeout=5)
