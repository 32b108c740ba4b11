"""Admission's rules on a simulated replica: a burst is queued, a closed loop of any size is
never refused, an open-loop flood is shed within a few intervals and the queue held near the
target, and shedding ends with the overload.

The simulation is a discrete-event model of one worker (one image served at a time, a fixed
cost per image) driving the real ``Workload`` on a simulated clock, so these are statements
about the policy itself, free of this host's speed and noise; the real-process versions are
in ``test_server.py`` and ``test_robustness.py``.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from resnet_service.core.admission import AdmissionPolicy, Ticket, Workload
from resnet_service.core.errors import Overloaded

COST_S = 0.007  # one image, roughly OpenVINO int8 + decode on one core
POLICY = AdmissionPolicy(bound_s=15.0, target_s=0.05, interval_s=0.1)


@dataclass
class Outcome:
    arrived: float
    refused: bool = False
    #: Admitted, then refused as stale before it was served (admission's wasted work).
    dropped: bool = False
    waited: float | None = None  # once served
    latency: float | None = None


@dataclass
class Replica:
    """One worker: a FIFO in front of a server that takes ``cost_s`` per image."""

    policy: AdmissionPolicy = POLICY
    cost_s: float = COST_S
    now: float = 0.0
    events: list[tuple[float, int, Callable[[], None]]] = field(default_factory=list)
    queue: deque[tuple[Outcome, Ticket, Callable[[Outcome], None]]] = field(default_factory=deque)
    busy: bool = False
    outcomes: list[Outcome] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.workload = Workload(self.policy, self.cost_s, clock=lambda: self.now)

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.events, (when, next(self._seq), action))

    def arrive(self, done: Callable[[Outcome], None] = lambda _: None) -> None:
        outcome = Outcome(arrived=self.now)
        self.outcomes.append(outcome)
        try:
            ticket = self.workload.admit()
        except Overloaded:
            outcome.refused = True
            done(outcome)
            return
        ticket.uploaded()
        self.workload.started()
        self.queue.append((outcome, ticket, done))
        self._serve_next()

    def _serve_next(self) -> None:
        if self.busy or not self.queue:
            return
        outcome, ticket, done = self.queue.popleft()
        if self.workload.stale(self.now - outcome.arrived):  # as the decode pool does
            outcome.refused = outcome.dropped = True
            self.workload.finished(1)
            ticket.release()
            done(outcome)
            self._serve_next()
            return
        outcome.waited = self.now - outcome.arrived
        self.busy = True

        def finish() -> None:
            self.busy = False
            outcome.latency = self.now - outcome.arrived
            self.workload.finished(1, outcome.waited)
            ticket.release()
            done(outcome)
            self._serve_next()

        self.at(self.now + self.cost_s, finish)

    def run(self, until: float) -> None:
        while self.events and self.events[0][0] <= until:
            self.now, _, action = heapq.heappop(self.events)
            action()

    # --- load shapes -------------------------------------------------------------------
    def closed_loop(self, clients: int, until: float, retry_s: float = 0.005) -> None:
        """Each client sends again as soon as it is answered (a refusal: after ``retry_s``)."""

        def again(outcome: Outcome) -> None:
            delay = retry_s if outcome.refused else 0.0
            if self.now + delay < until:
                self.at(self.now + delay, lambda: self.arrive(again))

        for _ in range(clients):
            self.at(self.now, lambda: self.arrive(again))

    def open_loop(self, rate: float, start: float, until: float) -> None:
        for i in range(int((until - start) * rate)):
            self.at(start + i / rate, self.arrive)


def served(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.waited is not None]


def refused(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.refused]


@pytest.mark.parametrize("size", [64, 256, 1024])
def test_a_burst_that_fits_the_deadline_is_queued(size: int) -> None:
    replica = Replica()
    for _ in range(size):
        replica.at(0.0, replica.arrive)
    replica.run(until=60)
    assert len(served(replica.outcomes)) == size
    assert not replica.workload.shedding


def test_a_burst_past_the_deadline_bound_is_cut_there() -> None:
    replica = Replica()
    size = int(2 * POLICY.bound_s / COST_S)  # twice what the deadline bound admits
    for _ in range(size):
        replica.at(0.0, replica.arrive)
    replica.run(until=120)
    admitted = len(served(replica.outcomes))
    assert admitted == pytest.approx(POLICY.bound_s / COST_S, rel=0.01)
    assert max(o.waited or 0 for o in replica.outcomes) <= POLICY.bound_s + COST_S


@pytest.mark.parametrize("clients", [1, 16, 64, 256])
@pytest.mark.parametrize("cost_s", [0.003, 0.007, 0.012])
def test_a_closed_loop_is_never_refused(clients: int, cost_s: float) -> None:
    replica = Replica(cost_s=cost_s)
    replica.closed_loop(clients, until=5.0)
    replica.run(until=60.0)
    assert refused(replica.outcomes) == []
    assert len(replica.outcomes) > 5.0 / cost_s * 0.9  # it really ran at full speed


@pytest.mark.parametrize("factor", [2, 10])
def test_an_open_loop_flood_is_shed_and_the_queue_held_near_the_target(factor: int) -> None:
    replica = Replica()
    capacity = 1 / COST_S
    replica.open_loop(factor * capacity, start=0.0, until=10.0)
    replica.run(until=30.0)
    late = [o for o in replica.outcomes if o.arrived > 1.0]  # after the first second
    waits = sorted(o.waited for o in served(late) if o.waited is not None)
    assert waits, "nothing was served after the first second"
    # Held near the target (a served image may find the target's worth ahead, plus one).
    assert waits[int(0.99 * (len(waits) - 1))] <= POLICY.target_s + 2 * COST_S
    # Goodput: the server stays busy (at most a few images' worth of idling).
    assert len(served(late)) >= 0.95 * 9.0 * capacity
    assert len(refused(late)) >= 0.9 * (factor - 1) * 9.0 * capacity
    # What the flood's first interval admitted is its burst allowance, and once the queue
    # is found standing, what waited past the stale bound is dropped, not served late.
    first = [o for o in served(replica.outcomes) if o.arrived <= 1.0]
    assert max(o.waited or 0 for o in first) < 4 * POLICY.target_s


def test_shedding_ends_with_the_overload_and_a_burst_after_it_is_queued() -> None:
    replica = Replica()
    capacity = 1 / COST_S
    replica.open_loop(10 * capacity, start=0.0, until=2.0)
    replica.run(until=2.0)
    assert replica.workload.shedding
    replica.open_loop(0.5 * capacity, start=2.0, until=4.0)  # a normal load again
    replica.run(until=4.0)
    assert not replica.workload.shedding
    assert refused([o for o in replica.outcomes if o.arrived > 2.5]) == []
    replica.run(until=10.0)  # idle
    before = len(replica.outcomes)
    for _ in range(128):
        replica.at(10.0, replica.arrive)
    replica.run(until=20.0)
    assert refused(replica.outcomes[before:]) == []


def test_stale_work_is_dropped_only_while_shedding() -> None:
    workload = Workload(POLICY, COST_S)
    assert not workload.stale(10.0)
    workload.shedding = True
    assert workload.stale(POLICY.stale_s + 0.001)
    assert not workload.stale(POLICY.stale_s / 2)


def test_after_shedding_the_bound_grows_back_from_the_target() -> None:
    now = [0.0]
    workload = Workload(POLICY, COST_S, clock=lambda: now[0])
    assert workload.bound_s() == POLICY.bound_s  # never shed: the deadline's bound
    workload.shedding = True
    assert workload.bound_s() == POLICY.target_s
    workload._switch(False, workload._window, now[0])
    assert workload.bound_s() == pytest.approx(POLICY.target_s)
    now[0] += 3 * POLICY.interval_s
    assert workload.bound_s() == pytest.approx(8 * POLICY.target_s)
    now[0] += 20 * POLICY.interval_s
    assert workload.bound_s() == POLICY.bound_s


def test_after_a_pause_of_the_flood_little_is_admitted_only_to_be_dropped() -> None:
    """The flooding client stalls for a third of a second: its queue drains and shedding
    ends, as after a real flood. When the flood resumes, the bound is still near the target,
    so it cannot queue seconds of work to be dropped once shedding resumes (back at the
    deadline's 15 s bound at once, it did)."""
    replica = Replica()
    capacity = 1 / COST_S
    replica.open_loop(10 * capacity, start=0.0, until=2.0)
    replica.open_loop(10 * capacity, start=2.3, until=4.0)
    replica.run(until=10.0)
    resumed = [o for o in replica.outcomes if o.arrived >= 2.3]
    assert served(resumed), "nothing was served after the pause"
    assert max(o.waited or 0 for o in served(resumed)) < 4 * POLICY.target_s
    # What was admitted after the pause and then dropped as stale: a few of the target's
    # worth, not the interval's whole flood (~140 here without the ramp).
    assert sum(o.dropped for o in resumed) < 4 * POLICY.target_s / COST_S


def test_requests_shed_after_admission_count_as_demand() -> None:
    """A request admitted and then refused in the pipeline (its decode backlog was full) was
    not served: counted as answered, a flood of such requests would never look like one."""
    replica = Replica()
    backlog = 4
    arrive = replica.arrive

    def arrive_with_backlog(done: Callable[[Outcome], None] = lambda _: None) -> None:
        if len(replica.queue) < backlog:
            arrive(done)
            return
        outcome = Outcome(arrived=replica.now, refused=True)
        replica.outcomes.append(outcome)
        try:
            ticket = replica.workload.admit()
        except Overloaded:
            return
        ticket.uploaded()
        replica.workload.started()
        replica.workload.shed()  # what the classifier does on Overloaded in the pipeline
        replica.workload.finished(1)
        ticket.release()

    replica.arrive = arrive_with_backlog  # type: ignore[method-assign]
    # A slow model: every served image waits longer than the target behind the backlog.
    replica.cost_s = 0.05
    replica.workload.cost_s = 0.05
    replica.open_loop(10 / 0.05, start=0.0, until=2.0)
    replica.run(until=2.0)
    assert replica.workload.shedding


def test_while_shedding_a_batch_worth_is_admitted_when_one_image_costs_more_than_the_target() -> (
    None
):
    policy = AdmissionPolicy(bound_s=15.0, target_s=0.05, interval_s=0.1, floor_images=4)
    workload = Workload(policy, initial_cost_s=0.2)
    workload.shedding = True
    tickets = [workload.admit() for _ in range(4)]  # 4 x 0.2 s predicted: past the target
    with pytest.raises(Overloaded):
        workload.admit()
    assert not workload.stale(2 * 4 * 0.2 - 0.01)  # the floor's own wait is not stale
    for ticket in tickets:
        ticket.release()
