"""Schemathesis, driven by the committed OpenAPI spec, against a real server process: every
operation, batches carrying generated files, parameters in and out of range. No 5xx, and every
answer conforms to the spec (status codes, content types, headers, bodies).

Two of schemathesis' checks are left out, on purpose: ``positive_data_acceptance`` (a
schema-valid file is any bytes; bytes that are not an image are rightly refused with 415) and
``negative_data_rejection`` (a batch answers 200 with a per-image error for a part that is not
an image: one bad image never sinks the others, by design).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.harness import ROOT, serve

SPEC = ROOT / "openapi" / "openapi.json"


def test_the_live_server_conforms_to_its_spec(
    weights_file: Path, model_cache: Path, tmp_path: Path
) -> None:
    args = ["--weights", str(weights_file), "--cache-dir", str(model_cache), "--offline"]
    # Generated requests come back to back from one client: admission must not shed them.
    env = {"RESNET_SERVICE_QUEUE_BUDGET_MS": "60000"}
    with serve(tmp_path, *args, env=env) as server:
        proc = subprocess.run(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                "run",
                str(SPEC),
                "--url",
                server.url,
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance,negative_data_rejection",
                "--max-examples",
                "40",
                "--seed",
                "20261128",
                "--workers",
                "1",
                "--request-timeout",
                "30",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert "No issues found" in proc.stdout or "passed" in proc.stdout, proc.stdout[-2000:]
