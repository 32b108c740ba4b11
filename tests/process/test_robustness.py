"""Faults and hostile traffic against real server processes: the robustness suite.

Each probe is bounded (seconds of load, loopback only) and asserts behaviour, not speed:
refusals come from the headers alone and quickly, nothing but 200 and 503 under overload, no
request that reached the server goes unanswered, a dead worker's gauges leave at once and its
replacement never says not_ready, slow clients are freed. ``make robustness`` runs the same
probes at full size and reports the figures against the goals (``scripts/robustness.py``).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from resnet_bench import loadgen
from resnet_bench.servers import (
    bucket_quantile,
    free_port,
    histogram_buckets,
    metric_sum,
    stop_process_group,
)
from tests.harness import ROOT, Server, is_ready, jpeg_of, serve, until, wait_until

HOST = "127.0.0.1"


def model_args(weights_file: Path, cache: Path, *extra: str) -> list[str]:
    return ["--weights", str(weights_file), "--cache-dir", str(cache), "--offline", *extra]


def classify_payload(port: int, size: tuple[int, int] = (500, 375)) -> bytes:
    return loadgen.multipart_request(
        HOST, port, "/classify", "image", "p.jpg", jpeg_of("chelsea", size), "image/jpeg"
    )


def metric(server: Server, family: str, **labels: str) -> float:
    return metric_sum(server.url, family, **labels)


def served(server: Server, route: str = "/classify") -> float:
    """Requests the replica has answered on ``route`` so far (any status)."""
    return metric(server, "resnet_service_requests", route=route)


def header_only_probe(port: int, timeout: float = 1.0) -> bytes:
    """Send a POST's head announcing a 1 MB body and no body: the answer, if the server gives
    one from the headers alone within ``timeout``, else b""."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
        )
        try:
            return sock.recv(4096)
        except TimeoutError:
            return b""


@pytest.fixture
def two_workers(weights_file: Path, model_cache: Path, tmp_path: Path) -> Iterator[Server]:
    with serve(tmp_path, *model_args(weights_file, model_cache, "--workers", "2")) as server:
        yield server


# --- overload ----------------------------------------------------------------------------
def test_overload_is_refused_from_the_headers_and_recovers(two_workers: Server) -> None:
    server = two_workers
    payload = classify_payload(server.port)
    alone = asyncio.run(loadgen.closed_loop(HOST, server.port, payload, 1, 1.0))
    capacity = asyncio.run(loadgen.closed_loop(HOST, server.port, payload, 16, 2.0))
    rps = capacity.summary()["rps"]
    assert isinstance(rps, float)
    assert rps > 0

    queue_wait = "resnet_service_queue_wait_seconds"
    waits_before = histogram_buckets(server.url, queue_wait)

    async def flood() -> tuple[loadgen.LoadResult, list[bytes]]:
        load = asyncio.create_task(loadgen.open_loop(HOST, server.port, payload, 10 * rps, 3.0))
        probes: list[bytes] = []
        refused = lambda: metric(server, "resnet_service_rejections", reason="overloaded") > 0  # noqa: E731
        await until(refused, 10, "the flood to be shed", blocking=True)
        for _ in range(10):
            probes.append(await asyncio.to_thread(header_only_probe, server.port))
            await asyncio.sleep(0.1)
        return await load, probes

    result, probes = asyncio.run(flood())
    assert result.failures[loadgen.LOST] == 0, result.summary()
    assert set(result.codes) == {"overloaded"}, result.codes
    assert result.ok > 0
    # Refused from the headers alone: these clients never sent their bodies.
    assert any(p.startswith(b"HTTP/1.1 503") for p in probes), probes
    assert all(p == b"" or p.startswith(b"HTTP/1.1 503") for p in probes), probes
    # Shedding holds the accepted images' queue wait near the standing-queue target (50 ms),
    # not the deadline bound (7.5 s): the flood's first interval is its only burst allowance.
    # Read from the server's own histogram: the flood client's latencies also carry its own
    # lag behind its schedule on a 2-core host it shares with both workers (accepted p99
    # 3.3-3.9 s seen from the client in CI). What the server holds: p99 in the 0.5 s or 1 s
    # bucket on a 2-CPU Xeon (AVX-512), the first interval's backlog being cleared; without
    # shedding this 3 s flood would queue up to the deadline bound.
    wait_p99 = bucket_quantile(waits_before, histogram_buckets(server.url, queue_wait), 0.99)
    assert wait_p99 <= 2.5, f"accepted images waited up to {wait_p99} s at p99 in the queue"
    # Nothing waited for the deadline (15 s), even counting the client's own lag; a refusal
    # never waits for the queue at all (77 ms at p99 on an EPYC with AVX-512; 1.2-1.5 s on a
    # Zen 3 EPYC with AVX2 only, where this client's ~400 req/s take a core).
    refusal_p99 = float(np.percentile(result.latency_ms(503), 99))
    accepted_p99 = float(np.percentile(result.latency_ms(200), 99))
    assert refusal_p99 < 3000, f"refusals took {refusal_p99:.0f} ms at p99"
    assert accepted_p99 < 7500, f"accepted requests took {accepted_p99:.0f} ms at p99"

    # Recovery: the queue drains, a lone request is fast again.
    normal = float(np.percentile(alone.latency_ms(200), 50))
    wait_until(lambda: metric(server, "resnet_service_queue_depth") == 0, 5, "an empty queue")

    def fast_again() -> bool:
        started = time.perf_counter()
        ok = httpx.post(f"{server.url}/classify", files={"image": jpeg_of("chelsea")}).is_success
        return ok and (time.perf_counter() - started) * 1000 < 3 * normal + 50

    wait_until(fast_again, 5, "normal latency after the flood")


