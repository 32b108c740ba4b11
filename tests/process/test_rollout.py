"""A rolling update, rehearsed for real: two replicas (real ``serve`` processes) behind a real
haproxy from Debian's packages, under continuous load, replaced one at a time the way a
Kubernetes Deployment does it (SIGTERM, wait for the exit, start the new one, wait until the
proxy sees it ready). Goal: not one failed request.

The proxy settings that make it so (and carry over to an Ingress or a service mesh):
- active health checks on ``/readyz`` every 200 ms, one failure marks a replica down: it is
  out of rotation well inside the replica's drain delay (here 2 s), while it still serves;
- ``retry-on conn-failure empty-response`` with ``option redispatch`` and the request body
  buffered (``option http-buffer-request``): a request that found a replica already gone is
  resent to the other one;
- keep-alive to the replicas with an idle timeout below the service's 75 s, so the proxy never
  reuses a connection the service is closing (and during the drain every response says
  ``Connection: close``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest

from resnet_bench import loadgen
from resnet_bench.servers import free_port, stop_process_group
from tests.harness import Server, is_ready, jpeg_of, wait_until

HOST = "127.0.0.1"
DRAIN_S = 2.0


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )
    if found is None:
        pytest.fail("haproxy is missing: `make test` installs it (scripts/install_test_deps.sh)")
    return found


def haproxy_config(front: int, replicas: dict[str, int], stats: Path) -> str:
    servers = "\n".join(f"    server {name} {HOST}:{port}" for name, port in replicas.items())
    return f"""
global
    maxconn 2000
    tune.bufsize 262144
    stats socket {stats} mode 600 level admin

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    option http-buffer-request
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response

frontend front
    bind {HOST}:{front}
    default_backend replicas

backend replicas
    balance roundrobin
    http-reuse safe
    option httpchk GET /readyz
    http-check expect status 200
    default-server check inter 200ms fall 1 rise 2
{servers}
"""


@dataclass
class Proxy:
    process: subprocess.Popen[bytes]
    port: int
    stats: Path

    def server_up(self, name: str) -> bool:
        """haproxy's own view: is this backend server in rotation (operational state 2)?"""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.stats))
            sock.sendall(b"show servers state replicas\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        for line in data.decode().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[3] == name:
                return fields[5] == "2"
        return False


@contextmanager
def haproxy(tmp_path: Path, replicas: dict[str, int]) -> Iterator[Proxy]:
    port, stats = free_port(), tmp_path / "haproxy.sock"
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy_config(port, replicas, stats))
    log = (tmp_path / "haproxy.log").open("wb")
    process = subprocess.Popen(
        [haproxy_binary(), "-db", "-f", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proxy = Proxy(process, port, stats)
    try:
        wait_until(lambda: stats.exists(), 20, "haproxy's stats socket")
        yield proxy
    finally:
        stop_process_group(process)
        log.close()


def start_replica(tmp_path: Path, port: int, args: list[str], tag: str) -> Server:
    log = tmp_path / f"replica-{tag}.log"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        # Rollout, not admission, is under test: one replica carries everything for a while.
        "RESNET_SERVICE_QUEUE_BUDGET_MS": "5000",
    }
    cmd = [sys.executable, "-m", "resnet_service", "serve", "--port", str(port), "--grpc-port", "0"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*cmd, "--workers", "1", "--drain-delay", str(DRAIN_S), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    server = Server(process, f"http://{HOST}:{port}", port, log)
    wait_until(lambda: is_ready(server.url), 240, f"replica {tag} ready", server)
    return server


def served_by_each(replicas: dict[str, Server], count: int) -> bool:
    """Every replica has answered ``count`` classifications (its own metrics say so)."""
    for server in replicas.values():
        text = httpx.get(f"{server.url}/metrics", timeout=5).text
        line = next(
            (
                ln
                for ln in text.splitlines()
                if ln.startswith("resnet_service_images_total") and 'outcome="ok"' in ln
            ),
            None,
        )
        if line is None or float(line.split()[-1]) < count:
            return False
    return True


def test_rolling_update_behind_haproxy_fails_no_request(
    tmp_path: Path, weights_file: Path, model_cache: Path
) -> None:
    # OpenVINO: a replica starts in seconds (no torch in its processes), as in the slim image.
    args = [
        *("--weights", str(weights_file), "--cache-dir", str(model_cache), "--offline"),
        *("--runtime", "openvino"),
    ]
    ports = {"a": free_port(), "b": free_port()}
    replicas = {name: start_replica(tmp_path, port, args, name) for name, port in ports.items()}
    try:
        with haproxy(tmp_path, ports) as proxy:
            for name in ports:
                wait_until(partial(proxy.server_up, name), 30, f"haproxy sees {name}")
            payload = loadgen.multipart_request(
                HOST, proxy.port, "/classify", "image", "p.jpg", jpeg_of("coffee"), "image/jpeg"
            )

            async def rollout() -> loadgen.LoadResult:
                stop = asyncio.Event()
                load = asyncio.create_task(
                    loadgen.closed_loop(HOST, proxy.port, payload, 6, 600, stop=stop)
                )
                # Under way through both replicas before the first replacement.
                await asyncio.to_thread(
                    wait_until, partial(served_by_each, replicas, 10), 60, "load on both"
                )
                for name, port in ports.items():
                    old = replicas[name]
                    old.process.send_signal(signal.SIGTERM)  # what the kubelet does
                    assert await asyncio.to_thread(old.process.wait, 60) == 0
                    new = await asyncio.to_thread(start_replica, tmp_path, port, args, f"{name}2")
                    replicas[name] = new
                    await asyncio.to_thread(
                        wait_until, partial(proxy.server_up, name), 30, f"haproxy sees new {name}"
                    )
                stop.set()
                return await load

            result = asyncio.run(rollout())
    finally:
        for server in replicas.values():
            stop_process_group(server.process)
    served = result.ok
    print(f"rolling update: {served} requests served, {result.errors} failed, {result.statuses}")
    assert result.failures == {}, result.summary()
    assert set(result.statuses) == {200}, result.statuses
    assert served > 50
