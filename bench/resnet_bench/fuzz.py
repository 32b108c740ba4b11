"""Coverage-guided fuzzing (atheris/libFuzzer) of what parses untrusted bytes.

    python -m resnet_bench.fuzz decoder CORPUS -max_total_time=300 -timeout=10
    python -m resnet_bench.fuzz multipart -max_total_time=300 -timeout=10

A crash (any exception other than our ``InputError``) or a hang past ``-timeout`` seconds ends
the run with a non-zero exit and the input saved (``crash-*`` / ``timeout-*``). The tests run
the same contract with hypothesis (``tests/test_fuzz.py``); this goes deeper, for minutes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import atheris

# Coverage guidance where the parsing happens: our code, Pillow, python-multipart.
with atheris.instrument_imports(include=["resnet_service", "PIL", "python_multipart"]):
    from resnet_service.core.errors import InputError
    from resnet_service.core.images import (
        LOCAL_FILE_LIMITS,
        PreprocessSpec,
        decode_and_preprocess,
        install_bomb_guard,
    )
    from resnet_service.faces.http.multipart import FormLimits, FormReader

SPEC = PreprocessSpec()
LIMITS = FormLimits(
    file_fields=frozenset({"images"}), max_files=8, max_file_bytes=1 << 20, max_body_bytes=4 << 20
)


def fuzz_decoder(data: bytes) -> None:
    try:
        array = decode_and_preprocess(data, LOCAL_FILE_LIMITS, SPEC)
    except InputError:
        return
    if array.shape != (3, SPEC.crop_size, SPEC.crop_size):
        raise AssertionError(f"decoded to shape {array.shape}")


def fuzz_multipart(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    boundary = provider.ConsumeBytes(provider.ConsumeIntInRange(1, 80))
    body = provider.ConsumeBytes(provider.remaining_bytes())
    try:
        reader = FormReader(boundary, LIMITS)
        step = max(1, len(body) // 3)
        for start in range(0, len(body), step):
            reader.feed(body[start : start + step])
        reader.finish()
    except InputError:
        return


TARGETS: dict[str, Callable[[bytes], None]] = {
    "decoder": fuzz_decoder,
    "multipart": fuzz_multipart,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        raise SystemExit(f"usage: fuzz.py {{{','.join(TARGETS)}}} [libFuzzer flags]")
    target = TARGETS[sys.argv.pop(1)]
    install_bomb_guard()
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
