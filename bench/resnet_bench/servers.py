"""Start servers under test as real processes; read their process trees, CPU and memory
(psutil; peak RSS from ``/proc``, which psutil does not report)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    port: int
    log: Path


def process_children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def _tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants that are still alive."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _status_kb(process: psutil.Process, field: str) -> int:
    """A ``/proc/PID/status`` field psutil does not expose (peak RSS ``VmHWM``, ``RssAnon``)."""
    try:
        for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_bytes(process: psutil.Process) -> int:
    """Proportional set size: shared pages (the runtime's libraries, mapped weights) divided
    among the processes that map them, so a tree's sum is what it really occupies."""
    try:
        return int(process.memory_full_info().pss)
    except psutil.Error:
        return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by the process tree."""
    total = 0.0
    for process in _tree(pid):
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


@dataclass(frozen=True)
class Memory:
    """A process tree's memory after the load, in MB."""

    processes: int
    peak_rss_mb: float
    rss_mb: float
    rss_anon_mb: float
    pss_mb: float


def tree_memory(pid: int) -> Memory:
    """Peak and current RSS (and its anonymous part) summed over the process tree, in MB, and
    the tree's current PSS.

    Processes that do no work (the supervisor) count too: they are part of what the deployment
    costs. RSS sums count each shared library once per process; PSS does not."""
    tree = _tree(pid)
    return Memory(
        processes=len(tree),
        peak_rss_mb=round(sum(_status_kb(p, "VmHWM") for p in tree) / 1024, 1),
        rss_mb=round(sum(_status_kb(p, "VmRSS") for p in tree) / 1024, 1),
        rss_anon_mb=round(sum(_status_kb(p, "RssAnon") for p in tree) / 1024, 1),
        pss_mb=round(sum(_pss_bytes(p) for p in tree) / 2**20, 1),
    )


def memory_mb(pid: int) -> dict[str, float]:
    """``tree_memory`` as JSON, for the reports that merge it with other figures."""
    figures: dict[str, float] = asdict(tree_memory(pid))
    return figures


@contextmanager
def running(
    cmd: list[str],
    env: dict[str, str],
    ready_path: str,
    log: Path,
    timeout: float = 300,
    ready_count: int = 1,
) -> Iterator[Running]:
    """Run ``cmd`` (its own process group) until ``ready_path`` answers 200; stop it after."""
    port = free_port()
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*cmd, "--port", str(port)],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        answered = 0
        while answered < ready_count:
            if process.poll() is not None:
                raise RuntimeError(f"{cmd} exited:\n{log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd} not ready after {timeout}s")
            try:
                ok = httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200
            except httpx.HTTPError:
                ok = False
            answered = answered + 1 if ok else 0
            time.sleep(0.05 if ok else 0.2)
        yield Running(process, port, log)
    finally:
        stop_process_group(process)


@contextmanager
def random_weights_service(
    workdir: Path, name: str, workers: int, *extra: str, env: dict[str, str] | None = None
) -> Iterator[Running]:
    """``resnet-service serve`` on random weights (the harness's figures need no trained
    model), logging to ``workdir/NAME.log``, until every worker answers."""
    cmd = [python(), "-m", "resnet_service", "serve", "--workers", str(workers), *extra]
    env = {
        "RESNET_SERVICE_ALLOW_RANDOM_WEIGHTS": "true",
        "RESNET_SERVICE_MODEL_CACHE_DIR": str(workdir / "cache"),
        **(env or {}),
    }
    with running(cmd, env, "/readyz", workdir / f"{name}.log", ready_count=4 * workers) as srv:
        yield srv


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


def _wait_gone(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Until no member of the group is left (or ``timeout``), reaping the leader."""
    deadline = time.monotonic() + timeout
    while True:
        process.poll()  # a reaped leader stops counting
        if not _group_members(process.pid) or time.monotonic() > deadline:
            return
        time.sleep(0.05)  # polling the group's end, with a deadline


def stop_process_group(process: subprocess.Popen[bytes], grace: float = 30) -> None:
    """SIGTERM the process's whole group and wait until every member is gone, SIGKILL what is
    left after ``grace``. The leader may be gone while its children are not (a shell's
    background jobs, ``torchserve --foreground``'s JVM): the group is what is stopped."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        process.poll()
        return
    _wait_gone(process, grace)
    if _group_members(process.pid):
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        _wait_gone(process, 10)
    process.wait(10)


def metric_sum(url: str, family: str, **labels: str) -> float:
    """A Prometheus family's samples on ``url``/metrics (counters' ``_total``) matching
    ``labels``, summed."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name != family:
            continue
        for sample in fam.samples:
            if sample.name.endswith(("_created", "_bucket", "_sum", "_count")):
                continue
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def histogram_buckets(url: str, family: str, **labels: str) -> dict[float, float]:
    """A Prometheus histogram's cumulative bucket counts on ``url``/metrics (upper bound ->
    count), summed over every series matching ``labels`` (every worker, model, version)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    counts: dict[float, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != family:
            continue
        for sample in fam.samples:
            if not sample.name.endswith("_bucket"):
                continue
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                bound = float(sample.labels["le"])
                counts[bound] = counts.get(bound, 0.0) + sample.value
    return counts


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The upper bound of the bucket holding quantile ``q`` of what was observed between two
    reads of one histogram (``histogram_buckets``): an upper bound on the true quantile."""
    delta = {bound: after[bound] - before.get(bound, 0.0) for bound in after}
    total = delta.get(float("inf"), 0.0)
    if total <= 0:
        raise ValueError("nothing was observed between the two reads")
    for bound in sorted(delta):
        if delta[bound] >= q * total:
            return bound
    return float("inf")


def python() -> str:
    return sys.executable
