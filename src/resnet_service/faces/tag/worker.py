"""One worker process of the tag job: read, decode and infer its inputs in batches.

The ceiling's layout (shared/measurements.md): one process per core, each with one inference
thread, decoding and inferring in turn, no thread handing work to another. A worker talks to
the job over its own pipe (a task in, its rows out), so a worker that dies takes no lock
another one needs; it exits when the job's process is gone (checked while it waits).
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from resnet_service.config import Settings
from resnet_service.core.engine import forward_batch, softmax
from resnet_service.core.errors import ServiceError, UnreadableFile, UploadTooLarge
from resnet_service.core.feature_outputs import l2_normalised
from resnet_service.core.images import (
    ImageLimits,
    Pixels,
    decode_sized,
    install_bomb_guard,
    normalise_pixels,
)
from resnet_service.core.results import top_k
from resnet_service.core.runtime import (
    LOGITS_ONLY,
    FloatBatch,
    Forward,
    Output,
    ServedModel,
    Wants,
)
from resnet_service.faces.tag.rows import Label, RowError, TagRow
from resnet_service.faces.tag.sources import Item, is_uri

#: How often a waiting worker checks that the job's process is still there (seconds).
_PARENT_CHECK_S = 1.0


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker needs to open the model and answer as the job asked."""

    settings: Settings
    artifact: str | None
    top_k: int
    embed: bool


@dataclass(frozen=True, slots=True)
class Task:
    id: int
    items: list[Item]


@dataclass(frozen=True, slots=True)
class Done:
    task_id: int
    rows: list[TagRow]


@dataclass(frozen=True, slots=True)
class Ready:
    """Sent once the model is loaded and warm."""

    pid: int


@dataclass(frozen=True, slots=True)
class Failed:
    """The worker could not start (the model did not open): the job stops with this."""

    reason: str


def read_bytes(item: Item, max_bytes: int) -> bytes:
    """An input's bytes, refusing more than ``max_bytes`` without reading them all."""
    if item.size is not None and item.size > max_bytes:
        raise UploadTooLarge(
            f"{item.path} is {item.size} bytes; the limit is {max_bytes} "
            "(RESNET_SERVICE_MAX_UPLOAD_BYTES)"
        )
    try:
        if is_uri(item.location):
            import fsspec

            with fsspec.open(item.location, "rb") as f:
                data: bytes = f.read(max_bytes + 1)
        else:
            with open(item.location, "rb") as f:
                data = f.read(max_bytes + 1)
    except OSError as exc:  # vanished, no permission, a symlink loop, an object gone
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise UnreadableFile(f"cannot read {item.path}: {reason}") from None
    if len(data) > max_bytes:
        raise UploadTooLarge(f"{item.path} is over the {max_bytes}-byte limit")
    return data


@dataclass(frozen=True, slots=True)
class Decoded:
    """An input decoded to the model's size, with its upright (width, height) as stored."""

    item: Item
    pixels: Pixels
    size: tuple[int, int]


class Tagger:
    """A loaded model and the job's choices: ``run`` turns inputs into rows."""

    def __init__(self, model: ServedModel, spec: WorkerSpec) -> None:
        from resnet_service.model.tag_rules_file import tag_rules_for

        self.model = model
        self.rules = tag_rules_for(spec.settings, model.labels)
        self.top_k = min(spec.top_k, model.info.num_classes)
        self.embed = spec.embed
        settings = spec.settings
        self.limits = ImageLimits(settings.max_upload_bytes, settings.max_pixels)
        self.fast = settings.preprocessing == "fast"
        self.batch_size = settings.max_batch_size
        self.wants: Wants = LOGITS_ONLY | ({Output.EMBEDDING} if spec.embed else set())

    def warm(self) -> None:
        """One forward of the batch size, so the first task does not pay the kernels' set-up."""
        side = self.model.spec.crop_size
        self._forward_pixels(np.zeros((self.batch_size, side, side, 3), dtype=np.uint8))

    def _forward_pixels(self, pixels: Pixels) -> Forward:
        return forward_batch(self.model.runtime, pixels, self.wants, self._normalise)

    def decode(self, item: Item) -> Decoded | RowError:
        """An input's model-sized pixels, or the error row's reason (the API's codes)."""
        if item.error is not None:
            return item.error
        try:
            data = read_bytes(item, self.limits.max_bytes)
            pixels, size = decode_sized(data, self.limits, self.model.spec, fast=self.fast)
        except ServiceError as exc:
            return RowError(exc.code, exc.detail)
        return Decoded(item, pixels, size)

    def run(self, items: list[Item]) -> list[TagRow]:
        """Rows for ``items``, in order: one per input, predictions or an error."""
        decoded = [self.decode(item) for item in items]
        good = [d for d in decoded if isinstance(d, Decoded)]
        answered: dict[int, TagRow] = {}
        for start in range(0, len(good), self.batch_size):
            batch = good[start : start + self.batch_size]
            answered.update((id(d), row) for d, row in zip(batch, self._rows(batch), strict=True))
        return [
            answered[id(result)]
            if isinstance(result, Decoded)
            else TagRow(item.path, item.size, item.source_version, error=result)
            for item, result in zip(items, decoded, strict=True)
        ]

    def _rows(self, batch: list[Decoded]) -> list[TagRow]:
        """One forward of ``batch``: each image's Top-k (and embedding)."""
        outputs = self._forward_pixels(np.stack([d.pixels for d in batch]))
        probabilities = softmax(outputs.logits.astype(np.float32, copy=True))
        rows = []
        for row, image in enumerate(batch):
            indices, scores = top_k(probabilities[row], self.top_k)
            labels = [
                Label(self.model.labels[i], i, round(score, 6))
                for i, score in zip(indices, scores, strict=True)
            ]
            embedding = None
            if self.embed and outputs.embedding is not None:
                embedding = l2_normalised(outputs.embedding[row].copy())
            tags = self.rules.tags(probabilities[row]) if self.rules else ()
            item = image.item
            rows.append(
                TagRow(
                    item.path,
                    item.size,
                    item.source_version,
                    labels,
                    None,
                    *image.size,
                    embedding,
                    [(t.name, round(t.score, 6)) for t in tags],
                )
            )
        return rows

    def _normalise(self, pixels: Pixels) -> FloatBatch:
        return normalise_pixels(pixels, self.model.spec)


def open_model(spec: WorkerSpec) -> ServedModel:
    from resnet_service.model.served import open_served_model

    one_thread = spec.settings.model_copy(update={"inference_threads": 1, "workers": 1})
    artifact = Path(spec.artifact) if spec.artifact else None
    return open_served_model(one_thread, artifact)


def main(conn: Connection, spec: WorkerSpec, parent: int) -> None:
    """A worker's life: open the model, then answer tasks until told to stop (None). Ctrl-C
    and SIGTERM reach the whole process group: the job decides for its workers (it lets the
    tasks out finish, then stops them), so they ignore both."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING)
    install_bomb_guard()
    try:
        model = open_model(spec)
        model.runtime.bind_thread()
        tagger = Tagger(model, spec)
        tagger.warm()
    except Exception as exc:  # reported to the job, which stops with it
        conn.send(Failed(f"{type(exc).__name__}: {exc}"))
        return
    conn.send(Ready(os.getpid()))
    while True:
        if not conn.poll(_PARENT_CHECK_S):
            if os.getppid() != parent:
                return  # the job was killed: nothing to answer to
            continue
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        rows = tagger.run(task.items)
        try:
            conn.send(Done(task.id, rows))
        except OSError:  # the job is gone (killed): nobody to answer
            return
