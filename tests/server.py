"""A real ``resnet-service serve`` process on a free 127.0.0.1 port, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from resnet_bench.servers import free_port, process_children, stop_process_group


@dataclass
class Server:
    """A running server process and where to reach it."""

    process: subprocess.Popen[bytes]
    url: str
    port: int
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self) -> None:
        """SIGTERM to the supervisor only, as Kubernetes sends it to a container's PID 1."""
        self.process.send_signal(signal.SIGTERM)

    def worker_pids(self) -> list[int]:
        """The supervisor's live children: its worker processes (the preflight has ended)."""
        return sorted(process_children(self.process.pid))


def wait_until(
    predicate: Callable[[], object], timeout: float, what: str, server: Server | None = None
) -> None:
    """Poll ``predicate`` until it is true, or fail naming ``what`` (and the server's log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if server is not None and server.process.poll() is not None:
            raise AssertionError(f"server exited ({server.process.returncode}):\n{server.output()}")
        time.sleep(0.05)
    raise AssertionError(
        f"timed out waiting for {what}" + (f":\n{server.output()[-5000:]}" if server else "")
    )


def answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def is_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
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
    if "--grpc-port" not in args:
        args = (*args, "--grpc-port", "0")  # servers side by side: no fixed gRPC port
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "resnet_service", "serve", "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
    server = Server(process, f"http://127.0.0.1:{port}", port, log)
    try:
        if wait_ready:
            wait_until(lambda: is_ready(server.url), 240, "/readyz", server)
        yield server
    finally:
        stop_process_group(process)
