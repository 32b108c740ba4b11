"""The servers under test as processes: each in its own process group, polled until ready,
and stopped as a whole group (leader, JVM, Python workers)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psutil

log = logging.getLogger(__name__)

READY_TIMEOUT_S: Final = 300.0
STOP_GRACE_S: Final = 30.0


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