def test_a_burst_of_256_on_two_workers_is_served_whole(two_workers: Server) -> None:
    """256 clients at the same moment: seconds of work at most, far inside the deadline
    budget, so admission queues every one (a burst is not an overload)."""
    server = two_workers
    payload = classify_payload(server.port)

    async def burst() -> list[int]:
        async def one() -> int:
            conn = loadgen._Connection(HOST, server.port, 120)
            try:
                return (await conn.send(payload))[0]
            finally:
                conn.close()

        return await asyncio.gather(*(one() for _ in range(256)))

    statuses = asyncio.run(burst())
    assert statuses == [200] * 256, {s: statuses.count(s) for s in set(statuses)}


def raw_exchange(sock: socket.socket, request: bytes, timeout: float = 10.0) -> bytes:
    """Send ``request`` and read one whole response (head and content-length body)."""
    sock.settimeout(timeout)
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head


@pytest.fixture
def refusing_server(weights_file: Path, model_cache: Path, tmp_path: Path) -> Iterator[Server]:
    """One worker that refuses every request while one upload is in progress (a 1 ms
    deadline bound), and one such stalled upload holding it there."""
    env = {"RESNET_SERVICE_QUEUE_BUDGET_MS": "1", "RESNET_SERVICE_BODY_TIMEOUT_S": "60"}
    with (
        serve(tmp_path, *model_args(weights_file, model_cache), env=env) as server,
        socket.create_connection((HOST, server.port)) as stalled,
    ):
        stalled.sendall(classify_payload(server.port)[:1000])  # admitted, never finished
        wait_until(
            lambda: header_only_probe(server.port).startswith(b"HTTP/1.1 503"),
            10,
            "refusals while an upload is in progress",
            server,
        )
        yield server


def test_a_refusal_keeps_a_small_request_s_connection(refusing_server: Server) -> None:
    server = refusing_server
    small = classify_payload(server.port)  # ~100 kB: cheaper to skip than to reconnect
    with socket.create_connection((HOST, server.port)) as sock:
        for _ in range(3):  # the same connection answers again and again
            head = raw_exchange(sock, small)
            assert head.startswith(b"HTTP/1.1 503"), head
            assert b"connection: close" not in head.lower(), head
            assert b"retry-after:" in head.lower()
        assert raw_exchange(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").startswith(
            b"HTTP/1.1 200"
        )

    # Counted and labelled like any other refusal (refusals from the head within 0.1 s).
    def refused() -> float:
        return metric(server, "resnet_service_rejections", reason="overloaded")

    wait_until(lambda: refused() >= 3, 5, "three refusals counted", server)


def test_a_refusal_closes_a_large_or_unbounded_upload(refusing_server: Server) -> None:
    server = refusing_server
    heads = [
        b"Content-Length: 50000000\r\n",  # 50 MB: not worth reading to keep the connection
        b"Transfer-Encoding: chunked\r\n",  # no length: cannot be skipped safely
        b"Content-Length: 1000\r\nExpect: 100-continue\r\n",  # waits for a go-ahead
    ]
    for extra in heads:
        with socket.create_connection((HOST, server.port)) as sock:
            sock.sendall(
                b"POST /classify HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: multipart/form-data; boundary=b\r\n" + extra + b"\r\n"
            )
            answer, _ = read_all(sock, 10)  # answered from the head alone, then closed
            assert answer.startswith(b"HTTP/1.1 503"), (extra, answer)
            assert b"connection: close" in answer.lower(), (extra, answer)


