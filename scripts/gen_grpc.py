"""Generate the gRPC Python modules from src/resnet_service/faces/oip/pb/inference.proto.

    .venv/bin/python scripts/gen_grpc.py          # writes inference_pb2.py, inference_pb2_grpc.py
    .venv/bin/python scripts/gen_grpc.py --check  # exit 1 if the committed modules are stale

The generated modules are committed (the service needs no protoc at install time); a test runs
the check, like the OpenAPI spec's.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "resnet_service" / "faces" / "oip" / "pb"
OUTPUTS = ("inference_pb2.py", "inference_pb2_grpc.py", "inference_pb2.pyi")


def generate(out: Path) -> None:
    code = protoc.main(
        [
            "protoc",
            f"-I{PACKAGE}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(PACKAGE / "inference.proto"),
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed ({code})")
    grpc_module = out / "inference_pb2_grpc.py"
    # protoc writes a top-level import; the modules live in a package.
    text = grpc_module.read_text().replace(
        "import inference_pb2 as inference__pb2",
        "from resnet_service.faces.oip.pb import inference_pb2 as inference__pb2",
    )
    grpc_module.write_text(text)


def main() -> int:
    check = "--check" in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [
            name
            for name in OUTPUTS
            if not (PACKAGE / name).is_file()
            or (PACKAGE / name).read_text() != (Path(tmp) / name).read_text()
        ]
        if check:
            if stale:
                print(f"stale generated modules: {stale}; run scripts/gen_grpc.py")
                return 1
            return 0
        for name in OUTPUTS:
            (PACKAGE / name).write_text((Path(tmp) / name).read_text())
    print(f"generated {', '.join(OUTPUTS)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
