"""The job's inputs as a stream: directories (recursive), globs, manifests and fsspec URIs.

Listing is a generator, so the first images are tagged while it goes on and memory never
holds the library. A directory walk never follows a symlinked directory (no loops); a
symlinked file is followed when read, and one that cannot be (a loop, a dangling link) is an
error row, not a stop. Names that are not UTF-8 are written with their undecodable bytes as
``\\xNN`` escapes (Arrow strings are UTF-8), the same every run, so resume still matches them.
"""

from __future__ import annotations

import csv
import glob
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from resnet_service.faces.tag.rows import UNREADABLE, RowError

_GLOB_CHARS: Final = frozenset("*?[")


@dataclass(frozen=True, slots=True)
class Item:
    """One input as listed: ``path`` is what the output says, ``location`` what is opened (a
    local path, possibly with undecodable bytes as surrogates, or a URI)."""

    path: str
    location: str
    size: int | None
    source_version: str
    #: Set when the listing itself could not stat the input (it becomes an error row).
    error: RowError | None = None


def display(path: str) -> str:
    """A local path as valid UTF-8 (undecodable bytes as ``\\xNN``), stable across runs."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_uri(source: str) -> bool:
    return "://" in source


def _unreadable(path: str, location: str, exc: OSError) -> Item:
    reason = exc.strerror or type(exc).__name__
    detail = f"cannot read {display(path)}: {reason}"
    return Item(display(path), location, None, "", RowError(UNREADABLE, detail))


def local_item(path: str) -> Item:
    """A local file as an input, stat'ed (following a symlink: a loop is an error row)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return _unreadable(path, path, exc)
    if not stat.S_ISREG(st.st_mode):
        return Item(
            display(path),
            path,
            None,
            "",
            RowError(UNREADABLE, f"{display(path)} is not a regular file"),
        )
    return Item(display(path), path, st.st_size, str(st.st_mtime_ns))


def walk(root: str) -> Iterator[Item]:
    """Every file under ``root`` in name order, depth first; symlinked folders not entered."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                listed = sorted(entries, key=lambda e: e.name)
        except OSError as exc:
            yield _unreadable(folder, folder, exc)
            continue
        subfolders = []
        for entry in listed:
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                subfolders.append(entry.path)
            else:
                yield local_item(entry.path)
        stack.extend(reversed(subfolders))


def _local(source: str) -> Iterator[Item]:
    if os.path.isdir(source):
        yield from walk(source)
    elif any(c in source for c in _GLOB_CHARS) and not os.path.lexists(source):
        for match in glob.iglob(source, recursive=True):
            yield from (walk(match) if os.path.isdir(match) else [local_item(match)])
    else:
        yield local_item(source)


def _uri_item(fs: Any, info: dict[str, Any], protocol: str) -> Item:
    name = str(info["name"])
    uri = name if "://" in name else f"{protocol}://{name}"
    etag = info.get("ETag") or info.get("etag")
    if etag:
        version = str(etag).strip('"')
    else:
        modified = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
        version = str(modified or "")
    size = info.get("size")
    return Item(uri, uri, int(size) if size is not None else None, version)


def _uri(source: str) -> Iterator[Item]:
    """Objects under a URI (``s3://bucket/prefix``, ``file://``, ``memory://``) via fsspec;
    endpoints and credentials come from the usual environment (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, ``FSSPEC_S3_*``)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(source)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if fs.isdir(root):
        for folder, _dirs, files in fs.walk(root, detail=True):
            del folder
            for name in sorted(files):
                info = files[name]
                if info.get("type", "file") == "file":
                    yield _uri_item(fs, info, protocol)
    else:
        try:
            yield _uri_item(fs, fs.info(root), protocol)
        except FileNotFoundError as exc:
            yield Item(source, source, None, "", RowError(UNREADABLE, f"{source}: {exc}"))


def manifest_entries(manifest: Path, column: str) -> Iterator[str]:
    """The paths or URIs a manifest names, streamed: Parquet and CSV by ``column``, any other
    file one a line (blank lines and ``#`` comments skipped)."""
    suffix = manifest.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(manifest)
        if column not in parquet.schema_arrow.names:
            raise ValueError(f"{manifest} has no column {column!r} (--column names it)")
        for batch in parquet.iter_batches(columns=[column], batch_size=4096):
            yield from (str(v) for v in batch.column(0).to_pylist() if v)
    elif suffix == ".csv":
        with manifest.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if column not in (reader.fieldnames or []):
                raise ValueError(f"{manifest} has no column {column!r} (--column names it)")
            yield from (row[column] for row in reader if row[column])
    else:
        with manifest.open(encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                entry = line.rstrip("\n")
                if entry.strip() and not entry.lstrip().startswith("#"):
                    yield entry


def _from_manifest(manifest: Path, column: str) -> Iterator[Item]:
    """Relative paths in a manifest are read from the manifest's folder, so the same command
    works from any working directory."""
    for entry in manifest_entries(manifest, column):
        if is_uri(entry):
            yield from _uri(entry)
        else:
            yield local_item(entry if os.path.isabs(entry) else str(manifest.parent / entry))


def listing(
    sources: Iterable[str], manifests: Iterable[Path] = (), column: str = "path"
) -> Iterator[Item]:
    """Every input of the job, in the order given (each source walked in name order)."""
    for source in sources:
        yield from (_uri(source) if is_uri(source) else _local(source))
    for manifest in manifests:
        yield from _from_manifest(manifest, column)


def check_sources(sources: Iterable[str], manifests: Iterable[Path]) -> None:
    """Refuse up front what cannot be a source at all (a missing folder or manifest)."""
    for source in sources:
        if is_uri(source) or any(c in source for c in _GLOB_CHARS):
            continue
        if not os.path.lexists(source):
            raise FileNotFoundError(f"no such file or folder: {source}")
    for manifest in manifests:  # a named pipe is fine: a manifest is read as a stream
        if not manifest.exists() or manifest.is_dir():
            raise FileNotFoundError(f"no such manifest file: {manifest}")