# --- a worker killed ----------------------------------------------------------------------
def test_a_killed_worker_is_replaced_and_its_gauges_leave(two_workers: Server) -> None:
    server = two_workers
    payload = classify_payload(server.port)
    victim = server.worker_pids()[0]

    async def scenario() -> loadgen.LoadResult:
        load = asyncio.create_task(loadgen.closed_loop(HOST, server.port, payload, 8, 8.0))
        before = served(server)
        await until(lambda: served(server) >= before + 32, 30, "load", blocking=True)
        os.kill(victim, signal.SIGKILL)
        return await load

    result = asyncio.run(scenario())
    wait_until(lambda: len(server.worker_pids()) == 2, 60, "a replacement worker", server)
    assert victim not in server.worker_pids()
    wait_until(lambda: "ready (pid" in server.output().split("died")[-1], 60, "it ready", server)
    # Only the dead worker's in-flight requests may fail (8 clients: at most 8). While one
    # worker carries all 8 clients, admission may shed some (503 overloaded); the replacement
    # never answers not_ready: it listens only once warm.
    assert result.failures[loadgen.LOST] <= 8, result.summary()
    assert set(result.codes) <= {"overloaded"}, result.codes

    def refused() -> float:
        return metric(server, "resnet_service_rejections", reason="overloaded")

    wait_until(lambda: refused() == result.statuses.get(503, 0), 5, "refusals counted", server)
    assert metric(server, "resnet_service_rejections", reason="not_ready") == 0
    assert "died" in server.output()
    # Gauges: only live processes count; the scrape itself is the one request in flight.
    assert metric(server, "resnet_service_in_flight_requests") == 1
    assert metric(server, "resnet_service_queue_depth") == 0
    assert httpx.get(f"{server.url}/readyz").status_code == 200


# --- SIGTERM ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("target", "drain_delay"),
    [("supervisor", "1.0"), ("process group", "0")],
    ids=["kubernetes-style", "whole-group"],
)
def test_sigterm_under_load_answers_every_request(
    weights_file: Path, model_cache: Path, tmp_path: Path, target: str, drain_delay: str
) -> None:
    args = model_args(weights_file, model_cache, "--workers", "2", "--drain-delay", drain_delay)
    with serve(tmp_path, *args) as server:
        payload = classify_payload(server.port)

        async def scenario() -> tuple[loadgen.LoadResult, float]:
            stopped = asyncio.Event()
            load = asyncio.create_task(
                loadgen.closed_loop(
                    HOST, server.port, payload, 32, 60.0, timeout_s=20, stop=stopped
                )
            )
            await until(lambda: served(server) >= 64, 30, "load", blocking=True)
            signalled = time.monotonic()
            if target == "supervisor":
                server.terminate()
            else:
                os.killpg(server.process.pid, signal.SIGTERM)
            async with httpx.AsyncClient(base_url=server.url) as probe:
                while time.monotonic() - signalled < 5:
                    try:
                        if (await probe.get("/readyz")).status_code == 503:
                            break
                    except httpx.HTTPError:
                        break  # already stopped listening (no drain delay)
                    await asyncio.sleep(0.01)
            unready_after = time.monotonic() - signalled
            # The clients go on until the server has exited (then every try is refused).
            await asyncio.to_thread(server.process.wait, 60)
            stopped.set()
            return await load, unready_after

        result, unready_after = asyncio.run(scenario())
        assert unready_after < 1.0
        code = server.process.wait(60)
        assert code == 0, server.output()[-3000:]
        # Every request that reached the server was answered: none lost; draining serves on,
        # so no not_ready (admission may still shed load it cannot serve in time).
        assert result.failures[loadgen.LOST] == 0, result.summary()
        assert set(result.codes) <= {"overloaded"}, result.codes
        assert result.ok > 32
        log = server.output()
        assert "draining" in log
        assert "stopped" in log


# --- hostile clients ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def strict_server(
    tmp_path_factory: pytest.TempPathFactory, weights_file: Path, model_cache: Path
) -> Iterator[Server]:
    env = {"RESNET_SERVICE_HEADER_TIMEOUT_S": "1", "RESNET_SERVICE_BODY_TIMEOUT_S": "1"}
    with serve(
        tmp_path_factory.mktemp("strict"), *model_args(weights_file, model_cache), env=env
    ) as server:
        yield server


