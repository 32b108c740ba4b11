"""A lean HTTP/1.1 load generator on raw asyncio streams (loopback only).

Requests are pre-encoded bytes, so the client spends little CPU per request: on a 2-core
machine it shares the cores with the server under test, and an httpx client would cost a
visible share of them. Closed loop: C connections, each sends its next request when the last
one is answered. Open loop: arrivals at a fixed rate, latency measured from the scheduled
arrival (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

MAX_OPEN_LOOP_CONNECTIONS = 512


def multipart_request(
    host: str, port: int, path: str, field_name: str, filename: str, data: bytes, content_type: str
) -> bytes:
    """One complete POST with a single file part, as bytes."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; '
        f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'
    ).encode()
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    headers = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    ).encode()
    return headers + body


@dataclass
class LoadResult:
    """Latencies (seconds) of answered requests and what went wrong."""

    mode: str
    concurrency: int | None
    rate: float | None
    elapsed_s: float
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    #: CPU seconds the load generator itself used: it shares the machine with the server.
    client_cpu_s: float = 0.0

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    def summary(self) -> dict[str, float | int | None]:
        lat = np.array(self.latencies) * 1000 if self.latencies else np.array([np.nan])
        non_200 = sum(v for k, v in self.statuses.items() if k != 200)
        return {
            "mode": self.mode,  # type: ignore[dict-item]
            "concurrency": self.concurrency,
            "rate": self.rate,
            "requests": len(self.latencies),
            "ok": self.ok,
            "non_200": non_200,
            "errors": self.errors,
            "elapsed_s": round(self.elapsed_s, 3),
            "rps": round(self.ok / self.elapsed_s, 2) if self.elapsed_s else 0.0,
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p90_ms": round(float(np.percentile(lat, 90)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "mean_ms": round(float(lat.mean()), 2),
            "client_cpu_s": round(self.client_cpu_s, 3),
        }


class _Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, payload: bytes) -> int:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(payload)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("connection closed")
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
        if chunked:
            while True:
                size = int((await self.reader.readline()).strip() or b"0", 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            await self.reader.readexactly(length)
        if close:
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def closed_loop(
    host: str,
    port: int,
    payload: bytes,
    concurrency: int,
    duration_s: float,
    max_requests: int = 1_000_000,
    warmup: int = 2,
) -> LoadResult:
    """``concurrency`` clients back to back for ``duration_s`` (or ``max_requests``)."""
    result = LoadResult("closed", concurrency, None, 0.0)
    for _ in range(warmup):
        conn = _Connection(host, port)
        await conn.send(payload)
        conn.close()
    budget = [max_requests]
    cpu_started = time.process_time()
    started = time.perf_counter()
    stop_at = started + duration_s

    async def client() -> None:
        conn = _Connection(host, port)
        while time.perf_counter() < stop_at and budget[0] > 0:
            budget[0] -= 1
            t0 = time.perf_counter()
            try:
                status = await conn.send(payload)
            except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
                result.errors += 1
                conn.close()
                await asyncio.sleep(0.01)
                continue
            result.latencies.append(time.perf_counter() - t0)
            result.statuses[status] = result.statuses.get(status, 0) + 1
        conn.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    result.elapsed_s = time.perf_counter() - started
    result.client_cpu_s = time.process_time() - cpu_started
    return result


async def open_loop(
    host: str, port: int, payload: bytes, rate: float, duration_s: float
) -> LoadResult:
    """Arrivals every 1/rate seconds whatever the server does; latency from the arrival time."""
    result = LoadResult("open", None, rate, 0.0)
    idle: list[_Connection] = []
    open_count = [0]
    cpu_started = time.process_time()
    started = time.perf_counter()
    total = int(rate * duration_s)
    tasks: list[asyncio.Task[None]] = []

    async def one(arrival: float) -> None:
        if idle:
            conn = idle.pop()
        elif open_count[0] < MAX_OPEN_LOOP_CONNECTIONS:
            open_count[0] += 1
            conn = _Connection(host, port)
        else:
            result.errors += 1  # the client itself is saturated: count as a failure
            return
        try:
            status = await conn.send(payload)
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
            result.errors += 1
            conn.close()
            open_count[0] -= 1
            return
        result.latencies.append(time.perf_counter() - arrival)
        result.statuses[status] = result.statuses.get(status, 0) + 1
        idle.append(conn)

    for i in range(total):
        arrival = started + i / rate
        delay = arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(arrival)))
    await asyncio.gather(*tasks)
    result.elapsed_s = time.perf_counter() - started
    result.client_cpu_s = time.process_time() - cpu_started
    for conn in idle:
        conn.close()
    return result
