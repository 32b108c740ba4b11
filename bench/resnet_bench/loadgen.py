"""A lean HTTP/1.1 load generator on raw asyncio streams (loopback only).

Requests are pre-encoded bytes, so the client spends little CPU per request: on a 2-core
machine it shares the cores with the server under test, and an httpx client would cost a
visible share of them. Closed loop: C connections, each sends its next request when the last
one is answered. Open loop: arrivals at a fixed rate, latency measured from the scheduled
arrival (no coordinated omission).

Every request ends in exactly one outcome: an HTTP status, ``refused`` (the connection was
never accepted: the request never reached the server), ``lost`` (sent, but the connection
broke before a whole response came back: what a server must never do), or ``saturated`` (the
open-loop client itself had no connection to spare).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from resnet_bench.jsonable import OMITTED_WHEN_NONE, to_json

MAX_OPEN_LOOP_CONNECTIONS = 512
#: Arrivals between two polls of an open loop's ``stop`` (a file check: cheap, not free).
STOP_POLL = 50
_CLIENT_ERRORS: Final = (
    OSError,
    ConnectionError,
    asyncio.IncompleteReadError,
    ValueError,
    IndexError,
)
REFUSED: Final = "refused"
LOST: Final = "lost"
SATURATED: Final = "saturated"


def multipart_body(
    field_name: str, filename: str, data: bytes, content_type: str
) -> tuple[bytes, str]:
    """A multipart/form-data body with one file part, and its boundary."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; '
        f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), boundary


def multipart_request(
    host: str,
    port: int,
    path: str,
    field_name: str,
    filename: str,
    data: bytes,
    content_type: str,
    extra_headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """One complete POST with a single file part, as bytes (``extra_headers``: e.g. a
    ``Priority``)."""
    body, boundary = multipart_body(field_name, filename, data, content_type)
    extra = "".join(f"{name}: {value}\r\n" for name, value in extra_headers)
    headers = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    ).encode()
    return headers + body


def oip_request(host: str, port: int, model: str, data: bytes, classes: int = 5) -> bytes:
    """One Open Inference Protocol v2 REST infer with the image as a binary BYTES tensor (the
    binary tensor data extension, as tritonclient sends it), asking for the top ``classes``."""
    element = len(data).to_bytes(4, "little") + data
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(element)},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"classification": classes}}],
        }
    ).encode()
    body = header + element
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Inference-Header-Content-Length: {len(header)}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    ).encode()
    return head + body


@dataclass
class LoadResult:
    """Every request's outcome, latency (seconds) and completion time."""

    mode: str
    concurrency: int | None
    rate: float | None
    elapsed_s: float
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    failures: Counter[str] = field(default_factory=Counter)
    #: The problem ``code`` of every non-200 answer (overloaded, not_ready...).
    codes: Counter[str] = field(default_factory=Counter)
    #: (seconds since the start when it completed, latency, status) of every answered request.
    samples: list[tuple[float, float, int]] = field(default_factory=list)
    #: CPU seconds the load generator itself used: it shares the machine with the server.
    client_cpu_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def errors(self) -> int:
        return sum(self.failures.values())

    def answered(self, latency: float, status: int) -> None:
        self.latencies.append(latency)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.samples.append((time.perf_counter() - self.started, latency, status))

    def percentile_ms(self, q: float, status: int = 200, after_s: float = 0.0) -> float | None:
        """The ``q``th percentile latency (ms, one decimal) of answers with ``status`` that
        completed ``after_s`` into the run or later; None when there is none."""
        values = [lat for at, lat, got in self.samples if got == status and at >= after_s]
        return round(float(np.percentile(values, q)) * 1000, 1) if values else None

    def latency_ms(self, status: int | None = None) -> np.ndarray:
        values = [lat for _, lat, s in self.samples if status is None or s == status]
        return np.array(values) * 1000 if values else np.array([np.nan])

    def summary(self) -> dict[str, float | int | str | dict[str, int] | None]:
        """The summary as JSON (what robustness.json and the tests read)."""
        figures: dict[str, float | int | str | dict[str, int] | None] = to_json(
            LoadSummary.of(self)
        )
        return figures


