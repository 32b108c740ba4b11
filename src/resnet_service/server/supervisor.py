"""``serve``'s parent process: preflight, worker processes, crash replacement, shutdown.

Why not uvicorn's own supervisor: its workers share one listening socket (one worker takes
every keep-alive connection), start accepting before the app is ready, and a dead worker's
live gauges stay in the shared metrics. Here:
- the preflight builds what the workers will load (in a child process when that needs torch),
  so workers only load it, and a start-up error (no weights, read-only cache) is said once;
- each worker binds its own SO_REUSEPORT socket once its model is warm, and says so on a pipe;
  the replica is ready when every worker has been ready once (one byte in a shared file that
  every worker's /readyz reads, so the answer does not depend on which worker takes a probe);
- a worker that dies is marked dead in the prometheus multiprocess directory (its live gauges
  leave the sums at once) and replaced; the replacement listens only when warm;
- SIGTERM (or SIGINT) marks the replica draining and forwards SIGTERM to the workers, which
  drain themselves (``server/http.py``); stragglers get SIGKILL after the grace period.

Event-driven: a pidfd per worker, its notify pipe and a signal wake-up pipe in one selector.
It imports neither torch nor FastAPI: it stays small.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Final

from resnet_service.server.exit_codes import EXIT_STARTUP_FAILED
from resnet_service.server.worker import (
    INDEX_ENV,
    NOTIFY_FD_ENV,
    READY_MESSAGE,
    REPLICA_STATE_ENV,
)

log = logging.getLogger("resnet_service.supervisor")

STARTING: Final = b"S"
READY: Final = b"R"
DRAINING: Final = b"D"
#: Seconds beyond drain delay + grace (+ the idle linger) before stragglers are killed.
_STOP_MARGIN_S: Final = 5.0
#: A worker replaced more often than this within a minute is crash-looping: back off.
_MAX_RESTARTS_PER_MINUTE: Final = 5


@dataclass
class Worker:
    """One worker process and its pipes."""

    index: int
    process: subprocess.Popen[bytes]
    notify: int
    pidfd: int
    ready: bool = False
    buffer: bytes = b""


@dataclass
class RestartLog:
    """Recent replacements, for crash-loop back-off."""

    times: list[float] = field(default_factory=list)

    def delay(self, now: float) -> float:
        self.times = [t for t in self.times if now - t < 60] + [now]
        excess = len(self.times) - _MAX_RESTARTS_PER_MINUTE
        return 0.0 if excess <= 0 else min(30.0, 2.0**excess)


class Supervisor:
    """Runs ``workers`` worker processes until a signal, replacing any that die."""

    def __init__(
        self,
        workers: int,
        env: dict[str, str],
        rundir: Path,
        stop_timeout_s: float,
    ) -> None:
        self.count = workers
        self.env = env
        self.state_file = rundir / "replica"
        self.metrics_dir = env.get("PROMETHEUS_MULTIPROC_DIR")
        self.stop_timeout_s = stop_timeout_s
        self.workers: dict[int, Worker] = {}
        self.selector = selectors.DefaultSelector()
        self.replica_ready = False
        self.stopping = False
        self.restarts = RestartLog()
        self._pending_restarts: list[tuple[float, int]] = []
        self._signal_r, self._signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._signals: list[int] = []
        self._write_state(STARTING)

    # --- shared state --------------------------------------------------------------------
    def _write_state(self, value: bytes) -> None:
        fd = os.open(self.state_file, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, value, 0)
        finally:
            os.close(fd)

    # --- workers -------------------------------------------------------------------------
    def spawn(self, index: int) -> None:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        env = {
            **self.env,
            NOTIFY_FD_ENV: str(write_end),
            REPLICA_STATE_ENV: str(self.state_file),
            INDEX_ENV: str(index),
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "resnet_service.server.worker"], env=env, pass_fds=[write_end]
        )
        os.close(write_end)
        os.set_blocking(read_end, False)
        worker = Worker(index, process, read_end, os.pidfd_open(process.pid))
        self.workers[index] = worker
        self.selector.register(worker.notify, selectors.EVENT_READ, ("notify", index))
        self.selector.register(worker.pidfd, selectors.EVENT_READ, ("exit", index))
        log.info("worker %d started (pid %d)", index, process.pid)

    def _forget(self, worker: Worker) -> None:
        for fd in (worker.notify, worker.pidfd):
            self.selector.unregister(fd)
            os.close(fd)
        del self.workers[worker.index]

    def _on_notify(self, worker: Worker) -> None:
        try:
            data = os.read(worker.notify, 1024)
        except BlockingIOError:
            return
        worker.buffer += data
        if READY_MESSAGE in worker.buffer and not worker.ready:
            worker.ready = True
            log.info("worker %d ready (pid %d)", worker.index, worker.process.pid)
            everyone = len(self.workers) == self.count and all(
                w.ready for w in self.workers.values()
            )
            if everyone and not self.replica_ready and not self.stopping:
                self.replica_ready = True
                self._write_state(READY)
                log.info("ready: %d worker(s) serving", self.count)

    def _on_exit(self, worker: Worker) -> int | None:
        """A worker ended. Returns an exit code when the whole server must stop."""
        code = worker.process.wait()
        self._forget(worker)
        self._mark_dead(worker.process.pid)
        if self.stopping:
            return None
        if not self.replica_ready and not worker.ready:
            log.critical("worker %d failed to start (exit %d); stopping", worker.index, code)
            return code if code > 0 else EXIT_STARTUP_FAILED
        log.error(
            "worker %d (pid %d) died (exit %d); replacing it",
            worker.index,
            worker.process.pid,
            code,
        )
        delay = self.restarts.delay(time.monotonic())
        self._pending_restarts.append((time.monotonic() + delay, worker.index))
        return None

    def _mark_dead(self, pid: int) -> None:
        """Drop the dead process's live gauges (queue depth, in flight, ready) from the sums."""
        if not self.metrics_dir:
            return
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]

    # --- signals -------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)  # the wake-up fd wakes the selector; act there

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._signal_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        self.selector.register(self._signal_r, selectors.EVENT_READ, ("signal", -1))

    # --- main loop -----------------------------------------------------------------------
    def run(self) -> int:
        """Serve until a signal; returns the exit code."""
        self._install_signals()
        for index in range(self.count):
            self.spawn(index)
        exit_code = self._loop()
        return self._stop_all(exit_code)

    def _loop(self) -> int:
        while True:
            timeout = self._restart_due()
            for key, _ in self.selector.select(timeout):
                kind, index = key.data
                if kind == "signal":
                    os.read(self._signal_r, 512)
                    if self._signals:
                        log.info("signal %d: draining", self._signals[-1])
                        return 0
                elif kind == "notify" and index in self.workers:
                    self._on_notify(self.workers[index])
                elif kind == "exit" and index in self.workers:
                    code = self._on_exit(self.workers[index])
                    if code is not None:
                        return code

    def _restart_due(self) -> float | None:
        """Spawn replacements whose back-off has passed; the selector timeout until the next."""
        now = time.monotonic()
        due = [(t, i) for t, i in self._pending_restarts if t <= now]
        self._pending_restarts = [(t, i) for t, i in self._pending_restarts if t > now]
        for _, index in due:
            self.spawn(index)
        if not self._pending_restarts:
            return None
        return max(0.0, min(t for t, _ in self._pending_restarts) - now)

    def _stop_all(self, exit_code: int) -> int:
        self.stopping = True
        self._write_state(DRAINING)
        for worker in self.workers.values():
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        while self.workers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for worker in list(self.workers.values()):
                    log.error("worker %d did not stop in time: killing it", worker.index)
                    worker.process.kill()
                    worker.process.wait()
                    self._forget(worker)
                break
            for key, _ in self.selector.select(remaining):
                kind, index = key.data
                if kind == "exit" and index in self.workers:
                    self._on_exit(self.workers[index])
                elif kind == "signal":
                    os.read(self._signal_r, 512)
                elif kind == "notify" and index in self.workers:
                    self._on_notify(self.workers[index])
        log.info("stopped")
        return exit_code
