"""Logging for every process of the service: ``text`` for a terminal, ``json`` (the container
image's default) for a log pipeline, where every line, start-up, worker lifecycle, errors with
their stack, uvicorn's own and the access log, is one JSON object with a timestamp, level,
logger, message, worker index and, where there is one, request id, trace id, model and version.

python-json-logger does the formatting; what is ours is the context those fields come from: a
context variable the request middleware sets (the request id), OpenTelemetry's current span
(the trace id), and the model a worker serves (set once it is loaded).
"""

from __future__ import annotations

import io
import logging
import logging.config
import os
import sys
import warnings
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Final, Literal

from opentelemetry import trace

LogFormat = Literal["text", "json"]

#: The request a log line is written for (set by the request middleware, per task).
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
#: Our loggers, uvicorn's, gRPC's and the root (third-party libraries' warnings).
APP_LOGGERS: Final = ("resnet_service", "uvicorn", "uvicorn.error", "grpc", "py.warnings")
#: Libraries' chatter, for debugging this service rather than for its users' terminals: NNCF's
#: INFO lines while quantizing, torch's "No CUDA runtime is found" on a CPU machine. At
#: LOG_LEVEL=debug they come through.
QUIET_LOGGERS: Final = {"nncf": logging.WARNING, "torch.utils.cpp_extension": logging.ERROR}
ACCESS_LOGGER: Final = "resnet_service.access"
#: The supervisor hands each worker its index in this variable.
WORKER_ENV: Final = "RESNET_WORKER_INDEX"


#: The model and version this worker serves, for its log lines (``set_model``).
_MODEL: dict[str, str] = {}


def set_model(name: str, version: str) -> None:
    """From now on, this process's lines say which model and version it serves (the default
    one, with a repository; a request's access line names the version that answered it)."""
    _MODEL.update(model=name, version=version)


class ContextFilter(logging.Filter):
    """Adds the worker index and, where known, request id, trace id, model and version."""

    def __init__(self) -> None:
        super().__init__()
        self.worker = os.environ.get(WORKER_ENV, "supervisor")

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("color_message", None)  # uvicorn's copy with terminal colours
        record.worker = self.worker
        if (request_id := request_id_var.get()) is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        context = trace.get_current_span().get_span_context()
        if context.is_valid and not hasattr(record, "trace_id"):
            record.trace_id = trace.format_trace_id(context.trace_id)
        for key, value in _MODEL.items():  # a request's line names its own model
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


_JSON: Final = {
    "()": "pythonjsonlogger.json.JsonFormatter",
    "fmt": "%(levelname)s %(name)s %(message)s",
    "rename_fields": {"levelname": "level", "name": "logger", "exc_info": "stack"},
    "timestamp": True,
}
_FORMATTERS: Final[dict[LogFormat, dict[str, Any]]] = {
    "text": {"format": "%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s"},
    "json": _JSON,
}
_ACCESS_FORMATTERS: Final[dict[LogFormat, dict[str, Any]]] = {
    # A terminal gets the access line's JSON as its message (what the middleware writes).
    "text": {"format": "%(message)s"},
    "json": _JSON,
}


def log_config(level: str, fmt: LogFormat = "text") -> dict[str, Any]:
    """``logging.config.dictConfig`` for a process: app lines on stderr, access lines on
    stdout, uvicorn's access log off (our middleware writes one)."""
    handler = {"formatter": "app", "filters": ["context"], "stream": "ext://sys.stderr"}
    access = {"formatter": "access", "filters": ["context"], "stream": "ext://sys.stdout"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": ContextFilter}},
        "formatters": {"app": _FORMATTERS[fmt], "access": _ACCESS_FORMATTERS[fmt]},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", **handler},
            "access": {"class": "logging.StreamHandler", **access},
        },
        "root": {"handlers": ["stderr"], "level": "WARNING"},
        "loggers": {
            **{
                name: {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
                for name in APP_LOGGERS
            },
            ACCESS_LOGGER: {"handlers": ["access"], "level": "INFO", "propagate": False},
            **{
                name: {"level": _quiet_level(name, level)}
                for name in QUIET_LOGGERS
                if name not in APP_LOGGERS
            },
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }


class DebugLines(io.TextIOBase):
    """A stream whose lines become DEBUG records of ``logger``: where a library's prints go
    (NNCF's progress bars, ONNX Runtime's notes), so a terminal sees none of them unless
    LOG_LEVEL=debug. Not a terminal, so rich and tqdm draw no live bars into it."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self._pending + text).replace("\r", "\n").split("\n")
        self._pending = lines.pop()
        for line in lines:
            if line.strip():
                self._logger.debug("%s", line.rstrip())
        return len(text)

    def flush(self) -> None:
        if self._pending.strip():
            self._logger.debug("%s", self._pending.rstrip())
        self._pending = ""


def configure(level: str, fmt: LogFormat = "text", *, embedded_ok: bool = False) -> None:
    """Configure this process's logging; in json mode, warnings and uncaught exceptions become
    log records too, so that no line of the process is anything but JSON. ``embedded_ok``:
    leave a host's logging alone when it has configured its own (``main()`` called from a
    program or a test, as ``logging.basicConfig`` would)."""
    if embedded_ok and logging.getLogger().handlers:
        return
    logging.config.dictConfig(log_config(level, fmt))
    logging.captureWarnings(True)
    if fmt == "json":
        sys.excepthook = _log_uncaught
        warnings.simplefilter("default")


def _quiet_level(name: str, level: str) -> str:
    """A quiet library logger's level: its own floor, or debug when the service debugs."""
    if level.upper() == "DEBUG":
        return "DEBUG"
    return logging.getLevelName(QUIET_LOGGERS[name])


def adopt(name: str) -> None:
    """Give a library's logger our handlers (torch installs its own stderr handler when it is
    imported, so the modules that import it call this right after), and a quiet one its
    floor again (NNCF sets its level on import)."""
    ours = logging.getLogger("resnet_service")
    if not ours.handlers:
        return  # logging was never configured here (a library user): leave theirs alone
    theirs = logging.getLogger(name)
    theirs.handlers = list(ours.handlers)
    theirs.propagate = False
    if name in QUIET_LOGGERS:
        theirs.setLevel(_quiet_level(name, logging.getLevelName(ours.getEffectiveLevel())))


def _log_uncaught(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    logging.getLogger("resnet_service").critical("uncaught exception", exc_info=(kind, value, tb))
