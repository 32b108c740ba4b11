"""The tag job on an existing Ray cluster, through Ray Data (``tag --ray ADDRESS``).

The driver (this process) lists the sources and skips what is committed exactly as the local
job does, and commits what comes back with the same store: resume, exactly-once and the
nightly run are the local job's rules, not a second set. In between, Ray Data does the work:
each window of listed inputs becomes a dataset (``from_items``) mapped by an actor pool of
``RayTagger`` (one model load per actor and window, torch-free on OpenVINO / ONNX Runtime; each
actor reads its inputs' bytes itself, so bytes never pass through the driver), and the rows
stream back with ``iter_batches``. Ray places the actors, retries a task whose node died and
restarts its actors elsewhere; a row is committed only once it is back, so a lost node costs
time, never a row.

The actor pool is sized to the cluster's CPUs: the pipeline has no read tasks to starve (the
inputs come from the driver as ``from_items`` blocks; each actor reads its files itself), so
every CPU can hold an actor. A pipeline that reads with Ray tasks (``read_binary_files``) would
need CPUs kept for them, or the actor pool that takes them all stalls it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import pyarrow as pa

from resnet_service.faces.tag.job import JobFailed, Progress, to_tag
from resnet_service.faces.tag.rows import ModelStamp, RowError
from resnet_service.faces.tag.sources import Item
from resnet_service.faces.tag.store import (
    Committed,
    OutputStore,
    OutputUnwritable,
    PendingRows,
    to_table,
)
from resnet_service.faces.tag.worker import Tagger, WorkerSpec, open_model

log = logging.getLogger(__name__)

#: Inputs per Ray dataset: the driver holds this many listed inputs at a time, and each
#: actor loads the model once per window (~1 s against minutes of work).
WINDOW: Final = 8192
#: Inputs per ``map_batches`` call of an actor (8 forwards of 8): at 16, Ray's per-call cost
#: held a 2-CPU cluster to 59 img/s against 101 at 64 (1,500 JPEGs of 500x375).
ACTOR_BATCH: Final = 64


@dataclass(frozen=True, slots=True)
class RayOptions:
    address: str
    #: Actors in the pool (0: one per CPU of the cluster).
    actors: int = 0
    commit_rows: int = 1000
    commit_interval_s: float = 5.0
    window: int = WINDOW


class RayTagger:
    """The classifier as a Ray Data callable class: built once per actor, then called with
    batches of inputs (an Arrow table of the listing's columns), returning rows of the output's
    schema."""

    def __init__(self, spec: WorkerSpec, stamp: ModelStamp) -> None:
        model = open_model(spec)
        model.runtime.bind_thread()
        self.tagger = Tagger(model, spec)
        self.tagger.warm()
        self.stamp = stamp
        self.embed = spec.embed

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = self.tagger.run([_item(record) for record in batch.to_pylist()])
        return to_table(rows, self.stamp, self.embed, int(time.time() * 1000))


def _record(item: Item) -> dict[str, Any]:
    """An input as a row of the dataset (a local path's bytes kept exactly: it may not be
    UTF-8)."""
    return {
        "path": item.path,
        "location": os.fsencode(item.location)
        if "://" not in item.location
        else item.location.encode(),
        "size": item.size,
        "source_version": item.source_version,
        "error_code": item.error.code if item.error else None,
        "error_detail": item.error.detail if item.error else None,
    }


def _item(record: dict[str, Any]) -> Item:
    location = record["location"]
    error = None
    if record["error_code"] is not None:
        error = RowError(record["error_code"], record["error_detail"])
    return Item(
        record["path"],
        os.fsdecode(location) if b"://" not in location else location.decode(),
        record["size"],
        record["source_version"],
        error,
    )


def _windows(
    items: Iterator[Item],
    committed: Committed,
    progress: Progress,
    size: int,
    stop: threading.Event,
) -> Iterator[list[Item]]:
    """What is to tag (as the local job's listing has it), in windows of ``size`` inputs."""
    window: list[Item] = []
    for item in to_tag(items, committed, progress, stop):
        window.append(item)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window


class RayJob:
    """Runs the inputs through a Ray Data actor pool into the store."""

    def __init__(
        self,
        spec: WorkerSpec,
        stamp: ModelStamp,
        store: OutputStore,
        options: RayOptions,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.spec = spec
        self.stamp = stamp
        self.store = store
        self.options = options
        self.on_progress = on_progress
        self.progress = Progress()
        self.stopped_by: int | None = None
        self._stop = threading.Event()
        self._pending = PendingRows(store, options.commit_rows, options.commit_interval_s)

    def request_stop(self, signum: int) -> None:
        """Stop after the batch in hand (a signal handler calls this); what is back is
        committed."""
        self.stopped_by = signum
        self._stop.set()

    def run(self, items: Iterator[Item], committed: Committed) -> Progress:
        import ray

        ray.init(address=self.options.address, logging_level=logging.WARNING, log_to_driver=False)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            cpus = ray.cluster_resources().get("CPU", 1)  # type: ignore[no-untyped-call]
            actors = self.options.actors or max(1, int(cpus))
            self.progress.workers_ready_at = time.monotonic()
            for window in _windows(
                items, committed, self.progress, self.options.window, self._stop
            ):
                try:
                    self._tag_window(ray, window, actors)
                except OutputUnwritable:
                    raise
                except Exception as exc:  # Ray gave up on the dataset: keep what came back
                    with contextlib.suppress(OutputUnwritable):
                        self._commit(force=True)
                    raise JobFailed(f"Ray Data failed: {type(exc).__name__}: {exc}") from exc
                if self._stop.is_set():
                    break
            self._commit(force=True)
        finally:
            ray.shutdown()
        return self.progress

    def _tag_window(self, ray: Any, window: list[Item], actors: int) -> None:
        dataset = ray.data.from_items([_record(item) for item in window])
        tagged = dataset.map_batches(
            RayTagger,
            fn_constructor_args=(self.spec, self.stamp),
            batch_size=ACTOR_BATCH,
            batch_format="pyarrow",
            concurrency=actors,
            num_cpus=1,
        )
        for table in tagged.iter_batches(batch_format="pyarrow", batch_size=None):
            self._add(table)
            self._commit()
            if self.on_progress is not None:
                self.on_progress(self.progress)
            if self._stop.is_set():
                return

    def _add(self, table: pa.Table) -> None:
        self._pending.add(table)
        self.progress.done += table.num_rows
        for error in table.column("error").to_pylist():
            if error is not None:
                self.progress.errors[error["code"]] += 1

    def _commit(self, force: bool = False) -> None:
        self.progress.committed_rows += self._pending.commit_if_due(force)
