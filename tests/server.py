"""A real ``resnet-service serve`` process on a free 127.0.0.1 port, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from resnet_service.benchmark.servers import free_port, stop_process_group


@dataclass
class Server:
    """A running server process and where to reach it."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)


def wait_until(predicate: object, timeout: float, what: str, server: Server | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        if server is not None and server.process.poll() is not None:
            raise AssertionError(f"server exited ({server.process.returncode}):\n{server.output()}")
        time.sleep(0.05)
    raise AssertionError(
        f"timed out waiting for {what}" + (f":\n{server.output()}" if server else "")
    )


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def is_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def serve(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, wait_ready: bool = True
) -> Iterator[Server]:
    """Start ``python -m resnet_service serve`` in its own process group; always cleaned up."""
    port = free_port()
    log = tmp_path / f"server-{port}.log"
    if "--workers" not in args:
        args = (*args, "--workers", "1")  # one process unless a test asks for more
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "resnet_service", "serve", "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        wait_until(lambda: _answers(server.url), 120, "/healthz", server)
        if wait_ready:
            wait_until(lambda: is_ready(server.url), 180, "/readyz", server)
        yield server
    finally:
        stop_process_group(process)
