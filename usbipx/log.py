"""Logging set-up for entry points.

Library modules only do ``from loguru import logger`` and log; they never add
sinks.  Entry points (the CLI, daemons, the supervisor) call
:func:`configure` once.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

from loguru import logger

_FORMAT = "usbipx: <level>{level: <7}</level> {message}"
_DEBUG_FORMAT = (
    "{time:HH:mm:ss.SSS} {process} <level>{level: <7}</level> {name}:{line} {message} {extra}"
)


def configure(debug: bool = False, fmt: str | None = None, level: str = "WARNING") -> None:
    """Send log records to stderr: ``level`` and up, or everything with ``debug``.

    Commands print their results themselves and log warnings only; daemons
    pass ``level="INFO"`` so that every request leaves a line.
    """
    logger.remove()
    logger.add(
        sys.stderr,
        level="DEBUG" if debug else level,
        format=fmt or (_DEBUG_FORMAT if debug else _FORMAT),
        colorize=False,
        backtrace=False,
        diagnose=False,
    )


worker_pipe: Any = None
"""In a supervisor worker: the connection its log records travel to the parent on
(JSON over ``send_bytes``; pickling would pull dill's machinery into every worker)."""


def _forward(message: Any) -> None:
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
    parent = os.getpid()
    logger.remove()
    level = "DEBUG" if debug else "INFO"
    logger.add(sys.stderr, level=level, format=fmt, colorize=False, backtrace=False,
               diagnose=False, filter=lambda r: r["process"].id == parent)
    logger.add(_forward, level=level, format="{message}",
               filter=lambda r: r["process"].id != parent and worker_pipe is not None)
