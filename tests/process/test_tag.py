"""``resnet-service tag`` as a user runs it: real processes on a library made here, its output
read back with pyarrow and DuckDB, kill -9 and SIGTERM mid-job, an S3 API server (moto's
server mode) on 127.0.0.1 as a source."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import psutil
import pyarrow.dataset as ds
import pytest
from PIL import Image

from resnet_bench.servers import stop_process_group
from tests.harness import PHOTOS, encode, jpeg_of, wait_until


def tag_cmd(artifact: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "resnet_service",
        "tag",
        "--artifact",
        str(artifact),
        "--no-progress",
        *args,
    ]


@dataclass
class Run:
    code: int
    summary: dict[str, Any]
    stderr: str


def tag(artifact: Path, *args: str, cwd: Path | None = None) -> Run:
    done = subprocess.run(
        tag_cmd(artifact, *args), capture_output=True, text=True, timeout=600, cwd=cwd
    )
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1]) if lines else {}
    return Run(done.returncode, summary, done.stderr)


def rows_of(out: Path) -> list[dict[str, Any]]:
    """Every committed row, read as one dataset."""
    table = ds.dataset(
        str(out), format="parquet", exclude_invalid_files=False, ignore_prefixes=["_", "."]
    ).to_table()
    rows: list[dict[str, Any]] = table.to_pylist()
    return rows


def good_library(root: Path, count: int) -> list[Path]:
    """``count`` real photos as 500x375 JPEGs (of varying quality, so the bytes differ), in
    two folders."""
    paths = []
    for i in range(count):
        folder = root / ("a" if i % 2 else "a/b")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{PHOTOS[i % 4]}-{i:04d}.jpg"
        path.write_bytes(jpeg_of(PHOTOS[i % 4], quality=80 + i % 15))
        paths.append(path)
    return paths


def bad_library(root: Path) -> dict[str, str]:
    """One input of every kind that must give an error row, and the code it must get."""
    root.mkdir(parents=True, exist_ok=True)
    good = jpeg_of("coffee")
    (root / "zero.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "corrupt.jpg").write_bytes(good[:20] + bytes(range(256)) * 40)
    (root / "notes.txt").write_text("not an image")
    (root / "huge.png").write_bytes(encode(Image.new("L", (8000, 6000)), "PNG"))
    os.symlink("loop.jpg", root / "loop.jpg")  # a symlink that points at itself
    os.symlink("missing.jpg", root / "dangling.jpg")
    expected = {
        "zero.jpg": "empty_upload",
        "truncated.jpg": "undecodable_image",
        "corrupt.jpg": "undecodable_image",
        "notes.txt": "unsupported_image_format",
        "huge.png": "image_too_large",
        "loop.jpg": "unreadable_file",
        "dangling.jpg": "unreadable_file",
    }
    odd = os.fsencode(root) + b"/caf\xe9-latin1.jpg"  # a name that is not UTF-8
    with open(odd, "wb") as f:
        f.write(good)
    return expected


def predict_lines(artifact: Path, files: list[Path]) -> dict[str, dict[str, Any]]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "resnet_service",
            "predict",
            "--artifact",
            str(artifact),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return {json.loads(line)["file"]: json.loads(line) for line in done.stdout.splitlines()}


def same_answer(row: dict[str, Any], line: dict[str, Any]) -> bool:
    """The job's row says what ``predict`` says: same labels in the same order, scores within
    int8 batch noise (the job runs batches of 8, predict batches of whatever arrived)."""
    mine = row["predictions"]
    theirs = line["predictions"]
    return [p["index"] for p in mine] == [p["index"] for p in theirs] and all(
        abs(a["score"] - b["score"]) <= 1e-4 for a, b in zip(mine, theirs, strict=True)
    )


def test_every_input_gets_one_row_bad_ones_an_error_row_and_a_rerun_adds_nothing(
    tmp_path: Path, artifact: Path
) -> None:
    lib = tmp_path / "lib"
    good = good_library(lib / "photos", 24)
    expected = bad_library(lib / "bad")
    out = tmp_path / "out"

    first = tag(artifact, str(lib), "--out", str(out), cwd=tmp_path)
    assert first.code == 3, first.stderr  # completed with error rows
    assert first.summary["status"] == "completed_with_errors"
    assert first.summary["error_rows"] == len(expected)
    assert first.summary["tagged"] == len(good) + 1  # + the non-UTF-8 name
    rows = rows_of(out)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == len(good) + len(expected) + 1
    by_name = {Path(r["path"]).name: r for r in rows}
    for name, code in expected.items():
        row = by_name[name]
        assert row["error"]["code"] == code, row
        assert row["error"]["detail"]  # says what is wrong
        assert row["predictions"] is None
    assert "caf\\xe9-latin1.jpg" in by_name  # written with the odd byte escaped, not lost
    assert by_name["caf\\xe9-latin1.jpg"]["error"] is None
    reference = predict_lines(artifact, good)
    for path in good:
        row = by_name[path.name]
        assert row["error"] is None
        assert (row["width"], row["height"]) == (500, 375)
        assert row["model"] == "resnet18-imagenet1k-int8"
        assert row["runtime"] == "openvino"
        assert row["precision"] == "int8"
        assert len(row["weights_sha256"]) == 64
        assert same_answer(row, reference[str(path)]), (row, reference[str(path)])

    # DuckDB reads the folder as one table.
    relation = duckdb.sql(
        f"select count(*), count(distinct path), count(error) "
        f"from read_parquet('{out}/part-*.parquet')"
    )
    assert relation is not None
    counted = relation.fetchall()
    assert counted == [(len(rows), len(rows), len(expected))]

    again = tag(artifact, str(lib), "--out", str(out), cwd=tmp_path)
    # The unreadable ones are tried again (their cause is outside the file); the rest skipped.
    retried = sum(code == "unreadable_file" for code in expected.values())
    assert again.summary["skipped"] == len(rows) - retried
    assert again.summary["error_rows"] == retried
    assert sorted(r["path"] for r in rows_of(out)) == sorted(paths)


def test_a_library_that_grew_gets_only_its_new_and_changed_images_tagged(
    tmp_path: Path, artifact: Path
) -> None:
    lib = tmp_path / "lib"
    good = good_library(lib, 12)
    out = tmp_path / "out"
    assert tag(artifact, str(lib), "--out", str(out)).code == 0
    before = {r["path"]: r for r in rows_of(out)}
    changed = good[3]
    changed.write_bytes(jpeg_of("rocket", size=(640, 480)))
    (lib / "new").mkdir()
    added = [lib / "new" / f"n{i}.jpg" for i in range(5)]
    for path in added:
        path.write_bytes(jpeg_of("chelsea", size=(320, 240)))

    nightly = tag(artifact, str(lib), "--out", str(out))
    assert nightly.code == 0, nightly.stderr
    assert nightly.summary["tagged"] == len(added) + 1
    assert nightly.summary["skipped"] == len(good) - 1
    after = {r["path"]: r for r in rows_of(out)}
    assert len(rows_of(out)) == len(after) == len(good) + len(added)  # the old row replaced
    assert (after[str(changed)]["width"], after[str(changed)]["height"]) == (640, 480)
    assert after[str(changed)]["source_version"] != before[str(changed)]["source_version"]
    assert after[str(good[0])] == before[str(good[0])]  # untouched rows are not rewritten


def test_the_output_refuses_another_format_and_overwrite_starts_afresh(
    tmp_path: Path, artifact: Path
) -> None:
    lib = tmp_path / "lib"
    good_library(lib, 4)
    out = tmp_path / "out"
    assert tag(artifact, str(lib), "--out", str(out), "--format", "jsonl").code == 0
    lines = [
        json.loads(x) for p in sorted(out.glob("part-*.jsonl")) for x in p.read_text().splitlines()
    ]
    assert len(lines) == 4
    assert all(len(x["predictions"]) == 5 for x in lines)
    refused = tag(artifact, str(lib), "--out", str(out))
    assert refused.code == 1
    assert "format=jsonl" in refused.stderr
    assert "--overwrite" in refused.stderr
    fresh = tag(artifact, str(lib), "--out", str(out), "--overwrite", "--embed", "-k", "2")
    assert fresh.code == 0, fresh.stderr
    rows = rows_of(out)
    assert len(rows) == 4
    assert not list(out.glob("part-*.jsonl"))
    for row in rows:
        assert len(row["predictions"]) == 2
        norm = sum(v * v for v in row["embedding"]) ** 0.5
        assert len(row["embedding"]) == 512
        assert abs(norm - 1) < 1e-4
    missing = tag(artifact, str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2"))
    assert missing.code == 2
    assert "nowhere" in missing.stderr


# --- faults ---------------------------------------------------------------------------------
def start_job(artifact: Path, lib: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        tag_cmd(
            artifact,
            str(lib),
            "--out",
            str(out),
            "--commit-rows",
            "32",
            "--commit-every",
            "0.5",
            *extra,
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def parts(out: Path) -> list[Path]:
    return sorted(out.glob("part-*.parquet")) if out.exists() else []


def worker_pids(job: subprocess.Popen[bytes]) -> list[int]:
    """The job's worker processes (multiprocessing's spawned children, not its helpers)."""
    found = []
    for child in psutil.Process(job.pid).children():
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.Error:
            continue
    return sorted(found)


def wait_gone(pids: list[int], within_s: float) -> None:
    wait_until(
        lambda: (
            not any(
                psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                for p in pids
            )
        ),
        within_s,
        f"processes {pids} to exit",
    )


@pytest.fixture(scope="module")
def big_library(
    tmp_path_factory: pytest.TempPathFactory, artifact: Path
) -> tuple[Path, dict[str, Any]]:
    """240 photos and their rows from one uninterrupted run (the reference)."""
    lib = tmp_path_factory.mktemp("big") / "lib"
    good_library(lib, 240)
    out = lib.parent / "reference"
    assert tag(artifact, str(lib), "--out", str(out)).code == 0
    return lib, {r["path"]: r for r in rows_of(out)}


@pytest.mark.parametrize("moment", ["loading", "first-part", "mid-job"])
def test_kill_9_at_any_moment_then_rerun_gives_every_input_exactly_once(
    tmp_path: Path, artifact: Path, big_library: tuple[Path, dict[str, Any]], moment: str
) -> None:
    lib, reference = big_library
    out = tmp_path / "out"
    job = start_job(artifact, lib, out)
    try:
        if moment == "first-part":
            wait_until(lambda: len(parts(out)) >= 1, 120, "a first committed part")
        elif moment == "mid-job":
            wait_until(lambda: len(parts(out)) >= 3, 120, "three committed parts")
        else:
            wait_until(lambda: (out / "_job.json").exists(), 120, "the output opened")
        workers = worker_pids(job)
        job.send_signal(signal.SIGKILL)  # the job's process only: its workers must notice
        job.wait(10)
        wait_gone(workers, 15)
    finally:
        stop_process_group(job)
    committed = len(rows_of(out)) if parts(out) else 0
    assert committed < len(reference)  # killed before the end
    rerun = tag(artifact, str(lib), "--out", str(out))
    assert rerun.code == 0, rerun.stderr
    assert not list(out.glob(".part-*"))  # a half-written part is cleaned by the rerun
    assert rerun.summary["skipped"] == committed
    rows = rows_of(out)
    assert sorted(r["path"] for r in rows) == sorted(reference)  # no gap, no duplicate
    for row in rows:
        mine = {k: v for k, v in row.items() if k != "tagged_at"}
        theirs = {k: v for k, v in reference[row["path"]].items() if k != "tagged_at"}
        assert mine == theirs
    logged = [json.loads(x)["part"] for x in (out / "_commits.jsonl").read_text().splitlines()]
    assert {p.name for p in parts(out)} <= set(logged)


def test_sigterm_commits_what_was_done_and_a_killed_worker_is_replaced(
    tmp_path: Path, artifact: Path, big_library: tuple[Path, dict[str, Any]]
) -> None:
    lib, reference = big_library
    out = tmp_path / "out"
    job = start_job(artifact, lib, out)
    try:
        wait_until(lambda: len(parts(out)) >= 1, 120, "a first committed part")
        wait_until(lambda: len(worker_pids(job)) == 2, 60, "two workers")
        psutil.Process(
            worker_pids(job)[0]
        ).kill()  # a worker dies mid-task: its inputs go to another
        wait_until(lambda: len(parts(out)) >= 3, 120, "parts after the worker died")
        job.send_signal(signal.SIGTERM)
        assert job.wait(60) == 128 + signal.SIGTERM
    finally:
        stop_process_group(job)
    done = rows_of(out)
    assert len({r["path"] for r in done}) == len(done) < len(reference)
    assert all(r["error"] is None for r in done)  # the dead worker's inputs were re-done
    rerun = tag(artifact, str(lib), "--out", str(out))
    assert rerun.code == 0
    assert rerun.summary["skipped"] == len(done)
    assert sorted(r["path"] for r in rows_of(out)) == sorted(reference)


def test_results_are_written_while_the_listing_is_still_going(
    tmp_path: Path, artifact: Path
) -> None:
    """A manifest fed through a named pipe: the first part is committed before the listing
    has its last line."""
    lib = tmp_path / "lib"
    good = good_library(lib, 48)
    fifo = tmp_path / "list.txt"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    job = subprocess.Popen(
        tag_cmd(
            artifact,
            "--manifest",
            str(fifo),
            "--out",
            str(out),
            "--commit-every",
            "0.2",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        with fifo.open("w") as feed:
            for path in good[:16]:
                feed.write(f"{path.relative_to(tmp_path)}\n")  # relative to the manifest
            feed.flush()
            wait_until(lambda: len(parts(out)) >= 1, 120, "a part before the listing ended")
            for path in good[16:]:
                feed.write(f"{path}\n")
        stdout, _ = job.communicate(timeout=120)
    finally:
        stop_process_group(job)
    assert job.returncode == 0
    assert json.loads(stdout.splitlines()[-1])["tagged"] == len(good)
    assert len(rows_of(out)) == len(good)


# --- object storage ---------------------------------------------------------------------------
def test_an_s3_prefix_is_a_source(
    tmp_path: Path, artifact: Path, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="photos")
    for i in range(10):
        s3.put_object(
            Bucket="photos",
            Key=f"2026/12/{PHOTOS[i % 4]}-{i}.jpg",
            Body=jpeg_of(PHOTOS[i % 4], quality=70 + i),
        )
    s3.put_object(Bucket="photos", Key="2026/12/broken.jpg", Body=b"\xff\xd8\xff\xe0nope")
    out = tmp_path / "out"
    first = tag(artifact, "s3://photos/2026", "--out", str(out))
    assert first.code == 3, first.stderr
    rows = {r["path"]: r for r in rows_of(out)}
    assert len(rows) == 11
    assert rows["s3://photos/2026/12/broken.jpg"]["error"]["code"] == "undecodable_image"
    good = [r for r in rows.values() if r["error"] is None]
    assert len(good) == 10
    assert all(len(r["source_version"]) == 32 for r in good)
    s3.put_object(Bucket="photos", Key="2026/12/late.jpg", Body=jpeg_of("rocket"))
    second = tag(artifact, "s3://photos/2026", "--out", str(out))
    assert second.summary["tagged"] == 1
    assert second.summary["skipped"] == 11
    assert len(rows_of(out)) == 12


def test_a_repository_model_tags_and_its_version_is_on_every_row(
    tmp_path: Path, artifact: Path
) -> None:
    repo = tmp_path / "models"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "resnet_service",
            "publish",
            str(artifact),
            "--repository",
            str(repo),
            "--name",
            "street",
        ],
        check=True,
        capture_output=True,
    )
    lib = tmp_path / "lib"
    good_library(lib, 3)
    base = [sys.executable, "-m", "resnet_service", "tag", "--no-progress", str(lib)]
    done = subprocess.run(
        [*base, "--repository", str(repo), "--model", "street", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = rows_of(tmp_path / "o")
    assert len(rows) == 3
    assert {(r["model_version"], r["runtime"]) for r in rows} == {("1", "openvino")}
    missing = subprocess.run(
        [
            *base,
            "--repository",
            str(repo),
            "--model",
            "street",
            "--model-version",
            "7",
            "--out",
            str(tmp_path / "o2"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 1
    assert "has no version 7" in missing.stderr


def test_an_output_that_cannot_be_written_stops_the_job_and_a_rerun_resumes(
    tmp_path: Path, artifact: Path, big_library: tuple[Path, dict[str, Any]]
) -> None:
    """The output folder goes away mid-job (a file where it was: every write fails, as on a
    read-only or lost disk, even for root): exit 1 with the reason, nothing committed lost."""
    lib, reference = big_library
    out = tmp_path / "out"
    job = start_job(artifact, lib, out)
    moved = tmp_path / "moved"
    try:
        wait_until(lambda: len(parts(out)) >= 1, 120, "a first committed part")
        out.rename(moved)
        out.write_text("not a folder")
        assert job.wait(120) == 1
    finally:
        stop_process_group(job)
    out.unlink()
    moved.rename(out)
    committed = len(rows_of(out))
    assert 0 < committed < len(reference)
    rerun = tag(artifact, str(lib), "--out", str(out))
    assert rerun.code == 0, rerun.stderr
    assert rerun.summary["skipped"] == committed
    assert sorted(r["path"] for r in rows_of(out)) == sorted(reference)
