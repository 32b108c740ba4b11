"""``resnet-service tag SOURCE... --out DEST``: its flags, the run, the progress bar and the
summary (a few lines for a person on stderr, one JSON line for scripts on stdout).

Exit status: 0 when every input was tagged, 3 when the job completed with error rows, 1 when
the job itself failed (nothing committed is lost: a rerun resumes), 2 when the command was
given nothing to read (a missing folder or manifest), 128 + the signal when
SIGINT or SIGTERM stopped it after committing what was done.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Protocol

from resnet_service.config import Settings
from resnet_service.core.errors import ModelNotFound
from resnet_service.cpus import usable_cpus
from resnet_service.faces.tag.job import (
    JobFailed,
    JobOptions,
    Progress,
    TagJob,
    install_stop_handlers,
)
from resnet_service.faces.tag.rows import ModelStamp
from resnet_service.faces.tag.sources import Item, check_sources, listing
from resnet_service.faces.tag.store import (
    Committed,
    JobRecord,
    OutputConflict,
    OutputStore,
    OutputUnwritable,
)
from resnet_service.faces.tag.worker import WorkerSpec

log = logging.getLogger("resnet_service.tag")

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_WITH_ERRORS: Final = 3


@dataclass(slots=True)
class Summary:
    """The end of a run, as the JSON line says it."""

    status: str
    exit_code: int
    listed: int
    skipped: int
    tagged: int
    error_rows: int
    errors_by_code: dict[str, int]
    seconds: float
    #: Loading the model in the workers (before the first image).
    startup_s: float
    #: Inputs done per second once the workers were ready.
    images_per_s: float
    out: str
    parts_written: int
    model: dict[str, str] = field(default_factory=dict)
    worker_restarts: int = 0
    reason: str | None = None


def _model_settings(args: argparse.Namespace, settings: Settings) -> tuple[Settings, str]:
    """The settings of the model to use (a repository's version, or the model flags) and its
    version as rows name it."""
    if args.repository is None:
        if args.model_name is not None:
            raise ModelNotFound("--model names a model of a --repository; give --repository too")
        return settings, "1"
    from resnet_service.model.repository_layout import read_model, version_settings

    if args.model_name is None:
        raise ModelNotFound("--repository needs --model NAME (the model folder to use)")
    folder = args.repository / args.model_name
    if not folder.is_dir():
        raise ModelNotFound(f"no model named {args.model_name!r} in {args.repository}")
    model = read_model(folder)
    versions = {v.version: v for v in model.versions}
    if args.model_version is not None:
        version = versions.get(args.model_version)
        if version is None:
            raise ModelNotFound(
                f"{args.model_name} has no version {args.model_version} "
                f"(it has {sorted(versions) or 'none'})"
            )
    else:
        wanted = model.wanted()
        if not wanted:
            raise ModelNotFound(f"{args.model_name} has no version to use ({model.problem})")
        version = wanted[0]
    return version_settings(settings, model, version), str(version.version)


class _Bar:
    """A tqdm bar on stderr (only on a terminal and without --no-progress)."""

    def __init__(self, enabled: bool) -> None:
        self.bar: Any = None
        self._last = 0.0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=None, unit="img", dynamic_ncols=True, file=sys.stderr)

    def update(self, progress: Progress) -> None:
        now = time.monotonic()
        if self.bar is None or now - self._last < 0.2:
            return
        self._last = now
        if progress.listing_done:
            self.bar.total = progress.listed - progress.skipped
        self.bar.n = progress.done
        self.bar.set_postfix(errors=progress.error_rows, skipped=progress.skipped, refresh=False)
        self.bar.refresh()

    def close(self, progress: Progress) -> None:
        if self.bar is not None:
            self._last = 0.0
            self.update(progress)
            self.bar.close()


def cmd_tag(args: argparse.Namespace, settings: Settings) -> int:
    """Tag every input of the sources into ``--out``; see the module docstring for the exit."""
    from resnet_service.model.served import prepare

    if not args.sources and not args.manifest:
        print("resnet-service tag: give at least one SOURCE or --manifest", file=sys.stderr)
        return EXIT_USAGE
    try:
        check_sources(args.sources, args.manifest)
    except FileNotFoundError as exc:
        print(f"resnet-service tag: {exc}", file=sys.stderr)
        return EXIT_USAGE
    settings, version = _model_settings(args, settings)
    prepared = prepare(settings)  # builds once here; the workers only load
    stamp = ModelStamp(
        prepared.name, version, prepared.runtime, prepared.precision, prepared.weights_sha256
    )
    top_k = args.top_k or settings.default_top_k
    record = JobRecord(stamp, args.format, args.embed, top_k)
    store = OutputStore(args.out, record)
    started = time.monotonic()
    try:
        committed = store.open(args.overwrite, args.allow_model_change)
    except OutputConflict as exc:
        print(f"resnet-service tag: {exc}", file=sys.stderr)
        return EXIT_FAILED
    spec = WorkerSpec(
        settings.model_copy(update={"runtime": prepared.runtime}),
        prepared.artifact,
        top_k,
        args.embed,
    )
    bar = _Bar(not args.no_progress and sys.stderr.isatty())
    job = _runner(args, spec, stamp, store, bar)
    undo = install_stop_handlers(job.request_stop)
    reason = None
    try:
        progress = job.run(listing(args.sources, args.manifest, args.column), committed)
    except (JobFailed, OutputUnwritable) as exc:  # nothing committed is lost either way
        reason = str(exc)
        progress = job.progress
    finally:
        undo()
        bar.close(job.progress)
    if reason is None and store.parts_before and store.parts_written:
        store.compact()  # inputs re-tagged (changed, or retried) replace their older rows
    summary = _summary(job, progress, stamp, store, started, reason, args.error_rows_ok)
    _report(summary)
    return summary.exit_code


class Runner(Protocol):
    """What runs the inputs: the local job (worker processes) or the Ray one."""

    progress: Progress
    stopped_by: int | None

    def request_stop(self, signum: int) -> None: ...

    def run(self, items: Iterator[Item], committed: Committed) -> Progress: ...


def _runner(
    args: argparse.Namespace, spec: WorkerSpec, stamp: ModelStamp, store: OutputStore, bar: _Bar
) -> Runner:
    if args.ray:
        from resnet_service.faces.tag.on_ray import RayJob, RayOptions

        ray_options = RayOptions(
            address=args.ray,
            actors=args.processes,
            commit_rows=args.commit_rows,
            commit_interval_s=args.commit_every,
        )
        return RayJob(spec, stamp, store, ray_options, on_progress=bar.update)
    options = JobOptions(
        processes=args.processes or usable_cpus(),
        commit_rows=args.commit_rows,
        commit_interval_s=args.commit_every,
    )
    return TagJob(spec, store, options, on_progress=bar.update)


def _summary(
    job: Runner,
    progress: Progress,
    stamp: ModelStamp,
    store: OutputStore,
    started: float,
    reason: str | None,
    error_rows_ok: bool = False,
) -> Summary:
    ended = time.monotonic()
    ready = progress.workers_ready_at or ended
    working = ended - ready
    if reason is not None:
        status, code = "failed", EXIT_FAILED
    elif job.stopped_by is not None:
        status, code = "interrupted", 128 + job.stopped_by
    elif progress.error_rows:
        status, code = "completed_with_errors", EXIT_OK if error_rows_ok else EXIT_WITH_ERRORS
    else:
        status, code = "completed", EXIT_OK
    return Summary(
        status=status,
        exit_code=code,
        listed=progress.listed,
        skipped=progress.skipped,
        tagged=progress.done - progress.error_rows,
        error_rows=progress.error_rows,
        errors_by_code=dict(sorted(progress.errors.items())),
        seconds=round(ended - started, 2),
        startup_s=round(ready - started, 2),
        images_per_s=round(progress.done / working, 1) if working > 0 else 0.0,
        out=str(store.root),
        parts_written=store.parts_written,
        model=asdict(stamp),
        worker_restarts=progress.worker_restarts,
        reason=reason,
    )


def _report(summary: Summary) -> None:
    """A few lines for a person (stderr), then one JSON line for scripts (stdout)."""
    errors = ", ".join(f"{code} {n}" for code, n in summary.errors_by_code.items()) or "none"
    lines = [
        f"tag: {summary.status}: {summary.tagged} tagged, {summary.error_rows} error rows "
        f"({errors}), {summary.skipped} already done, of {summary.listed} listed",
        f"tag: {summary.images_per_s} images/s ({summary.seconds} s, {summary.startup_s} s of "
        f"them loading the model); output: {summary.out} "
        f"({summary.parts_written} new parts)",
    ]
    if summary.reason:
        lines.append(f"tag: the job failed: {summary.reason}; rerun the same command to resume")
    elif summary.status == "interrupted":
        lines.append("tag: stopped by a signal after committing; rerun the same command to resume")
    print("\n".join(lines), file=sys.stderr)
    sys.stdout.write(json.dumps(asdict(summary), ensure_ascii=False) + "\n")
    sys.stdout.flush()
