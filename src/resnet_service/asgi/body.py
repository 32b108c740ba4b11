"""Request bodies into memory under the replica's limits: the idle timeout between chunks, the
size cap while streaming and the process-wide upload budget (every HTTP face reads this way)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.requests import ClientDisconnect, Request

from resnet_service.core.engine_spans import child_span
from resnet_service.core.errors import MalformedRequest, RequestTimeout, UploadTooLarge
from resnet_service.service.upload_budget import UploadBudget


async def body_chunks(request: Request, idle_timeout_s: float) -> AsyncIterator[bytes]:
    """The body's chunks; ``RequestTimeout`` when the client stalls."""
    stream = request.stream()
    while True:
        try:
            chunk = await asyncio.wait_for(anext(stream), idle_timeout_s)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RequestTimeout(
                f"The upload stalled: nothing arrived for {idle_timeout_s:g} s. Send the body "
                "without pauses."
            ) from None
        yield chunk


@asynccontextmanager
async def request_body(
    request: Request, max_bytes: int, budget: UploadBudget, idle_timeout_s: float
) -> AsyncIterator[bytes]:
    """A whole (non-multipart) body in memory under the same limits as uploads: the declared
    length checked first, the size while streaming, the idle timeout, and the upload budget,
    held until the block ends."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise UploadTooLarge(
            f"The request body is {declared} bytes; this route accepts at most {max_bytes} bytes."
        )
    chunks: list[bytes] = []
    try:
        with child_span("read upload"):
            async for chunk in body_chunks(request, idle_timeout_s):
                if sum(len(c) for c in chunks) + len(chunk) > max_bytes:
                    raise UploadTooLarge(f"The request body exceeds {max_bytes} bytes.")
                budget.take(len(chunk))
                chunks.append(chunk)
        if not chunks:
            raise MalformedRequest("The request body is empty.")
        yield b"".join(chunks)
    except ClientDisconnect:
        raise MalformedRequest("The client disconnected before the body was sent.") from None
    finally:
        budget.give_back(sum(len(c) for c in chunks))
