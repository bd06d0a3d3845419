"""Shared CLI plumbing: global options, output, and error-to-exit-code mapping."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import typer

from usbipx.errors import UsbipError
from usbipx.net import DEFAULT_KEEPALIVE, USBIP_PORT, Keepalive
from usbipx.sysfs import Sysfs

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class State:
    """Global options, stored on the typer context object."""

    debug: bool = False
    json: bool = False
    tcp_port: int = USBIP_PORT
    root: str = "/"
    sysfs: Sysfs | None = None
    """Injected kernel filesystem (tests); ``Sysfs(root)`` when None."""

    def kernel(self) -> Sysfs:
        """The :class:`Sysfs` commands act on."""
        if self.sysfs is None:
            self.sysfs = Sysfs(self.root)
        return self.sysfs


def state(ctx: typer.Context) -> State:
    """The :class:`State` of this invocation (defaults when run without the callback)."""
    obj = ctx.find_root().obj
    if not isinstance(obj, State):
        obj = State()
        ctx.find_root().obj = obj
    return obj


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``usbipx: error: message`` on stderr; return the Exit to raise."""
    typer.echo(f"usbipx: error: {message}", err=True)
    return typer.Exit(code)


def handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn usbipx errors into a one-line reason and the error's exit code."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except UsbipError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None

    return wrapper


def emit_json(data: Any) -> None:
    """Write ``data`` as indented JSON on stdout."""
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


KEEPALIVE_HELP = (
    "Dead-peer detection before the kernel gets the socket: "
    "IDLE,INTERVAL,COUNT[,USER_TIMEOUT_MS] (default 4,3,3,12000: under 20 s)."
)


def keepalive(text: str | None) -> Keepalive:
    """The --keepalive option's value, or the defaults."""
    return Keepalive.parse(text) if text else DEFAULT_KEEPALIVE
