"""What a peers run runs: where, how long, at which concurrencies, which peers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from resnet_bench.peers.report import GOAL_CONCURRENCY

DEFAULT_VENV: Final = Path("bench/results/peers/.venv")
DEFAULT_BENTOML_VENV: Final = Path("bench/results/peers/.venv-bentoml")


@dataclass(frozen=True)
class PeerOptions:
    """What to run: where, how long, at which concurrencies."""

    out_dir: Path
    venv: Path = DEFAULT_VENV
    bentoml_venv: Path = DEFAULT_BENTOML_VENV
    duration_s: float = 8.0
    concurrencies: tuple[int, ...] = (1, GOAL_CONCURRENCY, 64)
    keep_workdir: bool = False
    #: Which peers to run (TorchServe needs Java; BentoML its own venv).
    peers: tuple[str, ...] = ("TorchServe", "BentoML")
