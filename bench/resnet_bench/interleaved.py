"""Interleaved rounds of the service in several configurations (A B C A B C ...): a noisy
neighbour hurts every configuration alike. Shared by ``httpstack`` and ``tracing``."""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from resnet_bench.images import bench_images
from resnet_bench.jsonable import to_json
from resnet_bench.runner import MAIN_IMAGE, closed_loop_load, serving, speed_settings
from resnet_service.config import Settings
from resnet_service.cpus import usable_cpus

log = logging.getLogger(__name__)

Measure = Callable[[Settings, int, float, int], dict[str, Any]]


def interleaved_rounds(
    settings: Settings,
    configs: Mapping[str, Mapping[str, object]],
    rounds: int,
    seconds: float,
    concurrency: int,
    key: str,
) -> list[dict[str, Any]]:
    """Each round serves every configuration (its settings ``update``) in turn: a 2 s warm-up,
    then ``seconds`` of closed loop at ``concurrency``; one row per round and configuration,
    labelled ``{key: name}``."""
    image = bench_images([MAIN_IMAGE])[MAIN_IMAGE]
    workdir = Path(tempfile.mkdtemp(prefix=f"resnet-{key}-"))
    results: list[dict[str, Any]] = []
    for i in range(rounds):
        for name, update in configs.items():
            log.info("round %d: %s %s", i + 1, key, name)
            with serving(settings, usable_cpus(), workdir / f"{name}.log", **update) as srv:
                closed_loop_load(srv.port, "/classify", "image", image, concurrency, 2.0)
                row = closed_loop_load(srv.port, "/classify", "image", image, concurrency, seconds)
            results.append({key: name, **to_json(row)})
    return results


def main(doc: str, measure: Measure, out_name: str) -> dict[str, Any]:
    """The command line of an interleaved benchmark: run it, write ``out/out_name``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    report = measure(speed_settings(Settings()), args.rounds, args.seconds, args.concurrency)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / out_name).write_text(json.dumps(report, indent=2))
    return report
