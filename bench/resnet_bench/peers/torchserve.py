"""TorchServe as the peers run starts it: its venv's versions, its configuration (layout,
ports, ``config.properties``, environment), the server itself, its probe and its run."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx

from resnet_bench.images import BenchImage
from resnet_bench.peers.archive import MODEL_NAME, archive_model, write_archive_inputs
from resnet_bench.peers.load import Probe, ServerResult, drive
from resnet_bench.peers.options import PeerOptions
from resnet_bench.peers.processes import READY_TIMEOUT_S, StartedServer, wait_until
from resnet_bench.servers import free_port, memory_mb, stop_process_group
from resnet_service.cpus import usable_cpus
from resnet_service.model.torch_network import imagenet_labels
from resnet_service.model.weights import ResolvedWeights

log = logging.getLogger(__name__)

TORCHSERVE_VERSION: Final = "0.12.0"
#: torch and torchvision at the project's versions lie on this machine's disk (any other
#: version downloads gigabytes); the stock vision handler imports captum and TorchServe's
#: utilities import yaml, yet the torchserve package declares neither.
PEER_REQUIREMENTS: Final = (
    "torch==2.14.1",
    "torchvision==0.29.1",
    f"torchserve=={TORCHSERVE_VERSION}",
    f"torch-model-archiver=={TORCHSERVE_VERSION}",
    "pyyaml",
    "captum",
)
PEER_DISTRIBUTIONS: Final = (
    "torchserve",
    "torch-model-archiver",
    "torch",
    "torchvision",
    "captum",
    "pyyaml",
    "pillow",
)


def peer_versions(peer_python: Path) -> dict[str, str]:
    """Versions of TorchServe and what it runs on, read inside its venv, plus Java's."""
    script = (
        "import importlib.metadata as m, json, sys; "
        "print(json.dumps({d: m.version(d) for d in sys.argv[1:]}))"
    )
    out = subprocess.run(
        [str(peer_python), "-c", script, *PEER_DISTRIBUTIONS],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    versions: dict[str, str] = json.loads(out.stdout)
    java = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=60)
    versions["java"] = (java.stderr.splitlines() or ["unknown"])[0]
    return versions


@dataclass(frozen=True)
class TorchServeLayout:
    """TorchServe tuned to this machine with its documented knobs: ``workers`` per model (one
    per usable CPU), one torch thread per worker (``OMP_NUM_THREADS``, what the performance
    guide's ``torch.set_num_threads(1)`` does, since the stock handler sets none), and
    server-side batching (``batchSize`` / ``maxBatchDelay``)."""

    workers: int
    threads_per_worker: int = 1
    batch_size: int = 8
    max_batch_delay_ms: int = 5
    response_timeout_s: int = 120

    def describe(self) -> str:
        return (
            f"stock image_classifier, fp32 eager, {self.workers} worker(s) x "
            f"{self.threads_per_worker} thread(s), batch {self.batch_size} / "
            f"{self.max_batch_delay_ms} ms"
        )


@dataclass(frozen=True)
class TorchServePorts:
    """Every port TorchServe opens, each a free one on 127.0.0.1 (it defaults to fixed ports
    that another server on this machine may hold)."""

    inference: int
    management: int
    metrics: int
    grpc_inference: int
    grpc_management: int

    @classmethod
    def free(cls) -> TorchServePorts:
        return cls(free_port(), free_port(), free_port(), free_port(), free_port())


def torchserve_config(
    ports: TorchServePorts, layout: TorchServeLayout, store: Path, archive: str
) -> str:
    """``config.properties``: loopback addresses only, the model loaded at start with the
    layout's workers and batching, no token auth (the load generator sends none), no
    management of models over HTTP, no per-minute system-metrics subprocess."""
    models = {
        MODEL_NAME: {
            "1.0": {
                "defaultVersion": True,
                "marName": archive,
                "minWorkers": layout.workers,
                "maxWorkers": layout.workers,
                "batchSize": layout.batch_size,
                "maxBatchDelay": layout.max_batch_delay_ms,
                "responseTimeout": layout.response_timeout_s,
            }
        }
    }
    properties = {
        "inference_address": f"http://127.0.0.1:{ports.inference}",
        "management_address": f"http://127.0.0.1:{ports.management}",
        "metrics_address": f"http://127.0.0.1:{ports.metrics}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_inference_port": str(ports.grpc_inference),
        "grpc_management_address": "127.0.0.1",
        "grpc_management_port": str(ports.grpc_management),
        "model_store": str(store),
        "load_models": archive,
        "models": json.dumps(models),
        "default_workers_per_model": str(layout.workers),
        "number_of_netty_threads": str(layout.workers),
        "netty_client_threads": str(layout.workers),
        "disable_token_authorization": "true",
        "enable_model_api": "false",
        "enable_envvars_config": "false",
        "install_py_dep_per_model": "false",
        "disable_system_metrics": "true",
    }
    return "".join(f"{key}={value}\n" for key, value in properties.items())


