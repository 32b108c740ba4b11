"""The load every server gets and the figures it yields: one closed-loop level, the probe
answered before the load, one server's results."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from resnet_bench import loadgen
from resnet_bench.runner import MAX_REQUESTS_PER_LEVEL

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LevelResult:
    """One closed-loop level against one server."""

    concurrency: int
    requests: int
    ok: int
    non_200: int
    errors: int
    rps: float
    #: Latencies of the 200 answers; None when there was none.
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None

    @classmethod
    def of(cls, result: loadgen.LoadResult) -> LevelResult:
        lat = result.latency_ms(200)

        def pct(q: float) -> float | None:
            return round(float(np.percentile(lat, q)), 2) if result.ok else None

        return cls(
            concurrency=result.concurrency or 0,
            requests=len(result.latencies),
            ok=result.ok,
            non_200=len(result.latencies) - result.ok,
            errors=result.errors,
            rps=round(result.ok / result.elapsed_s, 2) if result.elapsed_s else 0.0,
            p50_ms=pct(50),
            p90_ms=pct(90),
            p99_ms=pct(99),
        )


@dataclass(frozen=True)
class Probe:
    """What one request answered before the load: a cheap check that the server classifies
    (and, between the two servers, that they run the same weights)."""

    top1_label: str
    top1_score: float
    weights_sha256: str | None = None
    #: "runtime precision" as the service reports it (TorchServe's is always torch fp32).
    model: str | None = None


@dataclass(frozen=True)
class ServerResult:
    """One server's figures in this run."""

    name: str
    layout: str
    startup_s: float
    probe: Probe
    closed_loop: list[LevelResult]
    memory: dict[str, float]

    def at(self, concurrency: int) -> LevelResult:
        return next(r for r in self.closed_loop if r.concurrency == concurrency)


def drive(
    port: int, payload: bytes, concurrencies: Sequence[int], duration_s: float
) -> list[LevelResult]:
    """The closed loop at each concurrency, bounded in time and in count."""
    levels = []
    for c in concurrencies:
        log.info("  %d client(s) for %.1f s", c, duration_s)
        result = asyncio.run(
            loadgen.closed_loop("127.0.0.1", port, payload, c, duration_s, MAX_REQUESTS_PER_LEVEL)
        )
        levels.append(LevelResult.of(result))
    return levels