@dataclass(frozen=True)
class LoadSummary:
    """One load's figures: counts by outcome, throughput of the 200s, their latency
    percentiles, the client's own CPU; and, when the caller says so, what it sent."""

    mode: str
    concurrency: int | None
    rate: float | None
    requests: int
    ok: int
    non_200: int
    statuses: dict[str, int]
    errors: int
    failures: dict[str, int]
    codes: dict[str, int]
    elapsed_s: float
    rps: float
    #: NaN when no request answered 200 (as numpy's percentile of nothing).
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    client_cpu_s: float
    #: Labels the caller adds: the image sent, the route, the layout under load. Each is in
    #: the JSON only when set, as the reports always wrote them.
    image: str | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    route: str | None = field(default=None, metadata=OMITTED_WHEN_NONE)
    layout: str | None = field(default=None, metadata=OMITTED_WHEN_NONE)

    @classmethod
    def of(
        cls,
        result: LoadResult,
        *,
        image: str | None = None,
        route: str | None = None,
        layout: str | None = None,
    ) -> LoadSummary:
        lat = result.latency_ms(200)
        return cls(
            mode=result.mode,
            concurrency=result.concurrency,
            rate=result.rate,
            requests=len(result.latencies),
            ok=result.ok,
            non_200=sum(v for k, v in result.statuses.items() if k != 200),
            statuses={str(k): v for k, v in sorted(result.statuses.items())},
            errors=result.errors,
            failures=dict(result.failures),
            codes=dict(result.codes),
            elapsed_s=round(result.elapsed_s, 3),
            rps=round(result.ok / result.elapsed_s, 2) if result.elapsed_s else 0.0,
            p50_ms=_pct(lat, 50),
            p90_ms=_pct(lat, 90),
            p99_ms=_pct(lat, 99),
            mean_ms=round(float(lat.mean()), 2),
            client_cpu_s=round(result.client_cpu_s, 3),
            image=image,
            route=route,
            layout=layout,
        )


def at(levels: Sequence[LoadSummary], concurrency: int) -> LoadSummary:
    """The level run at ``concurrency``."""
    return next(level for level in levels if level.concurrency == concurrency)


def _pct(values: np.ndarray, q: float) -> float:
    return round(float(np.percentile(values, q)), 2)


class RequestLost(ConnectionError):
    """The request was sent but no whole response came back."""


class _Connection:
    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, payload: bytes) -> tuple[int, bytes]:
        """One request; its status and body. ``ConnectionRefusedError`` if never accepted,
        ``RequestLost`` if the connection broke after the request went out."""
        if self.writer is None or self.reader is None:
            # A SYN dropped by a stopping server is retried by the kernel for minutes.
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.timeout_s
            )
        try:
            return await asyncio.wait_for(self._exchange(payload), self.timeout_s)
        except (*_CLIENT_ERRORS, TimeoutError) as exc:
            self.close()
            raise RequestLost(f"{type(exc).__name__}: {exc}") from None

    async def _exchange(self, payload: bytes) -> tuple[int, bytes]:
        assert self.reader is not None
        assert self.writer is not None
        self.writer.write(payload)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("connection closed before a response")
        status = int(status_line.split()[1])
        length, chunked, close = 0, False, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value:
                chunked = True
            elif name == "connection" and value == "close":
                close = True
        body = b""
        if chunked:
            while True:
                size = int((await self.reader.readline()).strip() or b"0", 16)
                body += (await self.reader.readexactly(size + 2))[:-2]
                if size == 0:
                    break
        else:
            body = await self.reader.readexactly(length)
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _one(conn: _Connection, payload: bytes, result: LoadResult, since: float) -> bool:
    """Send one request and record its outcome; False when the connection is gone."""
    try:
        status, body = await conn.send(payload)
    except RequestLost:
        result.failures[LOST] += 1
        return False
    except (*_CLIENT_ERRORS, TimeoutError):
        result.failures[REFUSED] += 1
        conn.close()
        return False
    result.answered(time.perf_counter() - since, status)
    if status != 200:
        result.codes[_problem_code(body)] += 1
    return True


