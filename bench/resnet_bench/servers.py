"""Start servers under test as real processes; read their memory from /proc."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


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
    """Direct children of ``pid`` (Linux /proc)."""
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            out.extend(int(c) for c in text)
    except OSError:
        return []
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo.extend(process_children(current))
    return pids


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    """Proportional set size: shared pages (the runtime's libraries, mapped weights) divided
    among the processes that map them, so a tree's sum is what it really occupies."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by the process tree (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in _tree(pid):
        try:
            # Fields after the command (which may hold spaces): utime, stime are 12th, 13th.
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def memory_mb(pid: int) -> dict[str, float]:
    """Peak and current RSS (and its anonymous part) summed over the process tree, in MB, and
    the tree's current PSS.

    Processes that do no work (the supervisor) count too: they are part of what the deployment
    costs. RSS sums count each shared library once per process; PSS does not."""
    pids = _tree(pid)
    return {
        "processes": len(pids),
        "peak_rss_mb": round(sum(_status_kb(p, "VmHWM") for p in pids) / 1024, 1),
        "rss_mb": round(sum(_status_kb(p, "VmRSS") for p in pids) / 1024, 1),
        "rss_anon_mb": round(sum(_status_kb(p, "RssAnon") for p in pids) / 1024, 1),
        "pss_mb": round(sum(_pss_kb(p) for p in pids) / 1024, 1),
    }


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


def stop_process_group(process: subprocess.Popen[bytes], grace: float = 30) -> None:
    """SIGTERM the process's group, SIGKILL it if it outlives ``grace`` seconds."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
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


def python() -> str:
    return sys.executable
