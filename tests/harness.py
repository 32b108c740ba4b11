"""The tests' shared harness: data made here (weights, photos, images in every mode; no
network, no hub), settings for in-process use, and real ``resnet-service serve`` processes on
free 127.0.0.1 ports, polled until ready and stopped by process group."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

import httpx
import numpy as np
import skimage.data
from PIL import Image

from resnet_bench.servers import free_port, process_children, stop_process_group
from resnet_service.config import RuntimeName, Settings, load_settings
from resnet_service.core.images import ImageLimits, PreprocessSpec

ROOT: Final = Path(__file__).resolve().parents[1]
T = TypeVar("T")
#: The runtime a user gets without choosing one.
DEFAULT_RUNTIME: Final[RuntimeName] = Settings.model_fields["runtime"].default

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
LIMITS = ImageLimits(max_bytes=64 * 1024 * 1024, max_pixels=40_000_000)
SPEC = PreprocessSpec()


@cache
def photo(name: str) -> Image.Image:
    """A real photo that scikit-image ships (public domain / CC0)."""
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def encode(img: Image.Image, fmt: str = "JPEG", **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def jpeg_of(name: str, size: tuple[int, int] = (500, 375), quality: int = 90) -> bytes:
    """A real photo as a JPEG of the given size."""
    return encode(photo(name).resize(size, Image.Resampling.BICUBIC), "JPEG", quality=quality)


def mode_image(mode: str, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A synthetic image in any Pillow mode, with structure (gradients) rather than flat colour."""
    w, h = size
    x = np.linspace(0, 1, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 1, h)[:, None].repeat(w, 1)
    rgb = (np.stack([x, y, 1 - x * y], axis=-1) * 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    if mode in ("RGB",):
        return img
    if mode == "I;16":
        arr16 = (x * 65535).astype(np.uint16)
        return Image.fromarray(arr16)
    if mode == "RGBA":
        rgba = img.convert("RGBA")
        rgba.putalpha(Image.fromarray((y * 255).astype(np.uint8)))
        return rgba
    if mode == "LA":
        la = img.convert("LA")
        la.putalpha(Image.fromarray((y * 255).astype(np.uint8)))
        return la
    return img.convert(mode)


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


async def until(
    predicate: Callable[[], object], within_s: float, what: str, *, blocking: bool = False
) -> None:
    """Poll ``predicate`` from a coroutine until it is true, or fail naming ``what``;
    ``blocking``: it does I/O (a metrics scrape), so it runs in a thread."""
    deadline = time.monotonic() + within_s
    while not (await asyncio.to_thread(predicate) if blocking else predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


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


def make_settings(
    weights_file: Path, cache: Path, runtime: RuntimeName = "torch", **overrides: object
) -> Settings:
    """Settings for in-process use: the torch runtime for unit tests of models (their fixtures
    are torch modules); the service tier passes ``DEFAULT_RUNTIME``, the product's default."""
    base: dict[str, object] = {
        "runtime": runtime,
        "weights_path": weights_file,
        "model_cache_dir": cache,
        "allow_downloads": False,
        "inference_threads": 1,
    }
    base.update(overrides)
    return load_settings(**base)


# --- load that records what answered ---------------------------------------------------------
@dataclass
class Answers(Generic[T]):
    """What each answer said (``pick`` of its body), when it came, and every failure."""

    values: list[tuple[float, T]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def after(self, t: float) -> list[T]:
        return [v for when, v in self.values if when >= t]


class ClassifyLoad(Generic[T]):
    """``clients`` closed-loop ``/classify`` clients (of ``model``, else the default one) in a
    thread of their own until the block ends, recording ``pick(body)`` of every answer."""

    def __init__(
        self,
        url: str,
        pick: Callable[[dict[str, Any]], T],
        *,
        model: str | None = None,
        clients: int = 16,
        image: bytes | None = None,
    ) -> None:
        self.url, self.pick, self.clients = url, pick, clients
        self.params = {"model": model} if model else {}
        self.image = image or jpeg_of("chelsea", (320, 240))
        self.answers: Answers[T] = Answers()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _client(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            while not stop.is_set():
                files = {"image": ("c.jpg", self.image, "image/jpeg")}
                try:
                    r = await client.post("/classify", params=self.params, files=files)
                except httpx.HTTPError as exc:
                    self.answers.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                if r.status_code != 200:
                    self.answers.failures.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                self.answers.values.append((time.monotonic(), self.pick(r.json())))

    async def _main(self) -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(self._client(stop)) for _ in range(self.clients)]
        await asyncio.to_thread(self._halt.wait)
        stop.set()
        await asyncio.gather(*tasks)

    def __enter__(self) -> ClassifyLoad[T]:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self._thread.join(60)

    def count(self) -> int:
        return len(self.answers.values)

    def last(self, n: int) -> list[T]:
        return [v for _, v in self.answers.values[-n:]]
