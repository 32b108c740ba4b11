"""Refusals from the request head: counted in the tally, in the Prometheus series within the
flush interval, each label set apart, and what is pending written on demand (shutdown)."""

from __future__ import annotations

import asyncio

from resnet_service.asgi.refusal_tally import RefusalKey, RefusalTally
from resnet_service.service.metrics import Metrics


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return found or 0.0


CLASSIFY = RefusalKey("/classify", "POST", "overloaded", "bulk", single_image=True)
BATCH = RefusalKey("/classify/batch", "POST", "not_ready", "interactive", single_image=False)


def test_refusals_reach_the_series_within_the_interval() -> None:
    metrics = Metrics()
    tally = RefusalTally(metrics, flush_s=0.05)

    async def scenario() -> None:
        for _ in range(5):
            tally.add(CLASSIFY)
        tally.add(BATCH)
        assert value(metrics, "resnet_service_rejections_total", reason="overloaded") == 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while value(metrics, "resnet_service_rejections_total", reason="overloaded") < 5:
            assert loop.time() < deadline, "the tally was never flushed"
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    requests = "resnet_service_requests_total"
    assert value(metrics, requests, route="/classify", method="POST", status="503") == 5
    assert value(metrics, requests, route="/classify/batch", method="POST", status="503") == 1
    assert value(metrics, "resnet_service_rejections_total", reason="not_ready") == 1
    priority = "resnet_service_priority_requests_total"
    assert value(metrics, priority, priority="bulk", outcome="refused") == 5
    assert value(metrics, priority, priority="interactive", outcome="error") == 1
    assert value(metrics, "resnet_service_images_total", outcome="error") == 5  # single images
    assert value(metrics, "resnet_service_worker_requests_total", worker="0") == 6


def test_flush_writes_what_is_pending_at_once() -> None:
    metrics = Metrics()
    tally = RefusalTally(metrics, flush_s=3600)

    async def scenario() -> None:
        tally.add(CLASSIFY)
        tally.add(CLASSIFY)
        tally.flush()  # as the worker does on shutdown
        tally.add(CLASSIFY)  # a new interval after a flush

    asyncio.run(scenario())
    assert value(metrics, "resnet_service_rejections_total", reason="overloaded") == 2
    tally.flush()
    assert value(metrics, "resnet_service_rejections_total", reason="overloaded") == 3
