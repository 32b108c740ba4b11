"""Streaming multipart/form-data reader that keeps uploads in memory, within per-route limits.

Starlette's form parser spools files over 1 MB to disk and defaults to 1000 files per request;
here every part is capped while it streams (python-multipart does the parsing), nothing is ever
written to disk, and a body over the cap is refused before the rest of it is read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import ClientDisconnect, Request

from resnet_service.asgi.body import body_chunks
from resnet_service.config import Settings
from resnet_service.core.engine_spans import child_span
from resnet_service.core.errors import MalformedRequest, MissingField, TooManyFiles, UploadTooLarge
from resnet_service.service.upload_budget import UploadBudget

#: RFC 2046: a boundary is 1 to 70 characters.
MAX_BOUNDARY: Final = 70
# Multipart framing around an image: part headers and boundaries.
_FORM_OVERHEAD: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class FormLimits:
    """Per-route caps."""

    file_fields: frozenset[str]
    max_files: int
    max_file_bytes: int
    max_body_bytes: int
    max_fields: int = 8
    max_field_bytes: int = 1024
    max_header_bytes: int = 8 * 1024

    @classmethod
    def single_image(cls, settings: Settings) -> FormLimits:
        """``/classify``: one field ``image``."""
        return cls(
            file_fields=frozenset({"image"}),
            max_files=1,
            max_file_bytes=settings.max_upload_bytes,
            max_body_bytes=settings.max_upload_bytes + _FORM_OVERHEAD,
        )

    @classmethod
    def batch(cls, settings: Settings) -> FormLimits:
        """``/classify/batch``: repeated field ``images``."""
        return cls(
            file_fields=frozenset({"images"}),
            max_files=settings.max_batch_files,
            max_file_bytes=settings.max_upload_bytes,
            max_body_bytes=settings.max_batch_bytes,
        )


@dataclass(slots=True)
class UploadedFile:
    """One file part, held in memory."""

    filename: str | None
    data: bytes


@dataclass(slots=True)
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    name: str = ""
    filename: str | None = None
    is_file: bool = False


class _FormCollector:
    """python-multipart callbacks that enforce the limits as bytes arrive."""

    def __init__(self, limits: FormLimits) -> None:
        self.limits = limits
        self.files: list[UploadedFile] = []
        self.fields: dict[str, str] = {}
        self.part = _Part()
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._header_bytes = 0
        self.error: Exception | None = None

    def on_part_begin(self) -> None:
        self.part = _Part()
        self._header_bytes = 0

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_value += data[start:end]

    def _count_header(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.limits.max_header_bytes:
            raise MalformedRequest("A multipart part has oversized headers.")

    def on_header_end(self) -> None:
        name = self._header_field.decode("latin-1").strip().lower()
        self.part.headers[name] = self._header_value.decode("latin-1").strip()
        self._header_field.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self.part.headers.get("content-disposition"))
        if disposition != b"form-data" or b"name" not in options:
            raise MalformedRequest(
                "Each multipart part needs a 'Content-Disposition: form-data; name=...' header."
            )
        self.part.name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            self.part.filename = options[b"filename"].decode("utf-8", "replace")
        self.part.is_file = (
            self.part.filename is not None or self.part.name in self.limits.file_fields
        )
        if self.part.is_file:
            if self.part.name not in self.limits.file_fields:
                expected = " or ".join(f"'{f}'" for f in sorted(self.limits.file_fields))
                raise MissingField(
                    f"Unexpected file field '{self.part.name}': send the image as {expected}."
                )
            if len(self.files) >= self.limits.max_files:
                raise TooManyFiles(
                    f"At most {self.limits.max_files} image(s) per request; send the rest in "
                    "another request."
                )
        elif len(self.fields) >= self.limits.max_fields:
            raise TooManyFiles(f"At most {self.limits.max_fields} form fields per request.")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.part.data += data[start:end]
        if self.part.is_file and len(self.part.data) > self.limits.max_file_bytes:
            raise UploadTooLarge(
                f"The image '{self.part.filename or self.part.name}' is larger than "
                f"{self.limits.max_file_bytes} bytes."
            )
        if not self.part.is_file and len(self.part.data) > self.limits.max_field_bytes:
            raise MalformedRequest(f"The form field '{self.part.name}' is too long.")

    def on_part_end(self) -> None:
        part = self.part
        if part.is_file:
            self.files.append(UploadedFile(filename=part.filename, data=bytes(part.data)))
        else:
            self.fields[part.name] = part.data.decode("utf-8", "replace")


@asynccontextmanager
async def uploaded_files(
    request: Request, limits: FormLimits, budget: UploadBudget, idle_timeout_s: float
) -> AsyncIterator[list[UploadedFile]]:
    """The request's files, read into memory under the process-wide upload budget, which they
    hold until the block ends. A client that sends nothing for ``idle_timeout_s`` is refused
    (408) instead of holding the connection and its memory."""
    held = [0]
    try:
        with child_span("read upload"):
            files = await _read_form(request, limits, budget, held, idle_timeout_s)
        yield files
    finally:
        budget.give_back(held[0])


def _boundary(request: Request) -> bytes:
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":
        raise MalformedRequest(
            "Send the image as multipart/form-data (e.g. curl -F image=@photo.jpg); "
            f"got Content-Type '{request.headers.get('content-type', '')}'."
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise MalformedRequest("The multipart Content-Type header has no boundary.")
    if len(boundary) > MAX_BOUNDARY:
        raise MalformedRequest(
            f"The multipart boundary is {len(boundary)} characters; at most {MAX_BOUNDARY} "
            "are allowed (RFC 2046)."
        )
    return boundary


def _check_declared_length(request: Request, limits: FormLimits) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise UploadTooLarge(
            f"The request body is {declared} bytes; this route accepts at most "
            f"{limits.max_body_bytes} bytes."
        )


class FormReader:
    """A multipart body fed chunk by chunk: python-multipart parses, our callbacks enforce the
    limits as bytes arrive. Sync and transport-free (the fuzzer drives it directly)."""

    def __init__(self, boundary: bytes, limits: FormLimits) -> None:
        self.limits = limits
        self.received = 0
        self._collector = _FormCollector(limits)
        callbacks = {name: getattr(self._collector, name) for name in _CALLBACKS}
        try:
            self._parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        except FormParserError as exc:
            raise MalformedRequest(f"The multipart boundary is unusable: {exc}") from None

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.limits.max_body_bytes:
            raise UploadTooLarge(
                f"The request body exceeds {self.limits.max_body_bytes} bytes; this route "
                "accepts no more."
            )
        try:
            self._parser.write(chunk)
        except FormParserError as exc:
            raise MalformedRequest(f"The multipart body is malformed: {exc}") from None

    def finish(self) -> list[UploadedFile]:
        """The files, once the whole body arrived; ``MalformedRequest`` if it is incomplete."""
        if self.received == 0:
            raise MalformedRequest("The request body is empty; attach the image as multipart.")
        try:
            self._parser.finalize()
        except FormParserError as exc:
            raise MalformedRequest(f"The multipart body is malformed: {exc}") from None
        if self._parser.state not in (MultipartState.END, MultipartState.BOUNDARY_PADDING):
            raise MalformedRequest(
                "The multipart body ended before its closing boundary (truncated upload?)."
            )
        return self._collector.files


_CALLBACKS: Final = (
    "on_part_begin",
    "on_part_data",
    "on_part_end",
    "on_header_field",
    "on_header_value",
    "on_header_end",
    "on_headers_finished",
)


async def _read_form(
    request: Request,
    limits: FormLimits,
    budget: UploadBudget,
    held: list[int],
    idle_timeout_s: float,
) -> list[UploadedFile]:
    """Read a multipart body into memory, refusing it as soon as a limit is crossed."""
    _check_declared_length(request, limits)
    reader = FormReader(_boundary(request), limits)
    try:
        async for chunk in body_chunks(request, idle_timeout_s):
            budget.take(len(chunk))
            held[0] += len(chunk)
            reader.feed(chunk)
    except ClientDisconnect:
        raise MalformedRequest("The client disconnected before the upload finished.") from None
    return reader.finish()
