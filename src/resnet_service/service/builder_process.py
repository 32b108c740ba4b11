"""Building a model (export, quantization: torch) in a child process, so that serving workers
never import torch: ``serve``'s preflight before the workers, and the model repository for
every new version while serving."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
from typing import IO, Any, Final

preflight_log = logging.getLogger("resnet_service.preflight")
#: Terminal colour codes and the glyphs of progress bars, dropped from relayed lines.
_ANSI: Final = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_BAR_CHARS: Final = frozenset("━─╸╺ ")


class BuildFailed(Exception):
    """The child could not build the model; the message is its reason."""


def build_in_child(env: dict[str, str], json_logs: bool = False) -> str | None:
    """Build (or verify) what the workers will load, once, in a child process (torch, when it
    builds, lives and dies there): a start-up error is said once, and workers only load.
    Returns the built model's folder for torch-free runtimes. With ``json_logs``, what the
    builders write on their own (NNCF's progress bars and notes) is relayed as log records,
    so that the replica's every line stays JSON."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnet_service", "preflight"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if json_logs else None,
        text=True,
    )
    relay = None
    if json_logs:
        assert proc.stderr is not None
        relay = threading.Thread(target=_relay, args=(proc.stderr,), daemon=True)
        relay.start()
    assert proc.stdout is not None
    out = proc.stdout.read()  # the last line is the preflight's JSON answer
    code = proc.wait()
    if relay is not None:
        relay.join(10)
    answer = _answer(out)
    if code != 0:
        raise BuildFailed(str(answer.get("error") or f"the build exited with {code}"))
    artifact: str | None = answer.get("artifact")
    return artifact


def _answer(out: str) -> dict[str, Any]:
    """The child's last stdout line: its JSON answer (``{"error": ...}`` on failure)."""
    lines = out.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def _relay(stream: IO[str]) -> None:
    """The preflight's stderr, line by line: JSON records as they are, anything else (a
    library's own output) as a record of ours."""
    for line in stream:
        text = _ANSI.sub("", line).strip()
        if not text or set(text) <= _BAR_CHARS:
            continue
        if text.startswith("{"):
            sys.stderr.write(line if line.endswith("\n") else line + "\n")
            continue
        preflight_log.info("%s", text)
