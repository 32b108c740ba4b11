"""Admission that tells a burst from an overload.

Two rules, both decided before an upload is read:

- **The deadline bound** (``bound_s``): a request is admitted while the work already admitted
  ahead of it can be served within its deadline budget. A burst (64 or 256 requests at once on
  an idle replica) is far inside it and is queued, as Triton and BentoML queue it.
- **Standing-queue shedding** (CoDel's idea, applied at admission): the queue *stands* when
  every image served for a whole ``interval_s`` waited longer than ``target_s`` *and*, since
  it went above the target, more requests arrived than were answered (x1.5, plus 4: the
  offered load exceeds what the replica serves). Only then does the bound shrink to
  ``target_s``, so under overload the queue is held near the target and accepted requests
  stay fast; everything beyond is refused in microseconds. Shedding ends after an interval
  in which the target held without a refusal, or after an interval with no request at all.

Why the second condition: a closed loop of N clients keeps N requests in the system, so its
queueing delay can sit above any small target (64 clients on a slow runtime wait ~0.5 s), yet
it can never overload a server: each client sends only when answered, so arrivals equal
answers and nothing is ever refused. An open-loop flood sends more than is answered and is
shed once its queue has stood for an interval. A burst arrives before any of its images has
waited, so its own requests are all admitted under the deadline bound.

Fresh over stale: while shedding, an image that has already waited longer than
``stale_s`` when its decode would start is refused then (CoDel's drop at the head): its caller
has waited long, and its decode would delay fresh requests. The first interval of a flood is
admitted under the deadline bound; this is what clears that backlog quickly.

Leaving shedding: the bound grows back from the target, doubling every interval, instead of
jumping to the deadline's: a pause of the flooding client (or of the host) looks like the end
of a flood, and at the deadline's bound the flood's next interval would queue seconds of work
only to have it dropped as stale. Requests admitted and then refused in the pipeline (a full
decode backlog, stale work) count as demand, not as answers. While shedding, a batch's worth
of images (``floor_images``) is admitted whatever its predicted wait, so that a model slower
than the target per image is still kept busy.

The queue is sized in time, not in count: the cost of one image is measured as busy time per
completed image, so it follows the host, the runtime, the image sizes and the process layout
without tuning. Under saturation busy time per image is exactly 1 / throughput; at low load it
is a lone request's latency, which errs on the safe side.

Event-loop thread only: every counter is touched from the loop that serves requests, so no
locks are needed (and none can be held when a signal arrives).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from resnet_service.core.errors import Overloaded
from resnet_service.core.priority import BULK, INTERACTIVE, Priority

log = logging.getLogger(__name__)

#: Weight of the newest cost sample in the moving average.
_ALPHA: Final = 0.3
#: A cost sample needs at least this many completions and this much busy time.
_MIN_SAMPLE_IMAGES: Final = 4
_MIN_SAMPLE_BUSY_S: Final = 0.02
MAX_RETRY_AFTER_S: Final = 60
#: Arrivals must exceed answers by this factor plus a few requests to count as an overload:
#: a closed loop's counts differ only by the requests in flight at a window's edges.
_EXCESS_FACTOR: Final = 1.5
_EXCESS_REQUESTS: Final = 4


@dataclass(frozen=True, slots=True)
class AdmissionPolicy:
    """The admission settings, in seconds."""

    #: Longest predicted wait admitted normally (from the request deadline).
    bound_s: float
    #: Queueing delay a standing queue is held to while shedding.
    target_s: float
    #: How long the delay must stay above the target (and arrivals above answers) to shed.
    interval_s: float
    #: While shedding, this many images are admitted whatever their predicted wait: a batch's
    #: worth keeps the model busy when one image costs more than the target (a slow runtime,
    #: or a worker shared with other models), where the target alone would admit one at a time
    #: and leave the model idle between them.
    floor_images: int = 1

    @property
    def stale_s(self) -> float:
        """While shedding, work that waited longer than this before its decode is refused."""
        return 2 * self.target_s


@dataclass(slots=True)
class _Sample:
    busy_s: float = 0.0
    completed: int = 0


@dataclass(slots=True)
class _Window:
    """Requests that arrived (admitted or not) and ended since ``since``."""

    since: float
    arrivals: int = 0
    answered: int = 0
    refused: int = 0
    #: Of ``answered``, requests admitted and then shed (a full decode backlog, stale work):
    #: served by no one, so they are demand, not service.
    shed: int = 0

    def overloaded(self) -> bool:
        """More demand than service: what a closed loop, however large, never shows."""
        served = max(0, self.answered - self.shed)
        return self.arrivals > _EXCESS_FACTOR * served + _EXCESS_REQUESTS


class Workload:
    """Requests admitted but still uploading, images in the pipeline, and the cost per image."""

    def __init__(
        self,
        policy: AdmissionPolicy,
        initial_cost_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self.cost_s = initial_cost_s
        self.uploading = 0
        self.processing = 0
        self.completed = 0
        #: Admitted requests not yet ended (what an unloading model version waits for).
        self.open = 0
        #: Until when (clock) a standing queue is not shed: the worker's own known capacity
        #: dip (a model version loading beside this one), not an overload. The deadline bound
        #: still applies.
        self.hold_until = 0.0
        #: True while a standing queue is being shed (the bound is then the target).
        self.shedding = False
        #: When shedding last ended: the bound grows back from the target from then on.
        self._calm_since = -math.inf
        self._busy_total = 0.0
        self._busy_since = 0.0
        self._last = _Sample()
        #: Since when every image served waited longer than the target (None: not so now).
        self._above_since: float | None = None
        #: Arrivals and answers since the queue went above the target (or, while shedding,
        #: over the current interval).
        self._window = _Window(clock())

    # --- admission -----------------------------------------------------------------------
    def predicted_wait_s(self) -> float:
        """How long a newly admitted image would wait for the work admitted before it."""
        return (self.uploading + self.processing) * self.cost_s

    def retry_after_s(self) -> int:
        """Whole seconds until the admitted work has likely drained (at least 1)."""
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(self.predicted_wait_s())))

    def bound_s(self) -> float:
        """The predicted wait admitted now: the target while shedding, else the deadline's,
        reached by doubling from the target every interval once shedding ended. The ramp is
        what makes a wrong end harmless: a stall of the host or of the flooding client looks
        like the quiet after a flood, and a bound back at the deadline at once would let the
        flood queue seconds of work in the next interval."""
        if self.shedding:
            return self.policy.target_s
        doublings = (self._clock() - self._calm_since) / self.policy.interval_s
        if doublings >= math.log2(self.policy.bound_s / self.policy.target_s):
            return self.policy.bound_s
        return self.policy.target_s * 2**doublings

    def admit(self, priority: Priority = INTERACTIVE) -> Ticket:
        """A ticket for one request, or ``Overloaded`` when it would wait past the bound.

        An idle worker admits anything (a large batch request included): the bound limits
        the wait behind *other* work, not the request's own. Bulk work is the first refused:
        not at all while a standing queue is shed."""
        self._window.arrivals += 1
        self._decide(self._clock())
        wait = self.predicted_wait_s()
        bound = self.bound_s()
        in_flight = self.uploading + self.processing
        if priority == BULK and self.shedding and in_flight:
            self._window.refused += 1
            raise Overloaded(
                "the service is at capacity (a queue is standing) and refuses bulk work first; "
                "retry later",
                retry_after_s=self.retry_after_s(),
            )
        if wait > bound and in_flight >= (self.policy.floor_images if self.shedding else 1):
            self._window.refused += 1
            why = "a queue is standing" if self.shedding else "its deadline budget is spent"
            raise Overloaded(
                f"the service is at capacity ({why}): a new request would wait about "
                f"{wait * 1000:.0f} ms (bound {bound * 1000:.0f} ms); retry later or elsewhere",
                retry_after_s=self.retry_after_s(),
            )
        return Ticket(self, wait)

    def hold(self, seconds: float) -> None:
        """Do not start shedding for ``seconds`` from now (``math.inf``: until told again)."""
        self.hold_until = self._clock() + seconds

    def stale(self, waited_s: float) -> bool:
        """Whether work that has waited ``waited_s`` should be refused instead of started
        (read-only: the decode threads ask it). The floor's own wait is never stale."""
        floor_wait_s = 2 * self.policy.floor_images * self.cost_s
        return self.shedding and waited_s > max(self.policy.stale_s, floor_wait_s)

    def _decide(self, now: float) -> None:
        """Start shedding once the queue has stood above the target for an interval while
        more arrived than was answered; stop after an interval without that excess."""
        window = self._window
        if self.shedding:
            if now - window.since < self.policy.interval_s:
                return
            # Over: a whole interval held the target without refusing, or no request came
            # for an interval (the first one after a quiet spell closes a window this old)
            # and what is admitted fits the target: a stall of the host or of the flood's
            # client also leaves a gap, with the queue still standing behind it.
            quiet = now - window.since >= 2 * self.policy.interval_s
            if window.refused == 0 or (quiet and self.predicted_wait_s() <= self.policy.target_s):
                self._switch(False, window, now)
            self._window = _Window(now)
            return
        above = self._above_since
        if above is None or now - above < self.policy.interval_s or now < self.hold_until:
            return
        if window.overloaded():
            self._switch(True, window, now)
            self._window = _Window(now)

    def _switch(self, shedding: bool, window: _Window, now: float) -> None:
        self.shedding = shedding
        if not shedding:
            self._calm_since = now
        log.warning(
            "admission: %s (over %.0f ms: %d arrived, %d answered, %d refused)",
            "a queue stands: shedding" if shedding else "the overload is over",
            (now - window.since) * 1000,
            window.arrivals,
            window.answered,
            window.refused,
        )

    def _observe_wait(self, waited_s: float, now: float) -> None:
        """CoDel's test, on each served image: is the queue still above the target?"""
        if waited_s <= self.policy.target_s:
            self._above_since = None
        elif self._above_since is None:
            self._above_since = now
            if not self.shedding:
                self._window = _Window(now)  # demand is judged from here on

    # --- accounting ----------------------------------------------------------------------
    def started(self, images: int = 1) -> None:
        """``images`` enter the pipeline (decode, queue, model)."""
        if self.processing == 0:
            self._busy_since = self._clock()
        self.processing += images

    def finished(self, images: int = 1, waited_s: float | None = None) -> None:
        """``images`` left the pipeline (answered, refused or failed); ``waited_s``: how long
        one of them queued (decode pool and engine), when it was served."""
        now = self._clock()
        self.processing -= images
        self.completed += images
        if waited_s is not None:
            self._observe_wait(waited_s, now)
        if self.processing == 0:
            self._busy_total += now - self._busy_since
            if not self.uploading:
                self._above_since = None  # an empty pipeline: no queue stands
        self._update_cost(now)

    def answered(self) -> None:
        """One admitted request ended (its ticket is released)."""
        self._window.answered += 1
        self.open -= 1

    def shed(self) -> None:
        """An admitted request's image was refused after all (``Overloaded`` in the pipeline):
        its answer is a refusal, not service."""
        self._window.refused += 1
        self._window.shed += 1

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
    """One admitted request: counts as waiting work while its upload is read, and as one
    answered request when it is released."""

    def __init__(self, workload: Workload, predicted_wait_s: float = 0.0) -> None:
        self._workload = workload
        #: The wait admission predicted for it (reported on its trace span).
        self.predicted_wait_s = predicted_wait_s
        self._uploading = True
        self._open = True
        workload.uploading += 1
        workload.open += 1

    def uploaded(self) -> None:
        """The body is read: from now on its images count, not the request."""
        if self._uploading:
            self._uploading = False
            self._workload.uploading -= 1

    def release(self) -> None:
        """The request ended (answered, failed or abandoned); idempotent."""
        self.uploaded()
        if self._open:
            self._open = False
            self._workload.answered()

    def __enter__(self) -> Ticket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
