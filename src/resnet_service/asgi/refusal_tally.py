"""Refusals answered from the request head, counted in plain integers and added to the
Prometheus series in one step every ``FLUSH_S``.

Under a 10x flood nearly every request is refused, and a refusal must cost little CPU or the
refusing eats the capacity it protects. In multiprocess mode one prometheus-client increment
takes a lock, checks the process id and writes a memory-mapped file; a refusal touched five
series, about a sixth of its CPU on a 2-CPU AMD EPYC. Counted here, a second of refusals costs
ten such rounds whatever their number. The series lag the refusals by at most ``FLUSH_S``
(a scrape interval is seconds); ``flush`` on shutdown writes what is pending.

Refusals from the head are not observed in the latency histogram: they are answered before
any work, after the fixed refusal pause, and a flood of them would drag its quantiles towards
that pause.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Final

from resnet_service.service.metrics import Metrics

#: Longest delay between a refusal and its counting in the Prometheus series.
FLUSH_S: Final = 0.1


@dataclass(frozen=True, slots=True)
class RefusalKey:
    """The bounded labels of one refused request."""

    route: str
    method: str
    code: str
    #: The request's class (inference routes), None elsewhere.
    priority: str | None
    #: On a single-image route a refused request is one refused image.
    single_image: bool


class RefusalTally:
    """Pending refusal counts of one worker, flushed by a timer on its event loop."""

    def __init__(self, metrics: Metrics, flush_s: float = FLUSH_S) -> None:
        self.metrics = metrics
        self.flush_s = flush_s
        self._pending: Counter[RefusalKey] = Counter()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, key: RefusalKey) -> None:
        """Count one refusal (on the event loop's thread, as the protocol layer calls it)."""
        self._pending[key] += 1
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_s, self.flush)

    def flush(self) -> None:
        """Add what is pending to the Prometheus series."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, Counter()
        metrics = self.metrics
        for key, count in pending.items():
            metrics.requests.labels(key.route, key.method, "503").inc(count)
            metrics.worker_requests.inc(count)
            metrics.rejections.labels(key.code).inc(count)
            if key.priority is not None:
                metrics.count_priority(key.priority, False, key.code, count=count)
            if key.single_image:
                metrics.images.labels("error").inc(count)
