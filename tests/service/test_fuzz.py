"""Property-based fuzzing of what parses untrusted bytes: the image decoder and the multipart
reader (bounded: a few hundred cases each). ``make robustness`` fuzzes the same entry points
coverage-guided for minutes (``scripts/fuzz.py``, atheris); these keep the contract in CI.

The contract: any input either yields a well-formed result or one of our ``InputError``s
(a 4xx naming what to fix); never another exception, a 5xx, or a hang.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from resnet_service.config import Settings
from resnet_service.core.errors import InputError
from resnet_service.core.images import decode_and_preprocess
from resnet_service.server.app import create_app
from tests.harness import (
    DEFAULT_RUNTIME,
    LIMITS,
    SPEC,
    encode,
    jpeg_of,
    make_settings,
    mode_image,
    until,
)

SEEDS = [
    jpeg_of("coffee", (64, 48)),
    encode(mode_image("RGBA", (40, 30)), "PNG"),
    encode(mode_image("P", (40, 30)), "GIF"),
    encode(mode_image("RGB", (40, 30)), "BMP"),
    encode(mode_image("RGB", (40, 30)), "WEBP"),
]
MAGIC = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBP"]


@st.composite
def corrupted_images(draw: st.DrawFn) -> bytes:
    """A real image with bytes flipped, cut or spliced; or a format's magic and noise."""
    if draw(st.booleans()):
        return draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=2048))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(1, len(data)))]
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corrupted_images())
def test_the_decoder_returns_an_image_or_an_input_error(data: bytes) -> None:
    try:
        array = decode_and_preprocess(data, LIMITS, SPEC)
    except InputError:
        return
    assert array.shape == (3, 224, 224)
    assert array.dtype == np.float32
    assert np.isfinite(array).all()


def test_a_decompression_bomb_is_refused_from_its_header() -> None:
    big = Image.new("L", (9000, 9000))
    buf = io.BytesIO()
    big.save(buf, "PNG", optimize=True)
    with pytest.raises(InputError, match="pixels"):
        decode_and_preprocess(buf.getvalue(), LIMITS, SPEC)


# --- the multipart reader, through the app in-process ---------------------------------------
@pytest.fixture(scope="module")
def app_settings(weights_file: Path, model_cache: Path) -> Settings:
    return make_settings(weights_file, model_cache, DEFAULT_RUNTIME)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def client(app_settings: Settings, loop: asyncio.AbstractEventLoop) -> Iterator[httpx.AsyncClient]:
    """One app (lifespan on, model warm) for every generated case."""
    app = create_app(app_settings, exit_on_startup_failure=False)
    lifespan = app.router.lifespan_context(app)

    async def start() -> httpx.AsyncClient:
        await lifespan.__aenter__()
        state = app.state.service
        loaded = lambda: state.readiness_problem() is None or state.startup_error  # noqa: E731
        await until(loaded, 60, "the model to load")
        assert state.startup_error is None, state.startup_error
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")

    http = loop.run_until_complete(start())
    yield http
    loop.run_until_complete(http.aclose())
    loop.run_until_complete(lifespan.__aexit__(None, None, None))


boundaries = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters='";\\'),
    min_size=1,
    max_size=90,
)


@st.composite
def multipart_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    boundary = draw(boundaries)
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["image", "images", "other", ""]))
        head = draw(
            st.sampled_from(
                [
                    f'Content-Disposition: form-data; name="{name}"; filename="f.jpg"',
                    f'Content-Disposition: form-data; name="{name}"',
                    "Content-Disposition: attachment",
                    "",
                ]
            )
        )
        content = draw(st.one_of(st.binary(max_size=512), st.sampled_from(SEEDS)))
        parts.append(f"--{boundary}\r\n{head}\r\n\r\n".encode() + content + b"\r\n")
    tail = draw(st.sampled_from([f"--{boundary}--\r\n".encode(), b"", b"--"]))
    body = b"".join(parts) + tail
    if draw(st.booleans()):  # noise somewhere
        body = draw(st.binary(max_size=64)) + body[draw(st.integers(0, len(body))) :]
    return boundary, body


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=multipart_bodies(), path=st.sampled_from(["/classify", "/classify/batch"]))
def test_the_multipart_reader_never_fails_with_a_5xx(
    client: httpx.AsyncClient,
    loop: asyncio.AbstractEventLoop,
    case: tuple[str, bytes],
    path: str,
) -> None:
    boundary, body = case

    async def post() -> httpx.Response:
        return await client.post(
            path,
            content=_chunks(body),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )

    response = loop.run_until_complete(asyncio.wait_for(post(), 30))
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"]


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    """The body in uneven pieces, as a network delivers it."""
    for start in range(0, len(body), 97):
        yield body[start : start + 97]
