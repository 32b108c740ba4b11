"""Fixtures of the real-process tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


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
