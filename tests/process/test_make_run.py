"""``make run``, the README's command to run the service: make's PORT, GRPC_PORT and WORKERS
when given, else the service's own environment (RESNET_SERVICE_*), never fixed flags that
override it."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from resnet_bench.servers import free_port, stop_process_group
from tests.harness import is_ready, wait_until

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def make_run(
    tmp_path: Path, make_vars: list[str], env: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    log = (tmp_path / "make-run.log").open("wb")
    process = subprocess.Popen(
        ["make", "--no-print-directory", "run", *make_vars],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        stop_process_group(process)
        log.close()


def grpc_port_of(url: str) -> int:
    port: int = httpx.get(f"{url}/model", timeout=10).json()["settings"]["grpc_port"]
    return port


@pytest.mark.parametrize("given", ["make variables", "environment"])
def test_make_run_takes_the_ports_it_is_given(
    tmp_path: Path, weights_file: Path, model_cache: Path, given: str
) -> None:
    port, grpc_port = free_port(), free_port()
    env = {
        "RESNET_SERVICE_WEIGHTS_PATH": str(weights_file),
        "RESNET_SERVICE_MODEL_CACHE_DIR": str(model_cache),
        "RESNET_SERVICE_ALLOW_DOWNLOADS": "false",
    }
    make_vars: list[str] = []
    if given == "make variables":
        make_vars = [f"PORT={port}", f"GRPC_PORT={grpc_port}", "WORKERS=1"]
    else:
        env |= {
            "RESNET_SERVICE_PORT": str(port),
            "RESNET_SERVICE_GRPC_PORT": str(grpc_port),
            "RESNET_SERVICE_WORKERS": "1",
        }
    url = f"http://127.0.0.1:{port}"
    with make_run(tmp_path, make_vars, env) as process:
        log = tmp_path / "make-run.log"

        def ready() -> bool:
            assert process.poll() is None, log.read_text(errors="replace")[-3000:]
            return is_ready(url)

        wait_until(ready, 240, f"make run on port {port}")  # the HTTP port it was given
        assert grpc_port_of(url) == grpc_port
        socket.create_connection(("127.0.0.1", grpc_port), timeout=5).close()  # and gRPC's
