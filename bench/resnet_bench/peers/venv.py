"""A peer's own virtual environment, made once and reused, so its pins never touch the
project's."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from resnet_bench.servers import python

log = logging.getLogger(__name__)

#: Written into the venv once every requirement installed: a half-made venv is finished.
VENV_STAMP: Final = ".resnet-service-peers"


def ensure_peer_venv(venv: Path, requirements: Sequence[str]) -> Path:
    """The Python of a peer's own venv, made (or finished) only when its stamp is missing:
    reinstalling torch on every run would cost a minute of a shared machine."""
    venv = venv.absolute()  # a peer may start from its own working directory
    peer_python = venv / "bin" / "python"
    stamp = venv / VENV_STAMP
    wanted = "\n".join(requirements)
    if peer_python.exists() and stamp.is_file() and stamp.read_text() == wanted:
        return peer_python
    if not peer_python.exists():
        log.info("creating a peer's venv in %s", venv)
        subprocess.run([python(), "-m", "venv", str(venv)], check=True, timeout=300)
    log.info("installing %s", " ".join(requirements))
    subprocess.run(
        [str(peer_python), "-m", "pip", "install", "--quiet", *requirements],
        check=True,
        timeout=1800,
    )
    stamp.write_text(wanted)
    return peer_python