def _problem_code(body: bytes) -> str:
    try:
        code = json.loads(body).get("code")
    except (ValueError, AttributeError):
        return "unparsable"
    return str(code)


async def closed_loop(
    host: str,
    port: int,
    payload: bytes | Sequence[bytes],
    concurrency: int,
    duration_s: float,
    max_requests: int = 1_000_000,
    warmup: int = 2,
    timeout_s: float = 60.0,
    stop: asyncio.Event | None = None,
) -> LoadResult:
    """``concurrency`` clients back to back for ``duration_s`` (or ``max_requests``, or until
    ``stop`` is set); several payloads are sent in turn (a mix of good and bad inputs, say)."""
    mix = itertools.cycle([payload] if isinstance(payload, bytes) else payload)
    for _ in range(warmup):
        conn = _Connection(host, port, timeout_s)
        await conn.send(next(mix))
        conn.close()
    result = LoadResult("closed", concurrency, None, 0.0)
    budget = [max_requests]
    cpu_started = time.process_time()
    stop_at = result.started + duration_s

    async def client() -> None:
        conn = _Connection(host, port, timeout_s)
        while time.perf_counter() < stop_at and budget[0] > 0 and not (stop and stop.is_set()):
            budget[0] -= 1
            if not await _one(conn, next(mix), result, time.perf_counter()):
                await asyncio.sleep(0.01)
        conn.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    result.elapsed_s = time.perf_counter() - result.started
    result.client_cpu_s = time.process_time() - cpu_started
    return result


async def burst(
    host: str, port: int, payload: bytes, count: int, timeout_s: float = 120.0
) -> LoadResult:
    """``count`` clients, each on its own connection, sending one request at the same moment
    (what a caller that fans out does); latency from the common start."""
    result = LoadResult("burst", count, None, 0.0)
    conns = [_Connection(host, port, timeout_s) for _ in range(count)]
    since = time.perf_counter()
    await asyncio.gather(*(_one(conn, payload, result, since) for conn in conns))
    for conn in conns:
        conn.close()
    result.elapsed_s = time.perf_counter() - result.started
    return result


async def open_loop(
    host: str,
    port: int,
    payload: bytes,
    rate: float,
    duration_s: float,
    max_connections: int = MAX_OPEN_LOOP_CONNECTIONS,
    timeout_s: float = 60.0,
    stop: Callable[[], bool] | None = None,
) -> LoadResult:
    """Arrivals every 1/rate seconds whatever the server does; latency from the arrival time.
    ``duration_s`` is the most it runs: ``stop`` (polled every ``STOP_POLL`` arrivals) ends the
    arrivals early, once the caller has what it measured under the load."""
    result = LoadResult("open", None, rate, 0.0)
    idle: list[_Connection] = []
    open_count = [0]
    cpu_started = time.process_time()
    total = int(rate * duration_s)
    tasks: list[asyncio.Task[None]] = []

    async def one(arrival: float) -> None:
        if idle:
            conn = idle.pop()
        elif open_count[0] < max_connections:
            open_count[0] += 1
            conn = _Connection(host, port, timeout_s)
        else:
            result.failures[SATURATED] += 1  # the client itself is out of connections
            return
        if await _one(conn, payload, result, arrival):
            idle.append(conn)
        else:
            open_count[0] -= 1

    for i in range(total):
        if stop is not None and i % STOP_POLL == 0 and stop():
            break
        arrival = result.started + i / rate
        delay = arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(arrival)))
    await asyncio.gather(*tasks)
    result.elapsed_s = time.perf_counter() - result.started
    result.client_cpu_s = time.process_time() - cpu_started
    for conn in idle:
        conn.close()
    return result
