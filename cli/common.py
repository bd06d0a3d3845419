"""Shared CLI plumbing: global options, output, and error-to-exit-code mapping."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import typer

from usbipx.errors import UsbipError, ValidationError
from usbipx.sysfs import Sysfs
from usbipx.url import USBIP_PORT, parse_endpoint

if TYPE_CHECKING:
    from usbipx.net import Keepalive
    from usbipx.remote import DataPath, Remote
    from usbipx.tlsconf import TlsFiles

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
    import json

    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


KEEPALIVE_HELP = (
    "Dead-peer detection before the kernel gets the socket: "
    "IDLE,INTERVAL,COUNT[,USER_TIMEOUT_MS] (default 4,3,3,12000: under 20 s)."
)


def keepalive(text: str | None) -> Keepalive:
    """The --keepalive option's value, or the defaults."""
    from usbipx.net import DEFAULT_KEEPALIVE, Keepalive

    return Keepalive.parse(text) if text else DEFAULT_KEEPALIVE


CERT = typer.Option(None, "--cert", metavar="FILE",
                    help="This end's TLS certificate, for tls:// (or USBIPX_CERT).")
KEY = typer.Option(None, "--key", metavar="FILE",
                   help="Its private key, mode 0600 (or USBIPX_KEY).")
CA = typer.Option(None, "--ca", metavar="FILE",
                  help="CA the peer's certificate must chain to (or USBIPX_CA).")
TLS_DATA = typer.Option(
    "auto", "--tls-data", metavar="auto|ktls|relay",
    help="TLS data path: kernel TLS where it works (auto), or forced.")
PROXY = typer.Option(
    None, "--proxy", metavar="URL",
    help="HTTP proxy for wss:// (http://[USER:PASS@]HOST:PORT); default: https_proxy, "
         "wss_proxy, no_proxy from the environment.")
REMOTE_HELP = ("HOST, tcp://HOST[:PORT], tls://HOST[:PORT] or wss://HOST[:PORT]/PATH "
               "(mutual TLS: --cert --key --ca).")


def tls_files(cert: str | None, key: str | None, ca: str | None) -> TlsFiles | None:
    """The TLS files given as options or in the environment (None if none is)."""
    from usbipx.tlsconf import TlsFiles

    return TlsFiles.from_options(cert, key, ca)


def remote(st: State, text: str, cert: str | None = None, key: str | None = None,
           ca: str | None = None, keepalive_opt: str | None = None,
           tls_data: str = "auto", proxy: str | None = None) -> Remote:
    """The peer ``-r`` names, with the TLS files and timers to reach it."""
    from usbipx.remote import Remote

    endpoint = parse_endpoint(text, st.tcp_port)
    files = tls_files(cert, key, ca) if endpoint.secure else None
    return Remote(endpoint, files, keepalive(keepalive_opt), data_path=data_path(tls_data),
                  proxy=proxy)


def data_path(tls_data: str) -> DataPath:
    """The ``--tls-data`` option's value."""
    path = _DATA_PATHS.get(tls_data)
    if path is None:
        raise ValidationError(f"--tls-data must be auto, ktls or relay, not {tls_data!r}")
    return path


_DATA_PATHS: dict[str, DataPath] = {"auto": "auto", "ktls": "ktls", "relay": "relay"}
