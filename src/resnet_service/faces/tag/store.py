"""The job's output folder: parts committed by atomic rename, a small commit log, and the
index of what is committed.

A part is written to a dot-file, flushed to disk, then renamed to ``part-NNNNNN.<ext>``: a
part is there whole or not at all, so a crash loses at most the rows not yet committed. The
parts present are the truth; ``_commits.jsonl`` says when each was committed (a part renamed
just before a crash and missing from the log is added to it at the next start). An input
re-tagged because it changed gets a row in a newer part; ``compact`` then drops its older row,
so every path is in the output once (a crash between the two is repaired at the next start).

Hand-written rather than Ray Data's or pyarrow's dataset writers: neither knows which rows are
already committed, which is what resume and the nightly run are made of.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from resnet_service.faces.tag.rows import (
    RETRIED_CODES,
    ModelStamp,
    TagRow,
    identity_key,
    path_key,
)

Format = Literal["parquet", "jsonl"]
JOB_FILE: Final = "_job.json"
COMMIT_LOG: Final = "_commits.jsonl"
_PART: Final = re.compile(r"^part-(\d{6})\.(parquet|jsonl)$")
#: Read back from a part to know what it holds.
_KEY_COLUMNS: Final = ["path", "size", "source_version", "error"]


def schema(embed: bool) -> pa.Schema:
    """The output's columns (``embedding`` only when asked for)."""
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("size", pa.int64()),
        pa.field("source_version", pa.string(), nullable=False),
        pa.field(
            "predictions",
            pa.list_(
                pa.struct(
                    [
                        pa.field("label", pa.string()),
                        pa.field("index", pa.int32()),
                        pa.field("score", pa.float64()),
                    ]
                )
            ),
        ),
        pa.field(
            "tags",
            pa.list_(pa.struct([pa.field("name", pa.string()), pa.field("score", pa.float64())])),
        ),
        pa.field(
            "error", pa.struct([pa.field("code", pa.string()), pa.field("detail", pa.string())])
        ),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("model", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("runtime", pa.string()),
        pa.field("precision", pa.string()),
        pa.field("weights_sha256", pa.string()),
        pa.field("tagged_at", pa.timestamp("ms", tz="UTC")),
    ]
    if embed:
        fields.append(pa.field("embedding", pa.list_(pa.float32())))
    return pa.schema(fields)


def to_table(rows: list[TagRow], stamp: ModelStamp, embed: bool, tagged_at: int) -> pa.Table:
    """Rows -> an Arrow table of ``schema(embed)``; ``tagged_at`` in ms since the epoch."""
    n = len(rows)
    columns: dict[str, list[object]] = {
        "path": [r.path for r in rows],
        "size": [r.size for r in rows],
        "source_version": [r.source_version for r in rows],
        "predictions": [
            None
            if r.error is not None
            else [{"label": p.label, "index": p.index, "score": p.score} for p in r.predictions]
            for r in rows
        ],
        "tags": [
            None if r.error is not None else [{"name": n, "score": v} for n, v in r.tags]
            for r in rows
        ],
        "error": [
            None if r.error is None else {"code": r.error.code, "detail": r.error.detail}
            for r in rows
        ],
        "width": [r.width for r in rows],
        "height": [r.height for r in rows],
        "model": [stamp.name] * n,
        "model_version": [stamp.version] * n,
        "runtime": [stamp.runtime] * n,
        "precision": [stamp.precision] * n,
        "weights_sha256": [stamp.weights_sha256] * n,
        "tagged_at": [tagged_at] * n,
    }
    if embed:
        columns["embedding"] = [None if r.embedding is None else r.embedding.tolist() for r in rows]
    return pa.Table.from_pydict(columns, schema=schema(embed))


class PendingRows:
    """Rows back from the workers (local or Ray), committed as one part every ``every_rows``
    rows or ``every_s`` seconds, whichever comes first: a crash re-does at most that much."""

    def __init__(self, store: OutputStore, every_rows: int, every_s: float) -> None:
        self.store = store
        self.every_rows = every_rows
        self.every_s = every_s
        self._tables: list[pa.Table] = []
        self._rows = 0
        self._last = time.monotonic()

    def add(self, table: pa.Table) -> None:
        self._tables.append(table)
        self._rows += table.num_rows

    def commit_if_due(self, force: bool = False) -> int:
        """Commit what is pending when it is due (or ``force``); the rows committed."""
        due = time.monotonic() - self._last >= self.every_s
        if not self._tables or not (force or due or self._rows >= self.every_rows):
            return 0
        self.store.commit_table(pa.concat_tables(self._tables))
        committed, self._tables, self._rows = self._rows, [], 0
        self._last = time.monotonic()
        return committed


class OutputUnwritable(Exception):
    """A part could not be written (a full or read-only disk, the folder gone): the job stops;
    what was committed before stays, and a rerun resumes from it."""


class OutputConflict(Exception):
    """The output folder holds another job's results (another model, format or columns)."""


@dataclass(frozen=True, slots=True)
class JobRecord:
    """What an output folder was made by (``_job.json``)."""

    model: ModelStamp
    format: Format
    embed: bool
    top_k: int