def read_all(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes; and how long that took."""
    started = time.monotonic()
    sock.settimeout(limit_s)
    chunks: list[bytes] = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks), time.monotonic() - started
        chunks.append(chunk)


@pytest.mark.parametrize(
    ("sent", "answer"),
    [
        (b"", b""),  # connects and says nothing: closed
        (b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Le", b"HTTP/1.1 408"),  # head stalls
        (
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n" + b"x" * 1024,
            b"HTTP/1.1 408",  # body stalls after 1 KB of a declared 10 MB
        ),
    ],
    ids=["silent", "slow-head", "slow-body"],
)
def test_slow_clients_are_freed(strict_server: Server, sent: bytes, answer: bytes) -> None:
    with socket.create_connection((HOST, strict_server.port)) as sock:
        sock.sendall(sent)
        response, took = read_all(sock, 10)
    assert response.startswith(answer), response[:200]
    if answer:
        assert b"request_timeout" in response
        assert b"connection: close" in response.lower()
    assert took < 5  # 1 s timeouts; the connection is closed, not held


def test_made_up_methods_do_not_grow_the_metrics(strict_server: Server) -> None:
    def metric_lines() -> int:
        return len(httpx.get(f"{strict_server.url}/metrics").text.splitlines())

    metric_lines()
    before = metric_lines()
    with httpx.Client(base_url=strict_server.url) as client:
        for index in range(300):
            response = client.request(f"X{index:04d}", "/classify")
            # llhttp refuses unknown methods itself (400); h11 lets the app say 405.
            assert response.status_code in (400, 405)
            assert response.headers["content-type"] == "application/problem+json"
    assert metric_lines() - before <= 10  # one "other" method series, not one per method


def test_a_long_multipart_boundary_is_a_400(strict_server: Server) -> None:
    boundary = "b" * 300
    response = httpx.post(
        f"{strict_server.url}/classify",
        content=f"--{boundary}\r\n\r\n--{boundary}--\r\n".encode(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 400
    assert response.json()["code"] == "malformed_request"


# --- read-only file systems ---------------------------------------------------------------
def _read_only(paths: list[Path], cmd: list[str]) -> list[str]:
    """``cmd`` in a private mount namespace where ``paths`` are read-only bind mounts: a real
    EROFS, as under Kubernetes' readOnlyRootFilesystem (file modes would not stop root)."""
    mounts = " && ".join(
        f"mount --bind -o ro {shlex.quote(str(p))} {shlex.quote(str(p))}" for p in paths
    )
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        f'{mounts} && exec "$0" "$@"',
        *cmd,
    ]


@pytest.fixture(scope="module")
def can_mount() -> None:
    probe = subprocess.run(
        _read_only([Path("/")], ["true"]), capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"needs a private mount namespace (root): {probe.stderr.strip()}")


@pytest.fixture
def sandbox(tmp_path: Path, can_mount: None) -> tuple[Path, dict[str, str]]:
    """TMPDIR is the only writable place; HOME and the project are read-only."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONDONTWRITEBYTECODE": "1"}
    return tmp, env


def _frozen(*extra: Path) -> list[Path]:
    project = ROOT
    return [project, Path.home(), *extra]


def test_an_empty_read_only_cache_stops_start_up_clearly(
    sandbox: tuple[Path, dict[str, str]], weights_file: Path, tmp_path: Path
) -> None:
    tmp, env = sandbox
    cache = tmp_path / "cache"
    cache.mkdir()
    cmd = [sys.executable, "-m", "resnet_service", "serve", "--port", "0", "--workers", "1"]
    proc = subprocess.run(
        _read_only(_frozen(cache, weights_file), [*cmd, *model_args(weights_file, cache)]),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "RESNET_SERVICE_MODEL_CACHE_DIR" in proc.stderr
    assert "Read-only file system" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp.iterdir()) == []  # no run directory left behind


def test_a_read_only_cache_holding_the_model_just_works(
    sandbox: tuple[Path, dict[str, str]], weights_file: Path, model_cache: Path, tmp_path: Path
) -> None:
    from resnet_service.model.served import find_or_build
    from tests.harness import make_settings

    # The default runtime's model, as a slim image ships it.
    find_or_build(make_settings(weights_file, model_cache, runtime="openvino"))
    tmp, env = sandbox
    port = free_port()
    cmd = [sys.executable, "-m", "resnet_service", "serve", "--port", str(port), "--workers", "1"]
    log = tmp_path / "server.log"
    frozen = _frozen(model_cache, weights_file)
    with log.open("wb") as out:
        process = subprocess.Popen(
            _read_only(frozen, [*cmd, *model_args(weights_file, model_cache)]),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(process, f"http://{HOST}:{port}", port, log)
    try:
        wait_until(lambda: is_ready(server.url), 240, "readiness", server)
        response = httpx.post(f"{server.url}/classify", files={"image": jpeg_of("coffee")})
        assert response.status_code == 200
    finally:
        stop_process_group(process)
    assert process.returncode == 0, log.read_text()[-3000:]
    assert "Read-only" not in log.read_text()
    assert list(tmp.iterdir()) == []
