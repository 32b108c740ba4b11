"""A shadow version: a fraction of a model's requests also runs on another version, whose
answers are compared with the served ones and never returned.

The comparison runs after the primary answer is computed, on the pixels the primary decoded
(no second decode when both versions take the same input), as *bulk* work
(``core.priority``), and only while the primary has nothing waiting: a saturated model skips
its comparisons (counted) rather than pay for them with its own requests' latency, so a
shadow takes CPU the primary does not need (a comparison admission refuses is skipped too). Top-1 agreement and the drift of the
primary's top class's score are kept over a window; the stop rule (agreement below a bound
over a full window) takes the shadow version out of the model's traffic split, so a canary
that disagrees stops getting requests.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from resnet_service.core import priority
from resnet_service.core.classifier import Classifier
from resnet_service.core.errors import ServiceError
from resnet_service.core.images import Pixels
from resnet_service.core.results import Classification
from resnet_service.service.metrics import Metrics

log = logging.getLogger("resnet_service.shadow")


@dataclass(frozen=True, slots=True)
class ShadowRule:
    """A model config's ``shadow``, in the service's units."""

    version: str
    fraction: float
    #: Stop the version's traffic share below this top-1 agreement (None: never).
    min_agreement: float | None
    window: int


@dataclass(frozen=True, slots=True)
class ShadowStatus:
    """What ``/models`` says of a shadow."""

    version: str
    fraction: float
    compared: int
    skipped: int
    #: Over the last ``window`` comparisons (None before the first).
    agreement: float | None
    score_drift: float | None
    stopped: str | None


class Shadow:
    """One model's shadow: the comparisons' window, its metrics and the stop rule."""

    def __init__(
        self,
        model: str,
        rule: ShadowRule,
        find: Callable[[], Classifier | None],
        on_stop: Callable[[str], None],
        metrics: Metrics,
    ) -> None:
        self.model = model
        self.rule = rule
        self._find = find
        self._on_stop = on_stop
        self._window: deque[tuple[bool, float]] = deque(maxlen=rule.window)
        self._credit = 0.0
        self.compared = 0
        self.skipped = 0
        self.stopped: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = threading.Lock()
        labels = (model, rule.version)
        self._compared = metrics.shadow_compared
        self._agreement = metrics.shadow_agreement.labels(*labels)
        self._drift = metrics.shadow_score_drift.labels(*labels)

    def tap(self, primary: Classifier) -> ShadowTap | None:
        """The tap of one primary version (none for the shadow version itself)."""
        return None if primary.version == self.rule.version else ShadowTap(self, primary)

    def _due(self) -> bool:
        """Deterministically every 1/fraction-th offer (exact shares, like the split)."""
        with self._lock:
            if self.stopped is not None:
                return False
            self._credit += self.rule.fraction
            if self._credit < 1.0:
                return False
            self._credit -= 1.0
            return True

    def offer(
        self, data: bytes, primary: Classification, pixels: Pixels, busy: bool = False
    ) -> None:
        if not self._due():
            return
        if busy:
            self._skip("busy")
            return
        task = asyncio.get_running_loop().create_task(self._compare(data, primary, pixels))
        self._tasks.add(task)  # kept until done: the loop holds tasks weakly
        task.add_done_callback(self._tasks.discard)

    async def _compare(self, data: bytes, primary: Classification, pixels: Pixels) -> None:
        shadow = self._find()
        if shadow is None or not shadow.ready or shadow.retiring:
            self._skip("not loaded")
            return
        try:
            with priority.requested(priority.BULK), shadow.admit() as ticket:
                ticket.uploaded()
                if shadow.engine.accepts(pixels):
                    answer = await shadow.classify_pixels(pixels, top_k=1)
                else:  # another input size or preprocessing: its own decode
                    answer = await shadow.classify(data, top_k=1)
        except ServiceError as exc:
            self._skip(exc.code)
            return
        self._record(primary, answer)

    def _skip(self, why: str) -> None:
        self.skipped += 1
        self._compared.labels(self.model, self.rule.version, "skipped").inc()
        log.debug("shadow comparison of %s skipped: %s", self.model, why)

    def _record(self, primary: Classification, answer: Classification) -> None:
        top = primary.prediction.labels[0]
        agreed = answer.prediction.labels[0] == top
        index = primary.prediction.indices[0]
        theirs = answer.probabilities
        drift = (
            abs(float(primary.probabilities[index]) - float(theirs[index]))
            if len(theirs) == len(primary.probabilities)
            else 1.0
        )
        with self._lock:
            self._window.append((agreed, drift))
            self.compared += 1
            agreement, score_drift = self._means()
        self._compared.labels(
            self.model, self.rule.version, "agreed" if agreed else "differed"
        ).inc()
        self._agreement.set(agreement)
        self._drift.set(score_drift)
        self._check_rule(agreement)

    def _means(self) -> tuple[float, float]:
        n = len(self._window)
        return (
            sum(1 for agreed, _ in self._window if agreed) / n,
            sum(drift for _, drift in self._window) / n,
        )

    def _check_rule(self, agreement: float) -> None:
        bound = self.rule.min_agreement
        if bound is None or len(self._window) < self.rule.window or agreement >= bound:
            return
        reason = (
            f"top-1 agreement {agreement:.3f} over the last {self.rule.window} shadowed "
            f"requests is below min_agreement {bound}"
        )
        with self._lock:
            if self.stopped is not None:
                return
            self.stopped = reason
        log.warning("model %s version %s stopped: %s", self.model, self.rule.version, reason)
        self._on_stop(reason)

    def status(self) -> ShadowStatus:
        with self._lock:
            means = self._means() if self._window else (None, None)
        return ShadowStatus(
            self.rule.version,
            self.rule.fraction,
            self.compared,
            self.skipped,
            means[0],
            means[1],
            self.stopped,
        )


class ShadowTap:
    """What a primary version's classifier calls (``core.classifier.ShadowTap``)."""

    def __init__(self, shadow: Shadow, primary: Classifier) -> None:
        self.shadow = shadow
        self.primary = primary

    def offer(self, data: bytes, primary: Classification, pixels: Pixels) -> None:
        # Busy: images wait in the primary's queue (the answer would wait for a shadow's turn).
        self.shadow.offer(data, primary, pixels, busy=self.primary.engine.queue_depth > 0)
