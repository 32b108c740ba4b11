"""The tag job's listing and output folder on real files: what is listed, what is committed,
what a crash leaves and how the next start repairs it, which outputs are refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resnet_service.faces.tag.rows import Label, ModelStamp, RowError, TagRow
from resnet_service.faces.tag.sources import Item, listing, local_item
from resnet_service.faces.tag.store import COMMIT_LOG, JobRecord, OutputConflict, OutputStore
from resnet_service.faces.tag.worker import Tagger, WorkerSpec, read_bytes

STAMP = ModelStamp("m", "1", "openvino", "int8", "a" * 64)


def record(**changes: object) -> JobRecord:
    fields: dict[str, object] = {"model": STAMP, "format": "parquet", "embed": False, "top_k": 5}
    fields.update(changes)
    return JobRecord(**fields)  # type: ignore[arg-type]


def row(path: str, size: int = 10, version: str = "1", error: str | None = None) -> TagRow:
    if error:
        return TagRow(path, size, version, error=RowError(error, "why"))
    return TagRow(path, size, version, [Label("cat", 3, 0.5)], width=4, height=3)


def all_paths(store: OutputStore) -> list[str]:
    return sorted(
        p for _, part in store.parts() for p in store.read(part, ["path"])["path"].to_pylist()
    )


# --- listing --------------------------------------------------------------------------------
def test_a_folder_is_walked_in_name_order_without_entering_symlinked_folders(
    tmp_path: Path,
) -> None:
    (tmp_path / "b" / "c").mkdir(parents=True)
    for name in ("b/c/2.jpg", "b/1.jpg", "a.jpg"):
        (tmp_path / name).write_bytes(b"x" * 3)
    os.symlink(tmp_path / "b", tmp_path / "b" / "c" / "back")  # a loop if followed
    listed = [Path(i.path).relative_to(tmp_path).as_posix() for i in listing([str(tmp_path)])]
    assert listed == ["a.jpg", "b/1.jpg", "b/c/2.jpg", "b/c/back"]
    back = local_item(str(tmp_path / "b" / "c" / "back"))
    assert back.error is not None
    assert back.error.code == "unreadable_file"
    first = local_item(str(tmp_path / "a.jpg"))
    assert first.size == 3
    assert first.source_version == str(os.stat(tmp_path / "a.jpg").st_mtime_ns)


def test_globs_and_manifests_of_every_kind(tmp_path: Path) -> None:
    for name in ("x.jpg", "y.jpg", "z.png"):
        (tmp_path / name).write_bytes(b"1")
    text = tmp_path / "list.txt"
    text.write_text("# a comment\nx.jpg\n\n" + str(tmp_path / "y.jpg") + "\n")
    csv = tmp_path / "list.csv"
    csv.write_text("key,other\nz.png,1\n")
    parquet = tmp_path / "list.parquet"
    pq.write_table(pa.table({"key": ["x.jpg", None]}), parquet)
    assert [Path(i.path).name for i in listing([str(tmp_path / "*.jpg")])] in (
        ["x.jpg", "y.jpg"],
        ["y.jpg", "x.jpg"],
    )
    assert [Path(i.path).name for i in listing([], [text])] == ["x.jpg", "y.jpg"]
    assert [Path(i.path).name for i in listing([], [csv, parquet], "key")] == ["z.png", "x.jpg"]
    with pytest.raises(ValueError, match="no column 'path'"):
        list(listing([], [csv]))


def test_a_file_that_vanished_after_listing_is_an_unreadable_row(tmp_path: Path) -> None:
    path = tmp_path / "gone.jpg"
    path.write_bytes(b"12345")
    item = local_item(str(path))
    path.unlink()
    with pytest.raises(Exception, match="cannot read") as caught:
        read_bytes(item, 100)
    assert getattr(caught.value, "code", None) == "unreadable_file"
    too_big = Item("big.jpg", str(path), 10_000, "1")
    with pytest.raises(Exception, match="limit") as caught:
        read_bytes(too_big, 100)  # refused from the listed size, never read
    assert getattr(caught.value, "code", None) == "upload_too_large"


def test_tagger_gives_one_row_per_input_in_order(int8_model: object, tmp_path: Path) -> None:
    from resnet_service.config import load_settings
    from tests.harness import jpeg_of

    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg_of("coffee"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    spec = WorkerSpec(load_settings(), None, 3, True)
    tagger = Tagger(int8_model, spec)  # type: ignore[arg-type]
    items = [local_item(str(p)) for p in (good, bad, good)]
    rows = tagger.run(items)
    assert [r.path for r in rows] == [i.path for i in items]
    assert rows[1].error is not None
    assert rows[1].error.code == "undecodable_image"
    assert rows[0].predictions == rows[2].predictions
    assert len(rows[0].predictions) == 3
    assert rows[0].embedding is not None
    assert abs(float(np.linalg.norm(rows[0].embedding)) - 1) < 1e-5


# --- the output folder ---------------------------------------------------------------------
def test_commits_are_whole_parts_and_the_index_knows_them(tmp_path: Path) -> None:
    store = OutputStore(tmp_path / "out", record())
    assert len(store.open()) == 0
    store.commit([row("a"), row("b", error="undecodable_image"), row("c", error="unreadable_file")])
    committed = OutputStore(tmp_path / "out", record()).open()
    assert committed.has("a", 10, "1")
    assert not committed.has("a", 11, "1")  # changed size: tagged again
    assert not committed.has("a", 10, "2")  # changed mtime or ETag
    assert committed.has("b", 10, "1")  # an undecodable file stays undecodable
    assert not committed.has("c", 10, "1")  # an unreadable one is tried again
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left


def test_a_crash_between_rename_and_log_and_a_half_written_part_are_repaired(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    store = OutputStore(out, record())
    store.open()
    store.commit([row("a")])
    store.commit([row("b")])
    log = (out / COMMIT_LOG).read_text().splitlines()
    (out / COMMIT_LOG).write_text(log[0] + "\n" + log[1][:10])  # the last line cut mid-write
    (out / ".part-000003.parquet.tmp").write_bytes(b"PAR1 half")
    reopened = OutputStore(out, record())
    committed = reopened.open()
    assert committed.has("b", 10, "1")
    assert not (out / ".part-000003.parquet.tmp").exists()
    logged = [json.loads(x) for x in (out / COMMIT_LOG).read_text().splitlines()[2:]]
    assert logged[0]["part"] == "part-000002.parquet"
    assert logged[0]["recovered"]
    assert reopened.commit([row("c")]).name == "part-000003.parquet"


def test_compaction_keeps_the_newest_row_of_each_path(tmp_path: Path) -> None:
    store = OutputStore(tmp_path / "out", record(format="jsonl"))
    store.open()
    store.commit([row("a"), row("b")])
    store.commit([row("a", size=20, version="2")])  # a changed before the second run
    store.commit([row("b", size=30, version="3")])
    assert store.compact() == 2
    assert all_paths(store) == ["a", "b"]
    committed = store.committed()
    assert committed.has("a", 20, "2")
    assert committed.has("b", 30, "3")
    assert [seq for seq, _ in store.parts()] == [2, 3]  # the first part lost both rows
    assert store.compact() == 0


def test_another_model_format_or_folder_is_refused_unless_told(tmp_path: Path) -> None:
    out = tmp_path / "out"
    OutputStore(out, record()).open()
    other = ModelStamp("m", "2", "openvino", "int8", "b" * 64)
    with pytest.raises(OutputConflict, match=r"another model.*--allow-model-change"):
        OutputStore(out, record(model=other)).open()
    OutputStore(out, record(model=other)).open(allow_model_change=True)
    with pytest.raises(OutputConflict, match="embed=False"):
        OutputStore(out, record(model=other, embed=True)).open()
    OutputStore(out, record(embed=True)).open(overwrite=True)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.md").write_text("mine")
    with pytest.raises(OutputConflict, match="not a tag job's output"):
        OutputStore(stranger, record()).open()
