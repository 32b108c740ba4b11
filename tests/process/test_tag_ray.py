"""``tag --ray`` on a real two-node Ray cluster on 127.0.0.1 (``tests.ray_cluster``): the same
rows as the local job, and a node killed mid-job loses nothing and duplicates nothing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from resnet_bench.servers import stop_process_group
from tests.harness import wait_until
from tests.process.test_tag import good_library, parts, rows_of, tag, tag_cmd

#: Ray's own single-machine mode: every node and the driver on the loopback address.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def first_line(proc: subprocess.Popen[str], within_s: float) -> str:
    """The process's first stdout line, or fail after ``within_s`` seconds."""
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(within_s)
    if not got or not got[0]:
        raise AssertionError("the Ray cluster did not come up")
    return got[0]


@pytest.fixture
def ray_cluster() -> Iterator[dict[str, Any]]:
    """A head and a second node (one CPU each), both on 127.0.0.1; stopped by process group."""
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, **RAY_ENV, "RAY_TMPDIR": tmp}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.ray_cluster"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        info: dict[str, Any] = json.loads(first_line(proc, 120))
        info["env"] = {**RAY_ENV, "RAY_TMPDIR": tmp}
        yield info
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # the helper shuts its cluster down ...
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
        stop_process_group(proc)  # type: ignore[arg-type]  # ... or is made to
        assert proc.stdout is not None
        proc.stdout.close()
        subprocess.run(["rm", "-rf", tmp], check=False)


def test_on_ray_a_dead_node_loses_nothing_and_the_rows_are_the_local_jobs(
    tmp_path: Path, artifact: Path, ray_cluster: dict[str, Any]
) -> None:
    lib = tmp_path / "lib"
    good_library(lib, 320)
    local = tmp_path / "local"
    assert tag(artifact, str(lib), "--out", str(local)).code == 0
    reference = {r["path"]: r for r in rows_of(local)}

    out = tmp_path / "ray"
    env = {**os.environ, **ray_cluster["env"]}
    job = subprocess.Popen(
        tag_cmd(
            artifact,
            str(lib),
            "--out",
            str(out),
            "--ray",
            ray_cluster["address"],
            "--commit-rows",
            "32",
            "--commit-every",
            "0.5",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        wait_until(lambda: len(parts(out)) >= 1, 180, "a first part from the Ray job")
        assert job.poll() is None  # mid-job
        for pid in ray_cluster["second_node_pids"]:
            os.kill(pid, signal.SIGKILL)  # the second node dies mid-job
        stdout, stderr = job.communicate(timeout=300)
    finally:
        stop_process_group(job)
    assert job.returncode == 0, stderr.decode()[-3000:]
    summary = json.loads(stdout.decode().splitlines()[-1])
    assert summary["tagged"] == len(reference)
    rows = rows_of(out)
    assert sorted(r["path"] for r in rows) == sorted(reference)  # nothing lost or twice
    for row in rows:
        mine = {k: v for k, v in row.items() if k != "tagged_at"}
        theirs = {k: v for k, v in reference[row["path"]].items() if k != "tagged_at"}
        assert mine == theirs

    rerun = subprocess.run(
        tag_cmd(artifact, str(lib), "--out", str(out), "--ray", ray_cluster["address"]),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout.splitlines()[-1])["skipped"] == len(reference)
