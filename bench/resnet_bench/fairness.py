"""``make bench-fair``: priorities and overload against issue 30's goals, on 1 and 2 workers.

Against real ``serve`` processes on 127.0.0.1 (random weights: speed does not depend on them),
with the project's lean load generator (its CPU share is reported):

- capacity: a closed loop of 16 clients (and its p99);
- priorities: an interactive open loop at 30% of capacity alone, then beside a closed loop of
  32 bulk clients marked ``Priority: u=7``, then beside the same 32 clients unmarked (what the
  priorities buy). Goals: interactive p99 <= 1.5x its p99 alone; bulk keeps >= 0.8 of the
  capacity the interactive load leaves over;
- 10x: an open loop at ten times capacity on one model. Goals: goodput >= 0.9x capacity,
  refusal p99 <= 50 ms, accepted p99 <= 2x the 16-client p99.

Writes ``bench/fairness.json``. Every process it starts is stopped by process group; all
traffic is bounded in time.

    python -m resnet_bench.fairness [--seconds 10] [--workers 1 2] [--out bench]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from resnet_bench import loadgen
from resnet_bench.images import bench_images
from resnet_bench.runner import machine_info
from resnet_bench.servers import random_weights_service
from resnet_service.cpus import usable_cpus

HOST = "127.0.0.1"
BULK_CLIENTS = 32
INTERACTIVE_SHARE = 0.3
BULK = [("Priority", "u=7")]
FLOOD_START_S = 1.0


def _rps(result: loadgen.LoadResult) -> float:
    return round(result.ok / result.elapsed_s, 1)


async def _beside(
    port: int, interactive: bytes, rate: float, bulk: bytes, seconds: float
) -> tuple[loadgen.LoadResult, loadgen.LoadResult]:
    """The interactive open loop for ``seconds`` beside the bulk closed loop (started first,
    stopped when the interactive loop ends)."""
    stop = asyncio.Event()
    load = asyncio.create_task(
        loadgen.closed_loop(HOST, port, bulk, BULK_CLIENTS, 10 * seconds, stop=stop)
    )
    await asyncio.sleep(1.0)  # the bulk load's queue forms first
    measured = await loadgen.open_loop(HOST, port, interactive, rate, seconds)
    stop.set()
    return measured, await load


def measure(workers: int, seconds: float, workdir: Path) -> dict[str, Any]:
    image = bench_images(["jpeg-500x375"])["jpeg-500x375"].data
    with random_weights_service(workdir, f"serve-{workers}", workers) as srv:
        port = srv.port

        def request(headers: list[tuple[str, str]]) -> bytes:
            return loadgen.multipart_request(
                HOST, port, "/classify", "image", "p.jpg", image, "image/jpeg", headers
            )

        plain, bulk = request([]), request(BULK)
        asyncio.run(loadgen.closed_loop(HOST, port, plain, 16, 2.0))  # warm
        c16 = asyncio.run(loadgen.closed_loop(HOST, port, plain, 16, seconds))
        capacity = c16.ok / c16.elapsed_s
        rate = INTERACTIVE_SHARE * capacity
        alone = asyncio.run(loadgen.open_loop(HOST, port, plain, rate, seconds))
        marked, marked_bulk = asyncio.run(_beside(port, plain, rate, bulk, seconds))
        unmarked, unmarked_bulk = asyncio.run(_beside(port, plain, rate, plain, seconds))
        flood = asyncio.run(loadgen.open_loop(HOST, port, plain, 10 * capacity, seconds))
    left_over = capacity - rate
    alone_p99 = alone.percentile_ms(99) or float("nan")
    c16_p99 = c16.percentile_ms(99) or float("nan")
    return {
        "workers": workers,
        "capacity_rps": round(capacity, 1),
        "c16_p99_ms": c16_p99,
        "interactive_rate_rps": round(rate, 1),
        "interactive_alone": {
            "p50_ms": alone.percentile_ms(50),
            "p99_ms": alone_p99,
            "ok": alone.ok,
        },
        "beside_bulk_marked": {
            "interactive_p50_ms": marked.percentile_ms(50),
            "interactive_p99_ms": marked.percentile_ms(99),
            "interactive_refused": marked.summary().get("codes"),
            "bulk_rps": _rps(marked_bulk),
            "client_cpu_s": round(marked.client_cpu_s, 2),
            "elapsed_s": round(marked.elapsed_s, 2),
        },
        "beside_bulk_unmarked": {
            "interactive_p50_ms": unmarked.percentile_ms(50),
            "interactive_p99_ms": unmarked.percentile_ms(99),
            "bulk_rps": _rps(unmarked_bulk),
        },
        "flood_10x": {
            "goodput_rps": _rps(flood),
            "refused": int(sum(flood.codes.values())),
            "accepted_p99_ms": flood.percentile_ms(99),
            "refused_p99_ms": flood.percentile_ms(99, 503),
            # The first interval of a flood is admitted as a burst would be, and dropped as
            # stale once the queue is found standing: those refusals come late.
            "accepted_p99_after_1s_ms": flood.percentile_ms(99, after_s=FLOOD_START_S),
            "refused_p99_after_1s_ms": flood.percentile_ms(99, 503, after_s=FLOOD_START_S),
            "client_cpu_s": round(flood.client_cpu_s, 2),
            "elapsed_s": round(flood.elapsed_s, 2),
        },
        "goals": {
            "interactive_p99_over_alone": _ratio(marked.percentile_ms(99), alone_p99, "<=", 1.5),
            "bulk_over_left_over": _ratio(_rps(marked_bulk), left_over, ">=", 0.8),
            "goodput_10x_over_capacity": _ratio(_rps(flood), capacity, ">=", 0.9),
            "accepted_p99_10x_over_c16_p99": _ratio(flood.percentile_ms(99), c16_p99, "<=", 2.0),
            "refused_p99_10x_ms": _goal(flood.percentile_ms(99, 503), "<=", 50.0),
        },
    }


def _ratio(value: float | None, base: float, op: str, goal: float) -> dict[str, Any]:
    return _goal(None if value is None else value / base, op, goal)


def _goal(value: float | None, op: str, goal: float) -> dict[str, Any]:
    met = value is not None and (value <= goal if op == "<=" else value >= goal)
    return {"value": None if value is None else round(value, 3), "goal": f"{op} {goal}", "met": met}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=Path("bench"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fair-") as tmp:
        runs = [measure(w, args.seconds, Path(tmp)) for w in args.workers]
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(usable_cpus()),
        "seconds": args.seconds,
        "bulk_clients": BULK_CLIENTS,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fairness.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
