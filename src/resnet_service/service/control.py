"""Explicit mode's shared word on the repository: which models were unloaded, and a generation
that every load or unload bumps, in one small JSON file in the replica's run directory. Any
worker can take a control request (the kernel spreads connections over them); every worker
follows the file, and each reports the generation it applied, so the worker that took the
request can answer once the whole replica did it.

Hand-written (a file, ``flock``, an atomic rename) because the workers share nothing else:
no broker, no shared memory; without a run directory (one in-process app) it lives in memory.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from pydantic import BaseModel

from resnet_service.locks import file_lock
from resnet_service.service.models import ServedVersion

CONTROL_FILE: Final = "repository-control.json"


class ControlState(BaseModel):
    generation: int = 0
    unloaded: list[str] = []


class WorkerReport(BaseModel):
    """What one worker applied, and its versions' states then."""

    generation: int
    pid: int
    states: dict[str, str]  # "model/version" -> state


@dataclass
class ControlFile:
    directory: Path | None
    worker: int = 0
    _memory: ControlState = field(default_factory=ControlState)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _reports: dict[int, WorkerReport] = field(default_factory=dict)

    @property
    def _path(self) -> Path | None:
        return self.directory / CONTROL_FILE if self.directory is not None else None

    def read(self) -> ControlState:
        path = self._path
        if path is None:
            return self._memory
        try:
            return ControlState.model_validate_json(path.read_text())
        except FileNotFoundError:
            return ControlState()

    def generation(self) -> int:
        return self.read().generation

    def unloaded(self) -> set[str]:
        return set(self.read().unloaded)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            if self.directory is None:
                yield
                return
            with file_lock(self.directory / f".{CONTROL_FILE}.lock"):
                yield

    def request(self, model: str, load: bool) -> int:
        """Ask every worker to load (re-read) or unload ``model``; the new generation."""
        with self._locked():
            state = self.read()
            unloaded = set(state.unloaded) - {model} if load else set(state.unloaded) | {model}
            new = ControlState(generation=state.generation + 1, unloaded=sorted(unloaded))
            self._write(new)
            return new.generation

    def _write(self, state: ControlState) -> None:
        path = self._path
        if path is None:
            self._memory = state
            return
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(state.model_dump_json())
        os.replace(tmp, path)

    # --- what each worker applied --------------------------------------------------------
    def report(self, generation: int, index: list[ServedVersion]) -> None:
        states = {f"{e.model}/{e.version}": str(e.state) for e in index}
        report = WorkerReport(generation=generation, pid=os.getpid(), states=states)
        if self.directory is None:
            self._reports[self.worker] = report
            return
        path = self.directory / f"repository-worker-{self.worker}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(report.model_dump_json())
        os.replace(tmp, path)

    def reports(self) -> list[WorkerReport]:
        """The latest report of every worker (live ones: a dead worker's pid is gone)."""
        if self.directory is None:
            return list(self._reports.values())
        found = []
        for path in sorted(self.directory.glob("repository-worker-*.json")):
            try:
                report = WorkerReport.model_validate_json(path.read_text())
            except (OSError, ValueError):
                continue
            if _alive(report.pid):
                found.append(report)
        return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
