"""The CLI: predict, quantize and info through the same engine."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from resnet_service.cli import main
from tests.harness import jpeg_of


def model_args(weights: Path, cache: Path) -> list[str]:
    return ["--weights", str(weights), "--cache-dir", str(cache), "--offline", "--threads", "1"]


def test_predict_prints_a_json_line_per_file(
    weights_file: Path, model_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg_of("chelsea"))
    code = main(["predict", str(photo), "-k", "5", *model_args(weights_file, model_cache)])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    assert row["file"] == str(photo)
    assert row["precision"] == "int8"
    assert row["random_weights"] is False
    preds = row["predictions"]
    assert len(preds) == 5
    assert [p["score"] for p in preds] == sorted((p["score"] for p in preds), reverse=True)
    assert all(isinstance(p["label"], str) and 0 <= p["index"] < 1000 for p in preds)


def test_predict_reports_each_failure_and_exits_nonzero(
    weights_file: Path, model_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg_of("coffee"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    missing = tmp_path / "missing.jpg"
    code = main(
        ["predict", str(good), str(bad), str(missing), *model_args(weights_file, model_cache)]
    )
    assert code == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["file"] for r in rows] == [str(good), str(bad), str(missing)]
    assert "predictions" in rows[0]
    assert rows[1]["error"]["code"] == "undecodable_image"
    assert "No such file" in rows[2]["error"]["detail"]


@pytest.mark.parametrize(
    ("runtime", "manifest_file", "serve_flag"),
    [("torch", "bundle.json", "--bundle"), ("openvino", "artifact.json", "--artifact")],
)
def test_quantize_prints_fidelity_and_writes_a_servable_model(
    weights_file: Path,
    model_cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    runtime: str,
    manifest_file: str,
    serve_flag: str,
) -> None:
    out = tmp_path / f"int8-{runtime}"
    args = ["quantize", "--out", str(out), "--runtime", runtime]
    assert main([*args, *model_args(weights_file, model_cache)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["runtime"] == runtime
    assert row["serve_with"] == serve_flag  # the folder's kind, said for the next command
    fidelity = row.get("fidelity") or row["quantization"]["fidelity"]
    assert fidelity["images"] == 16
    assert 0 <= fidelity["top1_agreement"] <= 1
    manifest = json.loads((out / manifest_file).read_text())
    assert manifest["precision"] == "int8"
    photo = str(_photo(tmp_path))
    code = main(["predict", photo, serve_flag, str(out), "--cache-dir", str(model_cache)])
    assert code == 0
    predicted = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert predicted["runtime"] == runtime


def _photo(tmp_path: Path) -> Path:
    path = tmp_path / "p.jpg"
    path.write_bytes(jpeg_of("rocket"))
    return path


def test_info_shows_provenance_and_threads(
    weights_file: Path, model_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", *model_args(weights_file, model_cache)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["weights_source"] == "explicit_path"
    assert len(info["weights_sha256"]) == 64
    assert info["inference_threads"] == 1
    assert info["runtime"] == "openvino"  # the default
    assert info["runtime_version"]
    assert info["fidelity"]["images"] == 16
    assert info["quantization"]["method"] == "nncf_ptq"


def test_invalid_setting_exits_2_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--max-batch-size", "0"]) == 2
    assert "max_batch_size" in capsys.readouterr().err


def test_console_script_without_weights_explains_the_remedy(tmp_path: Path) -> None:
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "th")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "resnet_service",
            "predict",
            str(_photo(tmp_path)),
            "--offline",
            "--cache-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert "weights_unavailable" in proc.stderr
    assert "RESNET_SERVICE_WEIGHTS_PATH" in proc.stderr


def _predict_with_a_failing_download(
    tmp_path: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """``predict`` with no weights on disk and downloads allowed, through a proxy that refuses
    (as an offline machine's name resolution would, but at once)."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    port = closed.getsockname()[1]
    env = {
        **os.environ,
        "TORCH_HOME": str(tmp_path / "th"),
        "HTTPS_PROXY": f"http://127.0.0.1:{port}",
        "https_proxy": f"http://127.0.0.1:{port}",
    }
    try:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "resnet_service",
                "predict",
                str(_photo(tmp_path)),
                "--cache-dir",
                str(tmp_path / "cache"),
                *extra,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )
    finally:
        closed.close()


def test_a_failed_download_is_said_once_with_its_cause(tmp_path: Path) -> None:
    proc = _predict_with_a_failing_download(tmp_path)
    assert proc.returncode == 1
    assert "the download from" in proc.stderr
    assert "refused" in proc.stderr.lower()  # the cause, in urllib's words
    assert "ALLOW_DOWNLOADS=true" not in proc.stderr  # already on: not the remedy
    assert proc.stderr.count("No ResNet18 weights") == 1


