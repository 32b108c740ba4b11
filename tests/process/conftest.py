"""Fixtures of the real-process tests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from resnet_bench.servers import free_port, stop_process_group
from tests.harness import wait_until


@pytest.fixture(scope="module")
def artifact(
    tmp_path_factory: pytest.TempPathFactory, weights_file: Path, model_cache: Path
) -> Path:
    """The OpenVINO int8 model of the test weights, built once a module by ``quantize --out``
    (a module's servers and jobs then only load it)."""
    out = tmp_path_factory.mktemp("artifact") / "imagenet-int8"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "resnet_service",
            "quantize",
            "--runtime",
            "openvino",
            "--weights",
            str(weights_file),
            "--cache-dir",
            str(model_cache),
            "--offline",
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture
def s3_server(tmp_path: Path) -> Iterator[str]:
    """moto's S3 API server on 127.0.0.1, in its own process group."""
    port = free_port()
    log = (tmp_path / "moto.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        def up() -> bool:
            try:
                return httpx.get(url, timeout=1).status_code < 500
            except httpx.HTTPError:
                return False

        wait_until(up, 60, "moto's S3 server")
        yield url
    finally:
        stop_process_group(proc)
        log.close()
