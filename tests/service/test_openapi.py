"""The committed OpenAPI spec is the app's; `make openapi` regenerates it."""

from __future__ import annotations

import json

from resnet_service.server.app import openapi_document
from tests.harness import ROOT

SPEC = ROOT / "openapi" / "openapi.json"


def test_committed_spec_matches_the_app() -> None:
    committed = json.loads(SPEC.read_text())
    assert committed == openapi_document(), "openapi/openapi.json is stale: run `make openapi`"


def test_spec_documents_bodies_and_errors() -> None:
    spec = openapi_document()
    classify = spec["paths"]["/classify"]["post"]
    assert "multipart/form-data" in classify["requestBody"]["content"]
    assert classify["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ClassifyResponse"
    )
    for status in ("400", "413", "415", "422", "503", "504"):
        assert classify["responses"][status]["content"]["application/problem+json"]
    batch = spec["paths"]["/classify/batch"]["post"]["requestBody"]["content"][
        "multipart/form-data"
    ]
    assert batch["schema"]["properties"]["images"]["type"] == "array"
    schemas = spec["components"]["schemas"]
    for name in (
        "Problem",
        "ClassifyResponse",
        "BatchResponse",
        "BatchItemResult",
        "ModelResponse",
    ):
        assert name in schemas


def test_generated_grpc_modules_match_the_proto() -> None:
    """Like the OpenAPI spec: the committed gRPC modules are what the proto generates."""
    import subprocess
    import sys

    script = ROOT / "scripts" / "gen_grpc.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