def test_random_weights_after_a_failed_download_is_one_line(tmp_path: Path) -> None:
    proc = _predict_with_a_failing_download(tmp_path, "--allow-random-weights")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    warnings = [line for line in lines if "WARNING" in line and "download" in line.lower()]
    assert len(warnings) == 1, proc.stderr
    assert "SEEDED RANDOM" in warnings[0]
    # Libraries' chatter stays out of the terminal (it is there at LOG_LEVEL=debug).
    assert not [line for line in lines if " nncf " in line or "CUDA" in line], proc.stderr


def test_predict_walks_folders_and_writes_each_line_as_soon_as_it_is_done(
    weights_file: Path, model_cache: Path, tmp_path: Path
) -> None:
    """The last input is a named pipe nobody writes yet: the folder's lines must come out
    before it is read at all (streamed, not collected), then the pipe's image is answered."""
    import threading
    import time

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.jpg", "sub/b.jpg"):
        (folder / name).write_bytes(jpeg_of("coffee"))
    (folder / "c.txt").write_text("not an image")
    pipe = tmp_path / "last.jpg"
    os.mkfifo(pipe)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "resnet_service",
            "predict",
            str(folder),
            str(pipe),
            *model_args(weights_file, model_cache),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while len(lines) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert len(lines) == 3, "the folder's lines did not come before the pipe was read"
        pipe.write_bytes(jpeg_of("rocket"))
        assert proc.wait(60) == 1  # one input was not an image
    finally:
        proc.kill()
        proc.wait()
    reader.join(10)
    assert proc.stdout is not None
    proc.stdout.close()
    rows = [json.loads(line) for line in lines]
    assert [Path(r["file"]).name for r in rows] == ["a.jpg", "c.txt", "b.jpg", "last.jpg"]
    assert rows[1]["error"]["code"] == "unsupported_image_format"
    assert "predictions" in rows[3]


def test_heatmaps_keep_one_file_per_image_and_overlay_the_photo(
    weights_file: Path, model_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Same-named images in two folders get a map each (they overwrote one file); --overlay
    lays the map over the photo, at the photo's size."""
    photos = tmp_path / "photos"
    for folder, name in (("a", "chelsea"), ("b", "coffee")):
        (photos / folder).mkdir(parents=True)
        (photos / folder / "x.jpg").write_bytes(jpeg_of(name, (320, 240)))
    maps = tmp_path / "maps"
    args = ["predict", str(photos), "--explain", "--heatmaps", str(maps), "--overlay"]
    assert main([*args, *model_args(weights_file, model_cache)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    written = [Path(row["cam"]["heatmap"]) for row in rows]
    assert len(set(written)) == 2
    for row, path in zip(rows, written, strict=True):
        relative = Path(row["file"]).relative_to(Path(row["file"]).anchor)
        assert path == maps / relative.parent / "x.jpg.cam.png"
        with Image.open(path) as overlay:
            assert overlay.size == (320, 240)  # the photo, not a bare 224 x 224 map
            assert overlay.mode == "RGB"


def test_quantize_on_a_terminal_draws_no_library_progress_bars(
    weights_file: Path, tmp_path: Path
) -> None:
    """NNCF draws rich progress bars while it quantizes when stdout is a terminal: library
    chatter, not the user's business (a DEBUG record, there at --log-level debug). Run on a
    pseudo-terminal, as a user runs it; the cache is empty, so the model is really built."""
    import pty

    leader, follower = pty.openpty()
    cli = str(Path(sys.executable).parent / "resnet-service")
    proc = subprocess.Popen(
        [cli, "quantize", *model_args(weights_file, tmp_path / "cache")],
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"},
        start_new_session=True,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: every writer of the terminal has gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(300) == 0
    output = b"".join(chunks).decode(errors="replace")
    assert "building the openvino int8 model" in output  # the terminal saw our own lines
    assert "━" not in output, output  # rich's bar
    assert "Statistics collection" not in output, output


def test_samples_copies_the_packaged_photos_under_their_subjects_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from resnet_service.model.datasets import builtin_photos

    assert main(["samples", str(tmp_path / "photos")]) == 0
    names = sorted(p.name for p in (tmp_path / "photos").iterdir())
    assert len(names) == len(builtin_photos()) == 48
    assert "chelsea_0.jpg" in names
    assert not [n for n in names if n.startswith(("calib_", "holdout_"))]
    with Image.open(tmp_path / "photos" / "chelsea_0.jpg") as photo:
        assert photo.format == "JPEG"
    assert "48 photos" in capsys.readouterr().out
