"""``make bench-peers``: the service against TorchServe and BentoML, same weights, same load,
same run.

TorchServe serves torchvision's ResNet18 with the very fp32 weights the service uses, through
its stock ``image_classifier`` handler (fp32 eager: TorchServe's own path), tuned to this
machine the way its performance guide says: one worker per usable CPU with one torch thread
each, batching on. BentoML serves them as its docs write an image classifier
(``bentoml_peer``). Each server runs alone under the project's closed-loop load generator; the
report gives the service's throughput and p99 at every concurrency as ratios to each peer's.
Each peer lives in a virtual environment of its own (made once, reused), so its pins never
touch the project's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import httpx
import numpy as np
import psutil
import torch

from resnet_bench import loadgen
from resnet_bench.images import BenchImage, bench_images
from resnet_bench.runner import MAIN_IMAGE, MAX_REQUESTS_PER_LEVEL, machine_info
from resnet_bench.servers import free_port, memory_mb, python, running
from resnet_service.cpus import resolve_workers, threads_per_worker, usable_cpus
from resnet_service.model.torch_path import imagenet_labels
from resnet_service.model.weights import (
    ResolvedWeights,
    StateDict,
    WeightsSource,
    resolve_fp32_weights,
)

log = logging.getLogger(__name__)

MODEL_NAME: Final = "resnet18"
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
#: Written into the venv once every requirement installed: a half-made venv is finished.
VENV_STAMP: Final = ".resnet-service-peers"
DEFAULT_VENV: Final = Path("bench/results/peers/.venv")
#: The service's throughput over each peer's at 16 clients (goals of issue 18), and its p99.
THROUGHPUT_GOALS: Final = {"TorchServe": 8.0, "BentoML": 3.0}
P99_GOAL: Final = 0.3
GOAL_CONCURRENCY: Final = 16
READY_TIMEOUT_S: Final = 300.0
STOP_GRACE_S: Final = 30.0

#: The archive's model file. TorchServe's eager path imports it and builds the one class it
#: defines with no arguments, then loads the serialized state_dict into it.
MODEL_PY: Final = '''"""torchvision's ResNet18, built with no arguments as TorchServe's eager loader needs."""

from torchvision.models.resnet import BasicBlock, ResNet


class ResNet18(ResNet):
    def __init__(self) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2])
'''


# --- TorchServe's environment and archive -------------------------------------------------


def ensure_peer_venv(venv: Path, requirements: Sequence[str] = PEER_REQUIREMENTS) -> Path:
    """The Python of a peer's own venv, made (or finished) only when its stamp is missing:
    reinstalling torch on every run would cost a minute of a shared machine."""
    venv = venv.absolute()  # a peer may start from its own working directory
    peer_python = venv / "bin" / "python"
    stamp = venv / VENV_STAMP
    wanted = "\n".join(requirements)
    if peer_python.exists() and stamp.is_file() and stamp.read_text() == wanted:
        return peer_python
    if not peer_python.exists():
        log.info("creating a peer's venv in %s", venv)
        subprocess.run([python(), "-m", "venv", str(venv)], check=True, timeout=300)
    log.info("installing %s", " ".join(requirements))
    subprocess.run(
        [str(peer_python), "-m", "pip", "install", "--quiet", *requirements],
        check=True,
        timeout=1800,
    )
    stamp.write_text(wanted)
    return peer_python


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


@dataclass(frozen=True)
class ArchiveInputs:
    """The files torch-model-archiver packs with the stock handler."""

    model_file: Path
    serialized_file: Path
    labels_file: Path


def index_to_name(labels: Sequence[str]) -> dict[str, str]:
    """The class-index -> label mapping the stock handler reads from ``index_to_name.json``."""
    return {str(i): label for i, label in enumerate(labels)}


def write_archive_inputs(
    state_dict: StateDict, labels: Sequence[str], directory: Path
) -> ArchiveInputs:
    """model.py, the state_dict and the label map, written where the archiver reads them."""
    directory.mkdir(parents=True, exist_ok=True)
    inputs = ArchiveInputs(
        model_file=directory / "model.py",
        serialized_file=directory / f"{MODEL_NAME}.pt",
        labels_file=directory / "index_to_name.json",
    )
    inputs.model_file.write_text(MODEL_PY)
    torch.save(state_dict, inputs.serialized_file)
    inputs.labels_file.write_text(json.dumps(index_to_name(labels)))
    return inputs


def archive_model(bin_dir: Path, inputs: ArchiveInputs, store: Path) -> str:
    """Pack a ``.mar`` with the stock ``image_classifier`` handler; its file name in ``store``."""
    store.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            str(bin_dir / "torch-model-archiver"),
            "--model-name",
            MODEL_NAME,
            "--version",
            "1.0",
            "--model-file",
            str(inputs.model_file),
            "--serialized-file",
            str(inputs.serialized_file),
            "--handler",
            "image_classifier",
            "--extra-files",
            str(inputs.labels_file),
            "--export-path",
            str(store),
            "--force",
        ],
        check=True,
        timeout=300,
    )
    return f"{MODEL_NAME}.mar"


# --- TorchServe's configuration -----------------------------------------------------------


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


# --- Processes ----------------------------------------------------------------------------


@dataclass
class StartedServer:
    """A server under test: its process group leader, the port to load, its start-up time."""

    process: subprocess.Popen[bytes]
    port: int
    startup_s: float


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    members: list[int] = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except (psutil.Error, ProcessLookupError):
            continue
    return members


def stop_group(process: subprocess.Popen[bytes], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM the process's whole group and wait until every member is gone, SIGKILL what is
    left after ``grace``. Waiting on the leader is not enough: ``torchserve --foreground``
    exits at once while its JVM and Python workers are still shutting down."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        process.poll()
        return
    deadline = time.monotonic() + grace
    while True:
        process.poll()  # reap the leader so that it stops counting
        if not _group_members(process.pid):
            break
        if time.monotonic() > deadline:
            log.warning("process group %d outlived %.0f s: SIGKILL", process.pid, grace)
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            _wait_gone(process, 10)
            break
        time.sleep(0.1)
    process.wait(10)


def _wait_gone(process: subprocess.Popen[bytes], timeout: float) -> None:
    """After SIGKILL: until the kernel has taken every member down (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while _group_members(process.pid) and time.monotonic() < deadline:
        process.poll()
        time.sleep(0.02)


def wait_until(
    ready: Callable[[], bool], process: subprocess.Popen[bytes], timeout: float, logs: Path
) -> None:
    """Poll ``ready`` until it holds; fail early if the process dies, late at the deadline."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"server exited early; its logs are in {logs}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not ready after {timeout:.0f} s; its logs are in {logs}")
        time.sleep(0.5)


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
        stop_group(process)


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


# --- Load and results ---------------------------------------------------------------------


@dataclass(frozen=True)
class LevelResult:
    """One closed-loop level against one server."""

    concurrency: int
    requests: int
    ok: int
    non_200: int
    errors: int
    rps: float
    #: Latencies of the 200 answers; None when there was none.
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None

    @classmethod
    def of(cls, result: loadgen.LoadResult) -> LevelResult:
        lat = result.latency_ms(200)

        def pct(q: float) -> float | None:
            return round(float(np.percentile(lat, q)), 2) if result.ok else None

        return cls(
            concurrency=result.concurrency or 0,
            requests=len(result.latencies),
            ok=result.ok,
            non_200=len(result.latencies) - result.ok,
            errors=result.errors,
            rps=round(result.ok / result.elapsed_s, 2) if result.elapsed_s else 0.0,
            p50_ms=pct(50),
            p90_ms=pct(90),
            p99_ms=pct(99),
        )


@dataclass(frozen=True)
class Probe:
    """What one request answered before the load: a cheap check that the server classifies
    (and, between the two servers, that they run the same weights)."""

    top1_label: str
    top1_score: float
    weights_sha256: str | None = None
    #: "runtime precision" as the service reports it (TorchServe's is always torch fp32).
    model: str | None = None


@dataclass(frozen=True)
class ServerResult:
    """One server's figures in this run."""

    name: str
    layout: str
    startup_s: float
    probe: Probe
    closed_loop: list[LevelResult]
    memory: dict[str, float]

    def at(self, concurrency: int) -> LevelResult:
        return next(r for r in self.closed_loop if r.concurrency == concurrency)


def raw_request(port: int, path: str, data: bytes, content_type: str) -> bytes:
    """One POST with the image as the whole body, as ``curl -T`` sends it to TorchServe (its
    cheapest input path: no multipart to parse)."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
        "Connection: keep-alive\r\n\r\n"
    ).encode()
    return head + data


def drive(
    port: int, payload: bytes, concurrencies: Sequence[int], duration_s: float
) -> list[LevelResult]:
    """The closed loop at each concurrency, bounded in time and in count."""
    levels = []
    for c in concurrencies:
        log.info("  %d client(s) for %.1f s", c, duration_s)
        result = asyncio.run(
            loadgen.closed_loop("127.0.0.1", port, payload, c, duration_s, MAX_REQUESTS_PER_LEVEL)
        )
        levels.append(LevelResult.of(result))
    return levels


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


# --- The two servers ----------------------------------------------------------------------


@dataclass(frozen=True)
class PeerOptions:
    """What to run: where, how long, at which concurrencies."""

    out_dir: Path
    venv: Path = DEFAULT_VENV
    bentoml_venv: Path = Path("bench/results/peers/.venv-bentoml")
    duration_s: float = 8.0
    concurrencies: tuple[int, ...] = (1, GOAL_CONCURRENCY, 64)
    keep_workdir: bool = False
    #: Which peers to run (TorchServe needs Java; BentoML its own venv).
    peers: tuple[str, ...] = ("TorchServe", "BentoML")


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


# --- Report -------------------------------------------------------------------------------


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


def same_weights(probe: Probe, weights: ResolvedWeights) -> bool:
    """Whether the hash prefix the service reports is that of the weights TorchServe got."""
    reported = probe.weights_sha256 or ""
    return bool(reported) and weights.sha256.startswith(reported)


def _notes(servers: Sequence[ServerResult], same: bool, weights: ResolvedWeights) -> list[str]:
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


def run_peers(opts: PeerOptions) -> PeerReport:
    """Both servers, one after the other, in one run; ``peers.json`` under ``opts.out_dir``."""
    started = time.perf_counter()
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    versions: dict[str, str] = {}
    peer_python = None
    if "TorchServe" in opts.peers:
        peer_python = ensure_peer_venv(opts.venv)
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
            from resnet_bench.bentoml_peer import BENTOML_VERSION, bench_bentoml

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
        notes=_notes(servers, same, weights),
    )
    out = opts.out_dir / "peers.json"
    out.write_text(json.dumps(asdict(report), indent=2, ensure_ascii=False))
    log.info("wrote %s", out)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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


if __name__ == "__main__":
    raise SystemExit(main())
