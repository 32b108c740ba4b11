"""The peers run: each peer, then the service, one after the other, and ``peers.json``;
and its command line (``python -m resnet_bench.peers``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from resnet_bench import peers as this_package
from resnet_bench.images import bench_images
from resnet_bench.peers.load import ServerResult
from resnet_bench.peers.options import DEFAULT_VENV, PeerOptions
from resnet_bench.peers.report import (
    GOAL_CONCURRENCY,
    PeerReport,
    Ratios,
    reading_notes,
    render,
)
from resnet_bench.peers.service import bench_our_service, resolve_weights, same_weights
from resnet_bench.peers.torchserve import PEER_REQUIREMENTS, bench_torchserve, peer_versions
from resnet_bench.peers.venv import ensure_peer_venv
from resnet_bench.runner import MAIN_IMAGE, machine_info

log = logging.getLogger(__name__)


def run_peers(opts: PeerOptions) -> PeerReport:
    """Both servers, one after the other, in one run; ``peers.json`` under ``opts.out_dir``."""
    started = time.perf_counter()
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    versions: dict[str, str] = {}
    peer_python = None
    if "TorchServe" in opts.peers:
        peer_python = ensure_peer_venv(opts.venv, PEER_REQUIREMENTS)
        versions = peer_versions(peer_python)  # before any load: a missing Java fails here
    weights = resolve_weights(os.environ)
    log.info("weights: %s (sha256 %s)", weights.source.value, weights.sha256[:12])
    image = bench_images([MAIN_IMAGE])[MAIN_IMAGE]
    workdir = Path(tempfile.mkdtemp(prefix="resnet-peers-"))
    peers: list[ServerResult] = []
    try:
        if peer_python is not None:
            peers.append(bench_torchserve(peer_python.parent, weights, image, opts, workdir))
        if "BentoML" in opts.peers:
            from resnet_bench.peers.bentoml import BENTOML_VERSION, bench_bentoml

            versions["bentoml"] = BENTOML_VERSION
            peers.append(bench_bentoml(weights, image, opts, workdir))
        service = bench_our_service(weights, image, opts, workdir)
    except BaseException:
        log.error("peer benchmark failed; logs kept in %s", workdir)
        raise
    if not opts.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    same = same_weights(service.probe, weights)
    servers = [service, *peers]
    report = PeerReport(
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        machine=machine_info(1),
        peer_versions=versions,
        image=image.name,
        image_bytes=len(image.data),
        weights_source=weights.source.value,
        weights_sha256=weights.sha256[:12],
        same_weights=same,
        duration_s=opts.duration_s,
        servers=servers,
        ratios=[Ratios.of(service, p, c) for p in peers for c in opts.concurrencies],
        seconds=round(time.perf_counter() - started, 1),
        notes=reading_notes(servers, same, weights),
    )
    out = opts.out_dir / "peers.json"
    out.write_text(json.dumps(asdict(report), indent=2, ensure_ascii=False))
    log.info("wrote %s", out)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m resnet_bench.peers",
        description=(this_package.__doc__ or "").split("\n\n")[0],
    )
    parser.add_argument("--out", type=Path, default=Path("bench"), help="where peers.json goes")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per level")
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, GOAL_CONCURRENCY, 64],
        help="closed-loop levels (the goals are read at the highest; they are set at 16)",
    )
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="TorchServe's venv")
    parser.add_argument(
        "--peer",
        choices=["TorchServe", "BentoML"],
        action="append",
        help="run only these peers (default: both)",
    )
    parser.add_argument(
        "--keep-workdir", action="store_true", help="keep the archive, config and logs"
    )
    args = parser.parse_args(argv)
    if args.duration <= 0 or min(args.concurrency) < 1:
        parser.error("--duration and every --concurrency must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness poll
    opts = PeerOptions(
        out_dir=args.out,
        venv=args.venv,
        duration_s=args.duration,
        concurrencies=tuple(sorted(set(args.concurrency))),
        keep_workdir=args.keep_workdir,
        peers=tuple(args.peer or ("TorchServe", "BentoML")),
    )
    print(render(run_peers(opts)))
    return 0
