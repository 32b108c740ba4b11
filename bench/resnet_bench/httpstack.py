"""``make bench-http``: does uvicorn's httptools + uvloop stack earn its place over h11 + asyncio?

The issue that brought the fast stack in asked for it to be kept only if it is faster, so this
measures the service itself both ways, same runtime, same layout, same image, with the rounds
interleaved (A B A B ...) so that a noisy neighbour hurts both stacks alike. It reports the
median of the rounds per stack and the ratio, and writes ``bench/httpstack.json``.

    python -m resnet_bench.httpstack --out bench [--rounds 3] [--seconds 10]
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Final

from resnet_bench import interleaved
from resnet_bench.interleaved import interleaved_rounds
from resnet_bench.runner import machine_info
from resnet_service.config import Settings
from resnet_service.cpus import usable_cpus

log = logging.getLogger(__name__)

STACKS: Final = {"httptools+uvloop": ("httptools", "uvloop"), "h11+asyncio": ("h11", "asyncio")}


@dataclass(frozen=True)
class StackFigures:
    """One stack's rounds at one concurrency, and their medians."""

    stack: str
    rps: list[float]
    p50_ms: list[float]
    p99_ms: list[float]
    non_200: int

    @property
    def median_rps(self) -> float:
        return round(statistics.median(self.rps), 1)

    @property
    def median_p99_ms(self) -> float:
        return round(statistics.median(self.p99_ms), 1)


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Fold interleaved rounds (``{"stack": ..., **loadgen summary}``) into medians and the
    fast stack's ratios to h11 + asyncio."""
    figures = {
        stack: StackFigures(
            stack=stack,
            rps=[r["rps"] for r in rounds if r["stack"] == stack],
            p50_ms=[r["p50_ms"] for r in rounds if r["stack"] == stack],
            p99_ms=[r["p99_ms"] for r in rounds if r["stack"] == stack],
            non_200=sum(r["non_200"] + r["errors"] for r in rounds if r["stack"] == stack),
        )
        for stack in STACKS
    }
    fast, plain = figures["httptools+uvloop"], figures["h11+asyncio"]
    return {
        "stacks": {
            s: {**asdict(f), "median_rps": f.median_rps, "median_p99_ms": f.median_p99_ms}
            for s, f in figures.items()
        },
        "throughput_ratio": round(fast.median_rps / plain.median_rps, 3),
        "p99_ratio": round(fast.median_p99_ms / plain.median_p99_ms, 3),
    }


def measure(settings: Settings, rounds: int, seconds: float, concurrency: int) -> dict[str, Any]:
    configs = {name: {"http_parser": p, "event_loop": loop} for name, (p, loop) in STACKS.items()}
    results = interleaved_rounds(settings, configs, rounds, seconds, concurrency, "stack")
    return {
        "machine": machine_info(usable_cpus()),
        "runtime": settings.runtime,
        "workers": usable_cpus(),
        "concurrency": concurrency,
        "seconds_per_round": seconds,
        "rounds": results,
        **summarise(results),
    }


def main() -> None:
    report = interleaved.main(__doc__ or "", measure, "httpstack.json")
    for stack, fig in report["stacks"].items():
        print(f"{stack:18s} {fig['median_rps']:7.1f} req/s  p99 {fig['median_p99_ms']:7.1f} ms")
    print(f"throughput ratio {report['throughput_ratio']}  p99 ratio {report['p99_ratio']}")


if __name__ == "__main__":
    main()
