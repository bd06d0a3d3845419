"""Logging set-up for entry points.

Library modules only do ``from loguru import logger`` and log; they never add
sinks.  Entry points (the CLI, daemons, the supervisor) call
:func:`configure` once.
"""

from __future__ import annotations

import sys

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
