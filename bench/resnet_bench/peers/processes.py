"""The servers under test as processes: each in its own process group, polled until ready,
and stopped as a whole group (leader, JVM, Python workers)."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

READY_TIMEOUT_S: Final = 300.0


@dataclass
class StartedServer:
    """A server under test: its process group leader, the port to load, its start-up time."""

    process: subprocess.Popen[bytes]
    port: int
    startup_s: float


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
