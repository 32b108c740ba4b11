"""``make bench-tracing``: what OpenTelemetry tracing costs the service, and that off is free.

Three configurations of the same replica at 16 clients, rounds interleaved (off, on, off
again, ...) so that a noisy neighbour hurts all alike: tracing off (the default), tracing on
(every request sampled, spans exported over OTLP/HTTP to a receiver here that accepts and
drops them), and off once more, whose ratio to the first off is the noise floor that "off is
within noise" is judged against. Writes ``bench/tracing.json``.

    python -m resnet_bench.tracing --out bench [--rounds 3] [--seconds 10]
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

from resnet_bench import interleaved
from resnet_bench.interleaved import interleaved_rounds
from resnet_bench.runner import machine_info
from resnet_service.config import Settings
from resnet_service.cpus import usable_cpus

log = logging.getLogger(__name__)

#: Configuration name -> tracing on. "off-again" measures the noise between equal servers.
CONFIGS: Final = {"off": False, "on": True, "off-again": False}


@dataclass
class Sink:
    """Counts the OTLP export requests it accepted (and drops their spans)."""

    url: str = ""
    exports: int = 0
    exported_bytes: int = 0


@contextmanager
def otlp_sink() -> Iterator[Sink]:
    """A local OTLP/HTTP endpoint that answers 200 to every export."""
    sink = Sink()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            size = int(self.headers.get("Content-Length", "0"))
            self.rfile.read(size)
            sink.exports += 1
            sink.exported_bytes += size
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    sink.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield sink
    finally:
        server.shutdown()
        server.server_close()


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per configuration and the two ratios that matter."""
    medians = {
        name: {
            "rps": [r["rps"] for r in rounds if r["config"] == name],
            "median_rps": round(
                statistics.median(r["rps"] for r in rounds if r["config"] == name), 1
            ),
            "median_p99_ms": round(
                statistics.median(r["p99_ms"] for r in rounds if r["config"] == name), 1
            ),
        }
        for name in CONFIGS
    }
    off, on, again = (medians[n]["median_rps"] for n in CONFIGS)
    return {
        "configs": medians,
        "on_over_off_throughput": round(on / off, 3),
        "on_over_off_p99": round(
            medians["on"]["median_p99_ms"] / medians["off"]["median_p99_ms"], 3
        ),
        "noise_off_again_over_off": round(again / off, 3),
    }


def measure(settings: Settings, rounds: int, seconds: float, concurrency: int) -> dict[str, Any]:
    configs = {name: {"tracing": traced} for name, traced in CONFIGS.items()}
    with otlp_sink() as sink:
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.url  # inherited by the servers
        results = interleaved_rounds(settings, configs, rounds, seconds, concurrency, "config")
        exports = {"exports": sink.exports, "exported_bytes": sink.exported_bytes}
    return {
        "machine": machine_info(usable_cpus()),
        "runtime": settings.runtime,
        "workers": usable_cpus(),
        "concurrency": concurrency,
        "seconds_per_round": seconds,
        "sampler": "parentbased_always_on (every request traced)",
        "otlp": exports,
        "rounds": results,
        **summarise(results),
    }


def main() -> None:
    report = interleaved.main(__doc__ or "", measure, "tracing.json")
    for name, fig in report["configs"].items():
        print(
            f"tracing {name:9s} {fig['median_rps']:7.1f} req/s  p99 {fig['median_p99_ms']:7.1f} ms"
        )
    print(
        f"on/off throughput {report['on_over_off_throughput']}  p99 {report['on_over_off_p99']}"
        f"  noise (off again/off) {report['noise_off_again_over_off']}"
    )


if __name__ == "__main__":
    main()
