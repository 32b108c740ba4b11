"""``make robustness``: the robustness suite's probes at full size, reported against goals.

Against real ``serve`` processes on 127.0.0.1 (2 workers unless the host has fewer CPUs):
overload at 2x and 10x capacity (open loop) with recovery time; a soak of 100k requests with
10% bad inputs (RSS, fds, threads before and after); ``kill -9`` of a worker under load;
SIGTERM under load; coverage-guided fuzzing of the decoder and the multipart reader. Writes
``bench/robustness.json`` and the table ``scripts/update_docs.py robustness`` pastes into
``docs/robustness.md``. Every process it starts is stopped by process group; all traffic is
bounded in time.

    python -m resnet_bench.robustness [--quick] [--out bench]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from resnet_bench import loadgen
from resnet_bench.images import bench_images
from resnet_bench.runner import machine_info
from resnet_bench.servers import (
    Running,
    cpu_seconds,
    memory_mb,
    metric_sum,
    process_children,
    python,
    random_weights_service,
)
from resnet_service.cpus import resolve_workers, usable_cpus

log = logging.getLogger(__name__)
HOST = "127.0.0.1"
GOALS = {
    "goodput_10x_over_capacity": ("≥", 0.9),
    "accepted_p99_10x_over_p99_c16": ("≤", 2.0),
    "refused_p99_10x_ms": ("≤", 50.0),
    "recovery_10x_s": ("≤", 1.0),
    "refusal_cpu_over_accepted_cpu": ("≤", 0.02),
    "kill9_not_ready_answers": ("≤", 0),
    "kill9_gauge_error_first_scrape": ("≤", 0),
    "sigterm_requests_lost": ("≤", 0),
    "soak_rss_growth_mb": ("<", 50.0),
    "soak_5xx": ("≤", 0),
    "fuzz_crashes_and_hangs": ("≤", 0),
}


@dataclass(frozen=True)
class Options:
    out_dir: Path
    quick: bool = False

    @property
    def capacity_s(self) -> float:
        return 2.0 if self.quick else 10.0

    @property
    def overload_s(self) -> float:
        return 3.0 if self.quick else 20.0

    @property
    def soak_requests(self) -> int:
        return 2_000 if self.quick else 100_000

    @property
    def fuzz_s(self) -> int:
        return 10 if self.quick else 300  # per target: two targets, 10 minutes in all


def _payloads(port: int) -> tuple[bytes, list[bytes]]:
    """A good request, and the soak's mix: nine good, one of the bad kinds in turn."""
    good_image = bench_images(["jpeg-500x375"])["jpeg-500x375"].data
    bad_images = [
        b"\x00" * 512,  # unknown binary
        good_image[: len(good_image) // 3],  # truncated JPEG
        b"\x00\x00\x00\x18ftypheic" + b"\x00" * 256,  # HEIC
        b"",  # empty
        b"I am a text file, not a photo.\n" * 20,
    ]

    def request(data: bytes) -> bytes:
        return loadgen.multipart_request(
            HOST, port, "/classify", "image", "p.jpg", data, "image/jpeg"
        )

    good = request(good_image)
    mix = [good] * 9
    return good, [p for bad in bad_images for p in (*mix, request(bad))]


def _metric(port: int, family: str, **labels: str) -> float:
    return metric_sum(f"http://{HOST}:{port}", family, **labels)


def _recovery_s(port: int, good: bytes, normal_ms: float, limit_s: float = 30.0) -> float:
    """Seconds from the end of a flood until three lone requests in a row are back to normal
    latency (within 2x the pre-flood median, plus 10 ms)."""
    started = time.perf_counter()

    async def probe() -> float:
        streak = 0
        while time.perf_counter() - started < limit_s:
            # One request: bounded by max_requests (a zero duration would send none).
            lone = await loadgen.closed_loop(HOST, port, good, 1, limit_s, max_requests=1, warmup=0)
            fast = lone.ok == 1 and lone.latencies[0] * 1000 <= 2 * normal_ms + 10
            streak = streak + 1 if fast else 0
            if streak == 3:
                return time.perf_counter() - started
        return float("inf")

    return round(asyncio.run(probe()), 3)


def overload(srv: Running, good: bytes, opts: Options) -> dict[str, Any]:
    """Capacity at 16 clients (and the server CPU an accepted request costs), then open-loop
    floods at 2x and 10x, each with recovery."""
    port = srv.port
    alone = asyncio.run(loadgen.closed_loop(HOST, port, good, 1, opts.capacity_s / 2))
    cpu_before = cpu_seconds(srv.process.pid)
    cap = asyncio.run(loadgen.closed_loop(HOST, port, good, 16, opts.capacity_s))
    cpu_per_accepted = (cpu_seconds(srv.process.pid) - cpu_before) / max(cap.ok, 1)
    out: dict[str, Any] = {
        "c1": alone.summary(),
        "c16": cap.summary(),
        "capacity_rps": cap.summary()["rps"],
        "server_cpu_ms_per_accepted": round(cpu_per_accepted * 1000, 3),
    }
    normal = float(np.percentile(alone.latency_ms(200), 50))
    for factor in (2, 10):
        rate = factor * float(cap.summary()["rps"])  # type: ignore[arg-type]
        flood = asyncio.run(loadgen.open_loop(HOST, port, good, rate, opts.overload_s))
        out[f"{factor}x"] = {
            **flood.summary(),
            "goodput_rps": round(flood.ok / flood.elapsed_s, 1),
            "accepted_p50_ms": flood.percentile_ms(50, 200),
            "accepted_p99_ms": flood.percentile_ms(99, 200),
            "refused_p50_ms": flood.percentile_ms(50, 503),
            "refused_p99_ms": flood.percentile_ms(99, 503),
            "recovery_s": _recovery_s(port, good, normal),
        }
    return out


def refusal_cost(workdir: Path, good: bytes, opts: Options) -> dict[str, Any]:
    """Server CPU per refusal: a replica held at capacity by stalled uploads (admitted, never
    finished; a 1 ms deadline bound) refuses everything else; an open loop of the 10x flood's
    requests (same bytes, kept-alive connections) then costs only refusals."""
    env = {"RESNET_SERVICE_QUEUE_BUDGET_MS": "1", "RESNET_SERVICE_BODY_TIMEOUT_S": "120"}
    with random_weights_service(workdir, "refusals", resolve_workers(0), env=env) as srv:
        stalled = [socket.create_connection((HOST, srv.port)) for _ in range(16)]
        try:
            for sock in stalled:  # the kernel spreads them over the workers
                sock.sendall(good[:1000])
            _wait_for_refusals(srv.port, good)
            before = cpu_seconds(srv.process.pid)
            flood = asyncio.run(
                loadgen.open_loop(HOST, srv.port, good, 1000.0, opts.overload_s / 2)
            )
            spent = cpu_seconds(srv.process.pid) - before
        finally:
            for sock in stalled:
                sock.close()
    refused = flood.statuses.get(503, 0)
    return {
        **flood.summary(),
        "refused": refused,
        "server_cpu_s": round(spent, 3),
        "server_cpu_us_per_refusal": round(spent / max(refused, 1) * 1e6, 1),
    }


def _wait_for_refusals(port: int, good: bytes, limit_s: float = 10.0) -> None:
    """Poll until requests are refused (the stalled uploads' heads were admitted)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        probe = asyncio.run(loadgen.closed_loop(HOST, port, good, 4, 1.0, max_requests=8, warmup=0))
        if probe.statuses.get(503, 0) == 8:
            return
    raise RuntimeError("the replica never reached capacity: stalled uploads not admitted")


def _workers_state(pid: int) -> dict[str, int]:
    threads = fds = 0
    for child in process_children(pid):
        try:
            process = psutil.Process(child)
            fds += process.num_fds()
            threads += process.num_threads()
        except psutil.Error:
            continue
    return {"threads": threads, "fds": fds}


def soak(srv: Running, mix: list[bytes], opts: Options) -> dict[str, Any]:
    """``soak_requests`` requests, 10% of them bad, at 8 clients: no 5xx, bounded growth."""
    before = {**memory_mb(srv.process.pid), **_workers_state(srv.process.pid)}
    result = asyncio.run(
        loadgen.closed_loop(
            HOST, srv.port, mix, 8, 24 * 3600.0, max_requests=opts.soak_requests, warmup=0
        )
    )
    after = {**memory_mb(srv.process.pid), **_workers_state(srv.process.pid)}
    server_errors = sum(v for k, v in result.statuses.items() if k >= 500)
    return {
        "requests": len(result.latencies) + result.errors,
        "statuses": result.summary()["statuses"],
        "codes": dict(result.codes),
        "failures": dict(result.failures),
        "5xx": server_errors,
        "before": before,
        "after": after,
        "rss_growth_mb": round(after["rss_mb"] - before["rss_mb"], 1),
    }


def kill9(workdir: Path, good: bytes, opts: Options) -> dict[str, Any]:
    """``kill -9`` one worker at 16 clients: what failed, what the replacement said."""
    with random_weights_service(workdir, "kill9", resolve_workers(0)) as srv:
        victim = process_children(srv.process.pid)[0]

        async def scenario() -> loadgen.LoadResult:
            load = asyncio.create_task(
                loadgen.closed_loop(HOST, srv.port, good, 16, opts.capacity_s + 6)
            )
            await asyncio.sleep(3)
            os.kill(victim, signal.SIGKILL)
            return await load

        result = asyncio.run(scenario())
        in_flight = _metric(srv.port, "resnet_service_in_flight_requests")
        queue_depth = _metric(srv.port, "resnet_service_queue_depth")
        return {
            **result.summary(),
            "not_ready_answers": int(result.codes.get("not_ready", 0)),
            "lost": int(result.failures.get(loadgen.LOST, 0)),
            # The first scrape after the load: itself in flight, nothing queued.
            "gauge_error_first_scrape": abs(in_flight - 1) + abs(queue_depth),
            "replaced": victim not in process_children(srv.process.pid),
        }


def sigterm(workdir: Path, good: bytes) -> dict[str, Any]:
    """SIGTERM to the supervisor at 32 keep-alive clients, with a 1 s drain delay."""
    with random_weights_service(
        workdir, "sigterm", resolve_workers(0), "--drain-delay", "1"
    ) as srv:

        async def scenario() -> tuple[loadgen.LoadResult, float]:
            load = asyncio.create_task(
                loadgen.closed_loop(HOST, srv.port, good, 32, 60.0, timeout_s=30)
            )
            await asyncio.sleep(2)
            started = time.monotonic()
            srv.process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(srv.process.wait, 90)
            stopped = time.monotonic() - started
            return await load, stopped

        result, stopped = asyncio.run(scenario())
        return {
            **result.summary(),
            "lost": int(result.failures.get(loadgen.LOST, 0)),
            "exit_code": srv.process.returncode,
            "stop_s": round(stopped, 2),
        }


def fuzz(workdir: Path, opts: Options) -> dict[str, Any]:
    """Both atheris targets for ``fuzz_s`` seconds each, 10 s per input counts as a hang."""
    corpus = workdir / "corpus"
    corpus.mkdir()
    for name, image in bench_images(["jpeg-500x375"]).items():
        (corpus / name).write_bytes(image.data)
    out: dict[str, Any] = {}
    for target in ("decoder", "multipart"):
        artifacts = workdir / f"fuzz-{target}"
        artifacts.mkdir()
        cmd = [python(), "-m", "resnet_bench.fuzz", target]
        if target == "decoder":
            cmd.append(str(corpus))
        cmd += [f"-max_total_time={opts.fuzz_s}", "-timeout=10", f"-artifact_prefix={artifacts}/"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        runs = next(
            (ln.split()[1] for ln in proc.stderr.splitlines() if ln.startswith("Done ")), "0"
        )
        found = sorted(p.name for p in artifacts.iterdir())
        out[target] = {
            "seconds": opts.fuzz_s,
            "runs": int(runs),
            "exit_code": proc.returncode,
            "crashes": sum(1 for f in found if f.startswith("crash")),
            "hangs": sum(1 for f in found if f.startswith(("timeout", "slow"))),
            "artifacts": found,
        }
    return out


def _goals(report: dict[str, Any]) -> dict[str, Any]:
    over = report["overload"]
    ten = over["10x"]
    values = {
        "goodput_10x_over_capacity": round(ten["goodput_rps"] / over["capacity_rps"], 3),
        "accepted_p99_10x_over_p99_c16": round(
            (ten["accepted_p99_ms"] or float("inf")) / over["c16"]["p99_ms"], 2
        ),
        "refused_p99_10x_ms": ten["refused_p99_ms"],
        "recovery_10x_s": ten["recovery_s"],
        "refusal_cpu_over_accepted_cpu": round(
            report["refusals"]["server_cpu_us_per_refusal"]
            / (over["server_cpu_ms_per_accepted"] * 1000),
            4,
        ),
        "kill9_not_ready_answers": report["kill9"]["not_ready_answers"],
        "kill9_gauge_error_first_scrape": report["kill9"]["gauge_error_first_scrape"],
        "sigterm_requests_lost": report["sigterm"]["lost"],
        "soak_rss_growth_mb": report["soak"]["rss_growth_mb"],
        "soak_5xx": report["soak"]["5xx"],
        "fuzz_crashes_and_hangs": sum(t["crashes"] + t["hangs"] for t in report["fuzz"].values()),
    }
    compare = {"≥": lambda v, t: v >= t, "≤": lambda v, t: v <= t, "<": lambda v, t: v < t}
    return {
        name: {
            "value": values[name],
            "goal": f"{op} {target}",
            "met": values[name] is not None and compare[op](values[name], target),
        }
        for name, (op, target) in GOALS.items()
    }


def run(opts: Options) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="resnet-robustness-"))
    started = time.perf_counter()
    try:
        report: dict[str, Any] = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "quick": opts.quick,
            "machine": machine_info(usable_cpus()),
            "workers": resolve_workers(0),
        }
        with random_weights_service(workdir, "service", resolve_workers(0)) as srv:
            good, mix = _payloads(srv.port)
            log.info("overload at 2x and 10x capacity")
            report["overload"] = overload(srv, good, opts)
            log.info("soak: %d requests, 10%% bad", opts.soak_requests)
            report["soak"] = soak(srv, mix, opts)
        log.info("server CPU per refusal")
        report["refusals"] = refusal_cost(workdir, good, opts)
        log.info("kill -9 of a worker under load")
        report["kill9"] = kill9(workdir, good, opts)
        log.info("SIGTERM under load")
        report["sigterm"] = sigterm(workdir, good)
        log.info("fuzzing %d s per target", opts.fuzz_s)
        report["fuzz"] = fuzz(workdir, opts)
        report["goals"] = _goals(report)
        report["seconds"] = round(time.perf_counter() - started, 1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    (opts.out_dir / "robustness.json").write_text(json.dumps(report, indent=2))
    print(render_table(report))
    return report


def render_table(report: dict[str, Any]) -> str:
    """The docs/robustness.md table: each goal with its value, and the figures behind it."""
    m = report["machine"]
    over = report["overload"]
    lines = [
        f"Robustness run {report['date']} on {m['cpu']} ({m['usable_cpus']} usable CPUs), "
        f"{report['workers']} workers{' [QUICK MODE]' if report['quick'] else ''}",
        "",
        "| goal | value | target | met |",
        "|---|---|---|---|",
        *(
            f"| {name} | {g['value']} | {g['goal']} | {'yes' if g['met'] else 'NO'} |"
            for name, g in report["goals"].items()
        ),
        "",
        "| load | offered | goodput req/s | accepted p50 / p99 ms | refused p50 / p99 ms | "
        "recovery s |",
        "|---|---|---|---|---|---|",
        f"| closed loop, 16 clients | - | {over['c16']['rps']} | {over['c16']['p50_ms']} / "
        f"{over['c16']['p99_ms']} | - | - |",
    ]
    for factor in ("2x", "10x"):
        row = over[factor]
        lines.append(
            f"| open loop, {factor} capacity | {round(row['rate'], 1)}/s | {row['goodput_rps']} | "
            f"{row['accepted_p50_ms']} / {row['accepted_p99_ms']} | {row['refused_p50_ms']} / "
            f"{row['refused_p99_ms']} | {row['recovery_s']} |"
        )
    soak_, kill, term = report["soak"], report["kill9"], report["sigterm"]
    ref = report["refusals"]
    lines += [
        "",
        f"Server CPU: {over['server_cpu_ms_per_accepted']} ms per accepted request (16 "
        f"clients); {ref['server_cpu_us_per_refusal']} us per refusal ({ref['refused']} "
        f"refusals, kept-alive connections, the same ~100 kB request).",
        f"Soak: {soak_['requests']} requests (10% bad), statuses {soak_['statuses']}, RSS "
        f"{soak_['before']['rss_mb']} -> {soak_['after']['rss_mb']} MB, fds "
        f"{soak_['before']['fds']} -> {soak_['after']['fds']}, threads "
        f"{soak_['before']['threads']} -> {soak_['after']['threads']}.",
        f"kill -9 of a worker at 16 clients: {kill['lost']} requests lost (its in-flight), "
        f"{kill['not_ready_answers']} not_ready answers, replaced: {kill['replaced']}.",
        f"SIGTERM at 32 clients (1 s drain): {term['ok']} answered, {term['lost']} lost, "
        f"{term['failures'].get('refused', 0)} refused after the stop, exit {term['exit_code']} "
        f"in {term['stop_s']} s.",
        "Fuzz: "
        + "; ".join(
            f"{name} {t['runs']} runs in {t['seconds']} s, {t['crashes']} crashes, "
            f"{t['hangs']} hangs"
            for name, t in report["fuzz"].items()
        )
        + ".",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds, not minutes")
    parser.add_argument("--out", type=Path, default=Path("bench"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    report = run(Options(out_dir=args.out, quick=args.quick))
    return 0 if all(g["met"] for g in report["goals"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
