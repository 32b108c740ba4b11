"""The service's side of the peers run: the weights every server gets, ``serve`` the
default way, its probe (which names its weights) and its run."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from resnet_bench import loadgen
from resnet_bench.images import BenchImage
from resnet_bench.peers.load import Probe, ServerResult, drive
from resnet_bench.peers.options import PeerOptions
from resnet_bench.peers.processes import READY_TIMEOUT_S, StartedServer
from resnet_bench.servers import memory_mb, python, running
from resnet_service.cpus import resolve_workers, threads_per_worker
from resnet_service.model.weights import (
    ResolvedWeights,
    WeightsSource,
    resolve_fp32_weights,
)

log = logging.getLogger(__name__)


def resolve_weights(environ: Mapping[str, str]) -> ResolvedWeights:
    """The service's fp32 weights, found as the naive baseline finds them: the explicit path
    if set, else the hub cache, else the seeded random weights (never a download, so both
    servers surely get the same tensors)."""
    explicit = environ.get("RESNET_SERVICE_WEIGHTS_PATH")
    return resolve_fp32_weights(
        Path(explicit) if explicit else None,
        allow_downloads=False,
        allow_random=explicit is None,
    )


def same_weights(probe: Probe, weights: ResolvedWeights) -> bool:
    """Whether the hash prefix the service reports is that of the weights TorchServe got."""
    reported = probe.weights_sha256 or ""
    return bool(reported) and weights.sha256.startswith(reported)


@contextmanager
def running_service(env: Mapping[str, str], workdir: Path) -> Iterator[StartedServer]:
    """``resnet-service serve`` the default way (default runtime and layout) on a free port;
    its gRPC face on any free port so that it never meets another engineer's server."""
    cmd = [python(), "-m", "resnet_service", "serve", "--grpc-port", "0"]
    started = time.perf_counter()
    with running(
        cmd, dict(env), "/readyz", workdir / "service.log", READY_TIMEOUT_S, ready_count=4
    ) as srv:
        yield StartedServer(srv.process, srv.port, round(time.perf_counter() - started, 2))


def probe_service(port: int, image: BenchImage) -> Probe:
    """The service's answer names its weights' hash: proof that it loaded the same ones."""
    answer = httpx.post(
        f"http://127.0.0.1:{port}/classify",
        files={"image": (f"{image.name}.jpg", image.data, image.content_type)},
        timeout=60,
    )
    answer.raise_for_status()
    body = answer.json()
    best = body["predictions"][0]
    model = body["model"]
    served = f"{model['runtime']} {model['precision']}"
    return Probe(best["label"], round(best["score"], 4), model["weights_sha256"], served)


def service_env(weights: ResolvedWeights) -> dict[str, str]:
    """Never a download (the peer never gets one); random weights only when the peer got the
    same seeded random ones. An explicit weights path reaches the service from the
    environment it inherits."""
    env = {"RESNET_SERVICE_ALLOW_DOWNLOADS": "false"}
    if weights.source is WeightsSource.RANDOM:
        env["RESNET_SERVICE_ALLOW_RANDOM_WEIGHTS"] = "true"
    return env


def bench_our_service(
    weights: ResolvedWeights, image: BenchImage, opts: PeerOptions, workdir: Path
) -> ServerResult:
    """The service as deployed by default, under the same load."""
    log.info("resnet-service: default runtime and layout")
    with running_service(service_env(weights), workdir) as srv:
        probe = probe_service(srv.port, image)
        payload = loadgen.multipart_request(
            "127.0.0.1",
            srv.port,
            "/classify",
            "image",
            f"{image.name}.jpg",
            image.data,
            image.content_type,
        )
        levels = drive(srv.port, payload, opts.concurrencies, opts.duration_s)
        memory = memory_mb(srv.process.pid)
    workers = resolve_workers(0)
    layout = (
        f"default: {probe.model}, {workers} worker(s) x {threads_per_worker(0, workers)} thread(s)"
    )
    return ServerResult("resnet-service", layout, srv.startup_s, probe, levels, memory)
