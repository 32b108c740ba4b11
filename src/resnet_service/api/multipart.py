"""Streaming multipart/form-data reader that keeps uploads in memory, within per-route limits.

Starlette's form parser spools files over 1 MB to disk and defaults to 1000 files per request;
here every part is capped while it streams (python-multipart does the parsing), nothing is ever
written to disk, and a body over the cap is refused before the rest of it is read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import ClientDisconnect, Request

from resnet_service.api.problems import MalformedRequest, MissingField, TooManyFiles
from resnet_service.errors import Overloaded, UploadTooLarge


class UploadBudget:
    """Upload bytes held in memory by all requests of this process (event-loop thread only)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0

    def take(self, size: int) -> None:
        if self.used + size > self.capacity:
            raise Overloaded(
                f"Uploads in progress already hold {self.used} bytes (limit {self.capacity}); "
                "retry shortly.",
                retry_after_s=1,
            )
        self.used += size

    def give_back(self, size: int) -> None:
        self.used -= size


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
    request: Request, limits: FormLimits, budget: UploadBudget
) -> AsyncIterator[list[UploadedFile]]:
    """The request's files, read into memory under the process-wide upload budget, which they
    hold until the block ends."""
    held = [0]
    try:
        yield await _read_form(request, limits, budget, held)
    finally:
        budget.give_back(held[0])


async def _read_form(
    request: Request, limits: FormLimits, budget: UploadBudget, held: list[int]
) -> list[UploadedFile]:
    """Read a multipart body into memory, refusing it as soon as a limit is crossed."""
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":
        raise MalformedRequest(
            "Send the image as multipart/form-data (e.g. curl -F image=@photo.jpg); "
            f"got Content-Type '{request.headers.get('content-type', '')}'."
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise MalformedRequest("The multipart Content-Type header has no boundary.")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise UploadTooLarge(
            f"The request body is {declared} bytes; this route accepts at most "
            f"{limits.max_body_bytes} bytes."
        )
    collector = _FormCollector(limits)
    callbacks = {
        name: getattr(collector, name)
        for name in (
            "on_part_begin",
            "on_part_data",
            "on_part_end",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
        )
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limits.max_body_bytes:
                raise UploadTooLarge(
                    f"The request body exceeds {limits.max_body_bytes} bytes; this route "
                    "accepts no more."
                )
            budget.take(len(chunk))
            held[0] += len(chunk)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise MalformedRequest(f"The multipart body is malformed: {exc}") from None
    except ClientDisconnect:
        raise MalformedRequest("The client disconnected before the upload finished.") from None
    if received == 0:
        raise MalformedRequest("The request body is empty; attach the image as multipart.")
    if parser.state not in (MultipartState.END, MultipartState.BOUNDARY_PADDING):
        raise MalformedRequest(
            "The multipart body ended before its closing boundary (truncated upload?)."
        )
    return collector.files