@dataclass(frozen=True, slots=True)
class Committed:
    """What the output holds, as 64-bit keys sorted by path key (16 bytes a row)."""

    paths: npt.NDArray[np.uint64]
    identities: npt.NDArray[np.uint64]

    def __len__(self) -> int:
        return len(self.paths)

    def has(self, path: str, size: int | None, version: str) -> bool:
        """The input is committed as it is now (same size and version)."""
        key = np.uint64(path_key(path))
        at = int(np.searchsorted(self.paths, key))
        return (
            at < len(self.paths)
            and self.paths[at] == key
            and self.identities[at] == np.uint64(identity_key(size, version))
        )


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class OutputStore:
    """One output folder of Parquet (or JSON-lines) parts."""

    def __init__(self, root: Path, record: JobRecord) -> None:
        self.root = root
        self.record = record
        self.schema = schema(record.embed)
        self.suffix = "parquet" if record.format == "parquet" else "jsonl"
        self._next = 0
        self.parts_written = 0
        #: Parts the output held when this run opened it.
        self.parts_before = 0

    # --- opening ---------------------------------------------------------------------------
    def open(self, overwrite: bool = False, allow_model_change: bool = False) -> Committed:
        """Make the folder ready: start afresh, or check it is this job's and repair what a
        crash left (temporary files, a log line, a superseded row). Returns the committed."""
        if overwrite and self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        existing = self._read_record()
        if existing is not None:
            self._check(existing, allow_model_change)
        for leftover in self.root.glob(".part-*"):
            leftover.unlink()
        _write_json_atomic(self.root / JOB_FILE, _record_json(self.record))
        self._reconcile_log()
        self.compact()
        parts = self.parts()
        self.parts_before = len(parts)
        self._next = max((seq for seq, _ in parts), default=0) + 1
        return self.committed()

    def _read_record(self) -> dict[str, object] | None:
        path = self.root / JOB_FILE
        if not path.exists():
            if any(self.root.iterdir()):
                raise OutputConflict(
                    f"{self.root} is not empty and holds no {JOB_FILE}: not a tag job's output "
                    "(give an empty or new folder, or --overwrite to replace it)"
                )
            return None
        loaded: dict[str, object] = json.loads(path.read_text(encoding="utf-8"))
        return loaded

    def _check(self, existing: dict[str, object], allow_model_change: bool) -> None:
        mine = _record_json(self.record)
        for key in ("format", "embed"):
            if existing.get(key) != mine[key]:
                raise OutputConflict(
                    f"{self.root} holds {key}={existing.get(key)} output; this run asks for "
                    f"{key}={mine[key]} (use another folder, or --overwrite to start afresh)"
                )
        if existing.get("model") != mine["model"] and not allow_model_change:
            raise OutputConflict(
                f"{self.root} holds results of another model ({_describe(existing['model'])}); "
                f"this run uses {_describe(mine['model'])}. Use another folder, --overwrite to "
                "start afresh, or --allow-model-change to add this model's rows beside them"
            )

    # --- parts -----------------------------------------------------------------------------
    def parts(self) -> list[tuple[int, Path]]:
        """Committed parts, oldest first."""
        found = []
        for path in self.root.iterdir():
            match = _PART.match(path.name)
            if match and match.group(2) == self.suffix:
                found.append((int(match.group(1)), path))
        return sorted(found)

    def read(self, path: Path, columns: list[str]) -> pa.Table:
        """``columns`` of one part."""
        if self.suffix == "parquet":
            return pq.read_table(path, columns=columns, schema=self.schema)
        wanted = pa.schema([self.schema.field(name) for name in columns])
        options = pa_json.ParseOptions(explicit_schema=wanted, unexpected_field_behavior="ignore")
        return pa_json.read_json(path, parse_options=options).select(columns)

    def table(self, rows: list[TagRow]) -> pa.Table:
        """``rows`` as a table of this output, stamped with its model and the time."""
        return to_table(rows, self.record.model, self.record.embed, int(time.time() * 1000))

    def commit(self, rows: list[TagRow]) -> Path:
        """Write ``rows`` as the next part, atomically; then log it."""
        return self.commit_table(self.table(rows))

    def commit_table(self, table: pa.Table) -> Path:
        """Write a table of this output's schema as the next part, atomically; then log it."""
        table = table.cast(self.schema)
        name = f"part-{self._next:06d}.{self.suffix}"
        self._next += 1
        try:
            self._write(table, self.root / name)
            errors = table.num_rows - table.column("error").null_count
            self._log(name, table.num_rows, errors)
        except OSError as exc:
            raise OutputUnwritable(
                f"cannot write {self.root / name}: {exc.strerror or exc}; the parts committed "
                "before are kept, and the same command resumes once the folder is writable"
            ) from exc
        self.parts_written += 1
        return self.root / name

    def _write(self, table: pa.Table, final: Path) -> None:
        tmp = final.with_name(f".{final.name}.tmp")
        if self.suffix == "parquet":
            with tmp.open("wb") as f:
                pq.write_table(table, f, compression="zstd")
                f.flush()
                os.fsync(f.fileno())
        else:
            lines = []
            for row in table.to_pylist():
                row["tagged_at"] = row["tagged_at"].strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
                lines.append(json.dumps(row, ensure_ascii=False) + "\n")
            self._write_lines(lines, tmp)
        os.replace(tmp, final)
        _fsync_dir(self.root)

    @staticmethod
    def _write_lines(lines: list[str], tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())

    def _rewrite_keeping(self, path: Path, keep: list[bool]) -> int:
        """Rewrite a part with only the rows ``keep`` marks (atomically); the rows left."""
        kept = sum(keep)
        if kept == 0:
            path.unlink()
            _fsync_dir(self.root)
            return 0
        tmp = path.with_name(f".{path.name}.tmp")
        if self.suffix == "parquet":
            table = pq.read_table(path, schema=self.schema).filter(pa.array(keep))
            with tmp.open("wb") as f:
                pq.write_table(table, f, compression="zstd")
                f.flush()
                os.fsync(f.fileno())
        else:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            self._write_lines([line for line, k in zip(lines, keep, strict=True) if k], tmp)
        os.replace(tmp, path)
        _fsync_dir(self.root)
        return kept

    def _log(self, part: str, rows: int, errors: int, **extra: object) -> None:
        line = {"part": part, "rows": rows, "errors": errors, "at": time.time(), **extra}
        path = self.root / COMMIT_LOG
        with path.open("a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a line cut by a crash: end it, or this one joins it
                    f.write(b"\n")
            f.write((json.dumps(line) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    def _logged(self) -> set[str]:
        path = self.root / COMMIT_LOG
        if not path.exists():
            return set()
        names = set()
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                names.add(str(json.loads(line)["part"]))
            except (ValueError, KeyError):
                continue  # a line cut by a crash mid-write: its part is re-logged below
        return names

    def _reconcile_log(self) -> None:
        """A part renamed into place just before a crash has no log line yet: add it."""
        logged = self._logged()
        for _, path in self.parts():
            if path.name not in logged:
                table = self.read(path, ["error"])
                errors = table.num_rows - table.column("error").null_count
                self._log(path.name, table.num_rows, errors, recovered=True)

    # --- what is committed -------------------------------------------------------------------
    def _keys(self) -> Iterator[tuple[int, Path, pa.Table]]:
        for seq, path in self.parts():
            yield seq, path, self.read(path, _KEY_COLUMNS)

    def compact(self) -> int:
        """Keep each path's newest row only (a changed input re-tagged by a later part);
        returns the rows dropped. Each rewrite is atomic, so a crash here is repaired by the
        next call."""
        keys: list[int] = []
        seqs: list[int] = []
        for seq, _, table in self._keys():
            keys.extend(path_key(p) for p in table.column("path").to_pylist())
            seqs.extend([seq] * table.num_rows)
        if not keys:
            return 0
        key_array = np.array(keys, dtype=np.uint64)
        seq_array = np.array(seqs, dtype=np.int64)
        unique, counts = np.unique(key_array, return_counts=True)
        repeated = unique[counts > 1]
        if len(repeated) == 0:
            return 0
        repeated_keys = set(repeated.tolist())
        newest: dict[int, int] = {}
        for key, seq in zip(key_array.tolist(), seq_array.tolist(), strict=True):
            if key in repeated_keys and seq > newest.get(key, -1):
                newest[key] = seq
        dropped = 0
        for seq, path in self.parts():
            paths = self.read(path, ["path"]).column("path").to_pylist()
            keep = [newest.get(path_key(p), seq) == seq for p in paths]
            if all(keep):
                continue
            dropped += keep.count(False)
            left = self._rewrite_keeping(path, keep)
            self._log(path.name, left, 0, compacted=keep.count(False))
        return dropped

    def committed(self) -> Committed:
        """The index of committed inputs; rows whose error may pass on a retry (a file that
        could not be read) are left out, so the next run tries them again."""
        paths: list[int] = []
        identities: list[int] = []
        for _, _, table in self._keys():
            errors = table.column("error").to_pylist()
            for path, size, version, error in zip(
                table.column("path").to_pylist(),
                table.column("size").to_pylist(),
                table.column("source_version").to_pylist(),
                errors,
                strict=True,
            ):
                if error is not None and error["code"] in RETRIED_CODES:
                    continue
                paths.append(path_key(path))
                identities.append(identity_key(size, version))
        order = np.argsort(np.array(paths, dtype=np.uint64), kind="stable")
        return Committed(
            np.array(paths, dtype=np.uint64)[order], np.array(identities, dtype=np.uint64)[order]
        )


def _record_json(record: JobRecord) -> dict[str, object]:
    return {
        "model": asdict(record.model),
        "format": record.format,
        "embed": record.embed,
        "top_k": record.top_k,
    }


def _describe(model: object) -> str:
    if not isinstance(model, dict):
        return str(model)
    return (
        f"{model.get('name')} version {model.get('version')}, {model.get('runtime')} "
        f"{model.get('precision')}, weights {str(model.get('weights_sha256'))[:12]}"
    )
