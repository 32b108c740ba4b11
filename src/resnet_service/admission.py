"""Admission by predicted wait: refuse a request before reading its upload when the work
already admitted would keep it waiting longer than the queue budget.

The queue is sized in time, not in count: the cost of one image (decode + model + the rest) is
measured as busy time per completed image, so it follows the host, the runtime, the image
sizes and the process layout without tuning. Under saturation busy time per image is exactly
1 / throughput; at low load it is a lone request's latency, which errs on the safe side.

Event-loop thread only: every counter is touched from the loop that serves requests, so no
locks are needed (and none can be held when a signal arrives).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from resnet_service.errors import Overloaded

#: Weight of the newest cost sample in the moving average.
_ALPHA: Final = 0.3
#: A cost sample needs at least this many completions and this much busy time.
_MIN_SAMPLE_IMAGES: Final = 4
_MIN_SAMPLE_BUSY_S: Final = 0.02
MAX_RETRY_AFTER_S: Final = 60


@dataclass(slots=True)
class _Sample:
    busy_s: float = 0.0
    completed: int = 0


class Workload:
    """Requests admitted but still uploading, images in the pipeline, and the cost per image."""

    def __init__(self, budget_s: float, initial_cost_s: float) -> None:
        self.budget_s = budget_s
        self.cost_s = initial_cost_s
        self.uploading = 0
        self.processing = 0
        self.completed = 0
        self._busy_total = 0.0
        self._busy_since = 0.0
        self._last = _Sample()

    # --- admission -----------------------------------------------------------------------
    def predicted_wait_s(self) -> float:
        """How long a newly admitted image would wait for the work admitted before it."""
        return (self.uploading + self.processing) * self.cost_s

    def retry_after_s(self) -> int:
        """Whole seconds until the admitted work has likely drained (at least 1)."""
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(self.predicted_wait_s())))

    def admit(self) -> Ticket:
        """A ticket for one request, or ``Overloaded`` when it would wait past the budget.

        An idle worker admits anything (a large batch request included): the budget bounds
        the wait behind *other* work, not the request's own."""
        wait = self.predicted_wait_s()
        if wait > self.budget_s and (self.uploading or self.processing):
            raise Overloaded(
                f"the service is at capacity: a new request would wait about {wait * 1000:.0f} "
                f"ms (budget {self.budget_s * 1000:.0f} ms); retry later or elsewhere",
                retry_after_s=self.retry_after_s(),
            )
        return Ticket(self)

    # --- accounting ----------------------------------------------------------------------
    def started(self, images: int = 1) -> None:
        """``images`` enter the pipeline (decode, queue, model)."""
        if self.processing == 0:
            self._busy_since = time.monotonic()
        self.processing += images

    def finished(self, images: int = 1) -> None:
        """``images`` left the pipeline (answered, refused or failed)."""
        now = time.monotonic()
        self.processing -= images
        self.completed += images
        if self.processing == 0:
            self._busy_total += now - self._busy_since
        self._update_cost(now)

    def busy_s(self, now: float) -> float:
        return self._busy_total + (now - self._busy_since if self.processing else 0.0)

    def _update_cost(self, now: float) -> None:
        busy = self.busy_s(now)
        images = self.completed - self._last.completed
        spent = busy - self._last.busy_s
        if images < _MIN_SAMPLE_IMAGES or spent < _MIN_SAMPLE_BUSY_S:
            return
        self.cost_s = (1 - _ALPHA) * self.cost_s + _ALPHA * (spent / images)
        self._last = _Sample(busy, self.completed)


class Ticket:
    """One admitted request: counts as waiting work while its upload is read."""

    def __init__(self, workload: Workload) -> None:
        self._workload = workload
        self._uploading = True
        workload.uploading += 1

    def uploaded(self) -> None:
        """The body is read: from now on its images count, not the request."""
        if self._uploading:
            self._uploading = False
            self._workload.uploading -= 1

    def __enter__(self) -> Ticket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uploaded()