def torchserve_env(layout: TorchServeLayout, workdir: Path) -> dict[str, str]:
    """The environment TorchServe's JVM passes on to its Python workers: one torch thread
    each, and temp files, sockets, pid file and logs inside ``workdir`` (TorchServe keeps a
    machine-wide pid file in the temp dir and refuses to start beside another instance)."""
    tmp, logs = workdir / "tmp", workdir / "logs"
    tmp.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    threads = str(layout.threads_per_worker)
    return {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TMPDIR": str(tmp),
        "TEMP": str(tmp),
        "LOG_LOCATION": str(logs),
        "METRICS_LOCATION": str(logs),
    }


def _torchserve_ready(ports: TorchServePorts, workers: int) -> bool:
    """``/ping`` answers and every worker of the model reports READY."""
    try:
        if httpx.get(f"http://127.0.0.1:{ports.inference}/ping", timeout=2).status_code != 200:
            return False
        answer = httpx.get(f"http://127.0.0.1:{ports.management}/models/{MODEL_NAME}", timeout=2)
    except httpx.HTTPError:
        return False
    if answer.status_code != 200:
        return False
    described = answer.json()
    statuses = [w.get("status") for m in described for w in m.get("workers", [])]
    return statuses.count("READY") >= workers


@contextmanager
def running_torchserve(
    bin_dir: Path,
    ports: TorchServePorts,
    layout: TorchServeLayout,
    config: Path,
    store: Path,
    workdir: Path,
) -> Iterator[StartedServer]:
    """TorchServe in the foreground, its own process group, until every worker is ready;
    the whole group stopped after, whatever happened."""
    env = {k: v for k, v in os.environ.items() if k != "TS_CONFIG_FILE"}
    env.update(torchserve_env(layout, workdir))
    cmd = [
        str(bin_dir / "torchserve"),
        "--start",
        "--foreground",
        "--ncs",
        "--disable-token-auth",
        "--model-store",
        str(store),
        "--ts-config",
        str(config),
    ]
    started = time.perf_counter()
    with (workdir / "torchserve.out").open("wb") as out:
        process = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until(
            lambda: _torchserve_ready(ports, layout.workers), process, READY_TIMEOUT_S, workdir
        )
        yield StartedServer(process, ports.inference, round(time.perf_counter() - started, 2))
    finally:
        stop_process_group(process)


def raw_request(port: int, path: str, data: bytes, content_type: str) -> bytes:
    """One POST with the image as the whole body, as ``curl -T`` sends it to TorchServe (its
    cheapest input path: no multipart to parse)."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
        "Connection: keep-alive\r\n\r\n"
    ).encode()
    return head + data


def probe_torchserve(port: int, image: BenchImage) -> Probe:
    """TorchServe's stock answer is ``{label: probability}`` for its Top-5."""
    answer = httpx.post(
        f"http://127.0.0.1:{port}/predictions/{MODEL_NAME}",
        content=image.data,
        headers={"Content-Type": image.content_type},
        timeout=60,
    )
    answer.raise_for_status()
    scores: dict[str, float] = answer.json()
    label = max(scores, key=lambda k: scores[k])
    return Probe(label, round(scores[label], 4))


def bench_torchserve(
    bin_dir: Path,
    weights: ResolvedWeights,
    image: BenchImage,
    opts: PeerOptions,
    workdir: Path,
) -> ServerResult:
    """Archive the weights with the stock handler, start TorchServe tuned, load it, stop it."""
    layout = TorchServeLayout(workers=usable_cpus())
    store = workdir / "model-store"
    inputs = write_archive_inputs(weights.state_dict, imagenet_labels(), workdir / "archive")
    archive = archive_model(bin_dir, inputs, store)
    ports = TorchServePorts.free()
    config = workdir / "config.properties"
    config.write_text(torchserve_config(ports, layout, store, archive))
    log.info("TorchServe: %s", layout.describe())
    with running_torchserve(bin_dir, ports, layout, config, store, workdir) as srv:
        probe = probe_torchserve(srv.port, image)
        payload = raw_request(
            srv.port, f"/predictions/{MODEL_NAME}", image.data, image.content_type
        )
        levels = drive(srv.port, payload, opts.concurrencies, opts.duration_s)
        memory = memory_mb(srv.process.pid)
    return ServerResult("TorchServe", layout.describe(), srv.startup_s, probe, levels, memory)
