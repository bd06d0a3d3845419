"""Logging: the library's handle on loguru's logger, and the set-up for entry points.

Library modules do ``from usbipx.log import logger`` and log; they never add
sinks.  Entry points (the CLI, daemons, the supervisor) call
:func:`configure` once.

:data:`logger` is loguru's logger, imported on the first record worth
emitting.  A command on a slow board logs nothing below WARNING, and loguru
pulls in asyncio and ssl at import: tens of milliseconds on a laptop, over
a second on a board, for records nobody would see.  Until loguru is
imported, a record below the configured level is dropped on the spot; once
it is (a daemon, a test), every record goes to loguru, which filters.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

_LEVELS = {"TRACE": 5, "DEBUG": 10, "INFO": 20, "SUCCESS": 25, "WARNING": 30, "ERROR": 40,
           "CRITICAL": 50}
_threshold: int | None = None
"""The lowest level a configured sink takes; None: not configured (loguru's default
stderr sink takes everything)."""
_pending: list[tuple[Any, ...]] = []
"""Sinks :func:`configure` asked for before loguru was imported."""


def _loguru() -> Any:
    """loguru's logger; the first call imports loguru and applies the configuration."""
    from loguru import logger as real

    while _pending:
        args = _pending.pop(0)
        real.remove()
        real.add(*args[:1], **args[1])
    return real


class LazyLogger:
    """loguru's logger (or one bound to ``extra``), imported when a record is worth it."""

    def __init__(self, extra: dict[str, Any] | None = None) -> None:
        self._extra = extra or {}

    def _target(self) -> Any:
        real = _loguru()
        return real.bind(**self._extra) if self._extra else real

    def _emit(self, level: str | int, message: object, args: Any, kwargs: Any) -> None:
        number = _LEVELS.get(level, 0) if isinstance(level, str) else level
        if "loguru" not in sys.modules and _threshold is not None and number < _threshold:
            return  # nobody would see it: do not import loguru for it
        # depth 2: the record names the caller of log()/info()..., not this module
        self._target().opt(depth=2).log(level, message, *args, **kwargs)

    def log(self, level: str | int, message: object, *args: Any, **kwargs: Any) -> None:
        """Emit ``message`` (``{}``-formatted with ``args``) at ``level``."""
        self._emit(level, message, args, kwargs)

    def trace(self, message: object, *args: Any, **kwargs: Any) -> None:
        self._emit("TRACE", message, args, kwargs)

    def debug(self, message: object, *args: Any, **kwargs: Any) -> None:
        self._emit("DEBUG", message, args, kwargs)

    def info(self, message: object, *args: Any, **kwargs: Any) -> None:
        self._emit("INFO", message, args, kwargs)

    def warning(self, message: object, *args: Any, **kwargs: Any) -> None:
        self._emit("WARNING", message, args, kwargs)

    def error(self, message: object, *args: Any, **kwargs: Any) -> None:
        self._emit("ERROR", message, args, kwargs)

    def critical(self, message: object, *args: Any, **kwargs: Any) -> None:
        self._emit("CRITICAL", message, args, kwargs)

    def exception(self, message: object, *args: Any, **kwargs: Any) -> None:
        """An ERROR record with the exception being handled."""
        self._target().opt(depth=1, exception=True).error(message, *args, **kwargs)

    def bind(self, **extra: Any) -> LazyLogger:
        """This logger with ``extra`` fields bound (as loguru's ``bind``)."""
        return LazyLogger({**self._extra, **extra})


logger = LazyLogger()
"""The logger every library module uses."""

_FORMAT = "usbipx: <level>{level: <7}</level> {message}"
_DEBUG_FORMAT = (
    "{time:HH:mm:ss.SSS} {process} <level>{level: <7}</level> {name}:{line} {message} {extra}"
)


def configure(debug: bool = False, fmt: str | None = None, level: str = "WARNING") -> None:
    """Send log records to stderr: ``level`` and up, or everything with ``debug``.

    Commands print their results themselves and log warnings only; daemons
    pass ``level="INFO"`` so that every request leaves a line.
    """
    global _threshold
    chosen = "DEBUG" if debug else level
    _threshold = _LEVELS[chosen]
    sink = (sys.stderr, {"level": chosen, "format": fmt or (_DEBUG_FORMAT if debug else _FORMAT),
                         "colorize": False, "backtrace": False, "diagnose": False})
    _pending[:] = [sink]
    if "loguru" in sys.modules:
        _loguru()


worker_pipe: Any = None
"""In a supervisor worker: the connection its log records travel to the parent on
(JSON over ``send_bytes``; pickling would pull dill's machinery into every worker)."""


def _forward(message: Any) -> None:
    import json  # the worker's parent imported it: no cost after the fork

    r = message.record
    # A gone parent is no error here: the worker follows it (PR_SET_PDEATHSIG).
    with contextlib.suppress(OSError, AttributeError):
        worker_pipe.send_bytes(json.dumps(["log", r["level"].name, r["message"]]).encode())


def configure_supervisor(debug: bool, fmt: str) -> None:
    """Logging for a supervisor and its forked workers, set up once in the parent.

    The one real sink (stderr) writes only in the parent.  In a worker the
    same logger forwards each record over the worker's own pipe
    (:data:`worker_pipe`), and the parent logs it with the export and pid
    bound.  Workers never add or remove sinks: reconfiguring loguru after the
    fork would copy a megabyte of the parent's memory into every worker.
    """
    global _threshold
    parent = os.getpid()
    real = _loguru()
    real.remove()
    level = "DEBUG" if debug else "INFO"
    _threshold = _LEVELS[level]
    real.add(sys.stderr, level=level, format=fmt, colorize=False, backtrace=False,
             diagnose=False, filter=lambda r: r["process"].id == parent)
    real.add(_forward, level=level, format="{message}",
             filter=lambda r: r["process"].id != parent and worker_pipe is not None)
