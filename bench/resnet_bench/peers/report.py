"""``bench/peers.json`` and its Markdown: the service over each peer as ratios, read
against the goals, and what a reader must know before trusting them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from resnet_bench.peers.load import ServerResult
from resnet_service.model.weights import ResolvedWeights, WeightsSource

#: The service's throughput over each peer's at 16 clients (goals of issue 18), and its p99.
THROUGHPUT_GOALS: Final = {"TorchServe": 8.0, "BentoML": 3.0}
P99_GOAL: Final = 0.3
GOAL_CONCURRENCY: Final = 16


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    """``ours / theirs``, or None when a side has no figure (it answered nothing)."""
    if ours is None or not theirs:
        return None
    return round(ours / theirs, 3)


@dataclass(frozen=True)
class Ratios:
    """The service over one peer at one concurrency, read against the goals (which are set
    at 16 clients: other levels are reported, not judged)."""

    peer: str
    concurrency: int
    #: None when either server answered nothing at this level: there is no ratio to read.
    throughput: float | None
    p99: float | None
    throughput_goal: float
    p99_goal: float = P99_GOAL
    throughput_goal_met: bool = False
    p99_goal_met: bool = False
    at_goal_concurrency: bool = False

    @classmethod
    def of(cls, service: ServerResult, peer: ServerResult, concurrency: int) -> Ratios:
        ours, theirs = service.at(concurrency), peer.at(concurrency)
        throughput = _ratio(ours.rps, theirs.rps)
        p99 = _ratio(ours.p99_ms, theirs.p99_ms)
        goal = THROUGHPUT_GOALS.get(peer.name, THROUGHPUT_GOALS["TorchServe"])
        return cls(
            peer=peer.name,
            concurrency=concurrency,
            throughput=throughput,
            p99=p99,
            throughput_goal=goal,
            throughput_goal_met=throughput is not None and throughput >= goal,
            p99_goal_met=p99 is not None and p99 <= P99_GOAL,
            at_goal_concurrency=concurrency == GOAL_CONCURRENCY,
        )


@dataclass(frozen=True)
class PeerReport:
    """Everything ``bench/peers.json`` holds."""

    date: str
    machine: dict[str, Any]
    peer_versions: dict[str, str]
    image: str
    image_bytes: int
    weights_source: str
    weights_sha256: str
    same_weights: bool
    duration_s: float
    servers: list[ServerResult]
    ratios: list[Ratios]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _goal_line(
    what: str, value: float | None, sign: str, goal: float, met: bool, at_goal: bool
) -> str:
    verdict = "met" if met else "NOT met"
    if not at_goal:
        verdict += f", but the goal is set at {GOAL_CONCURRENCY} clients: indicative only"
    shown = "n/a" if value is None else value
    return f"- {what}: **{shown}** (goal {sign} {goal}: {verdict})"


def _cell(value: float | None) -> str:
    return "n/a" if value is None else str(value)


def render(report: PeerReport) -> str:
    """Markdown: one row per server and concurrency, then the two ratios and their goals."""
    lines = [
        f"Peers on {report.machine['cpu']} ({report.machine['usable_cpus']} usable CPUs), "
        f"{report.image}, {report.duration_s} s per level, weights: {report.weights_source}",
        "",
        "| server | layout | clients | req/s | p50 ms | p90 ms | p99 ms | non-200 / errors "
        "| peak RSS MB (tree) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for srv in report.servers:
        lines += [
            f"| {srv.name} | {srv.layout} | {r.concurrency} | {r.rps} | {_cell(r.p50_ms)} | "
            f"{_cell(r.p90_ms)} | {_cell(r.p99_ms)} | {r.non_200} / {r.errors} | "
            f"{srv.memory['peak_rss_mb']} |"
            for r in srv.closed_loop
        ]
    lines.append("")
    for ratios in report.ratios:
        c = ratios.concurrency
        lines += [
            _goal_line(
                f"service ÷ {ratios.peer} throughput at {c} clients",
                ratios.throughput,
                "≥",
                ratios.throughput_goal,
                ratios.throughput_goal_met,
                ratios.at_goal_concurrency,
            ),
            _goal_line(
                f"service p99 ÷ {ratios.peer} p99 at {c} clients",
                ratios.p99,
                "≤",
                ratios.p99_goal,
                ratios.p99_goal_met,
                ratios.at_goal_concurrency,
            ),
        ]
    lines += [f"- {note}" for note in report.notes]
    return "\n".join(lines)


def reading_notes(
    servers: Sequence[ServerResult], same: bool, weights: ResolvedWeights
) -> list[str]:
    """What a reader must know before trusting the ratios."""
    notes = [
        f"{srv.name} answered {sum(r.non_200 for r in srv.closed_loop)} non-200 and "
        f"{sum(r.errors for r in srv.closed_loop)} failed requests"
        for srv in servers
        if any(r.non_200 or r.errors for r in srv.closed_loop)
    ]
    if not same:
        notes.append("the service reported other weights than the ones TorchServe got")
    if weights.source is WeightsSource.RANDOM:
        notes.append(
            "both served the seeded random weights (no real ones on this machine): the speed "
            "does not depend on them, the labels mean nothing"
        )
    return notes
