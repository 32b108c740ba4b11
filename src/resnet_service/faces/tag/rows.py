"""What the tag job writes: one typed row per input, and its Arrow schema.

The columns follow ``/classify`` (``predictions`` as {label, index, score}, best first) and the
API's error codes, so a result read from the job means what the same answer from the service
means.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from resnet_service.core.errors import UnreadableFile

#: A file that could not be read: gone between listing and reading, no permission, a loop.
UNREADABLE: Final = UnreadableFile.code
#: A worker process died while it held this input (twice): the input is the likely cause.
WORKER_CRASHED: Final = "worker_crashed"
#: Error codes worth a retry on the next run (the cause is outside the file's bytes).
RETRIED_CODES: Final = frozenset({UNREADABLE, WORKER_CRASHED})


@dataclass(frozen=True, slots=True)
class ModelStamp:
    """Which model answered: written on every row and in the output's ``_job.json``."""

    name: str
    version: str
    runtime: str
    precision: str
    weights_sha256: str


@dataclass(frozen=True, slots=True)
class RowError:
    """Why an input has no predictions: the API's code and a sentence saying what to fix."""

    code: str
    detail: str


@dataclass(frozen=True, slots=True)
class Label:
    label: str
    index: int
    score: float


@dataclass(frozen=True, slots=True)
class TagRow:
    """One input's answer (``predictions``) or its error, never both."""

    path: str
    size: int | None
    #: The modification time in nanoseconds (files) or the ETag (object stores), as text.
    source_version: str
    predictions: list[Label] = field(default_factory=list)
    error: RowError | None = None
    #: The upright (width, height) of the image, when it decoded.
    width: int | None = None
    height: int | None = None
    embedding: npt.NDArray[np.float32] | None = None
    #: The model's tags for the image (``core.tag_rules``), best first: (name, score).
    tags: list[tuple[str, float]] = field(default_factory=list)


def path_key(path: str) -> int:
    """A row's path as a 64-bit key (the committed index holds 16 bytes a row, not strings)."""
    return int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little")


def identity_key(size: int | None, source_version: str) -> int:
    """What makes a listed file the same one that was tagged: its size and version."""
    text = f"{size}|{source_version}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")
