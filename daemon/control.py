"""The supervisor's control socket: the server in the daemon, and the client
``usbipx supervisor status`` uses.

The protocol is one line each way: the client sends ``status``, the server
answers one line of JSON (``{"summary": ..., "exports": [...]}``, or
``{"error": ...}``) and closes.  The socket is an AF_UNIX stream socket,
mode 0600.

The client side imports nothing of the daemon: ``supervisor status`` stays a
small program.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from usbipx.errors import UsbipError

if TYPE_CHECKING:
    from usbipx.daemon.supervisor import Supervisor

REQUEST_LIMIT = 65536
"""Longest request line (bytes) the server reads; a longer one gets an error line."""

REQUEST_TIMEOUT = 5.0
"""Seconds a client has to send its request line."""


async def control_server(path: str, sup: Supervisor) -> asyncio.AbstractServer:
    """Listen on ``path`` (mode 0600) and answer ``status`` requests about ``sup``.

    Raises :class:`UsbipError` (one line, naming ``path``) if another
    supervisor answers there or the socket cannot be created.
    """
    p = Path(path)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            body = _answer(sup, await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT))
        except ValueError:  # asyncio's LimitOverrunError, as readline() raises it
            body = {"error": f"request line longer than {REQUEST_LIMIT} bytes"}
        except (TimeoutError, OSError):
            writer.close()
            return
        try:
            writer.write(json.dumps(body).encode() + b"\n")
            await writer.drain()
        except OSError:
            pass  # the client left
        finally:
            writer.close()

    try:
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        _refuse_a_live_supervisor(p)
        old = os.umask(0o177)  # the socket is born 0600: no window for others
        try:
            return await asyncio.start_unix_server(handle, path=str(p), limit=REQUEST_LIMIT)
        finally:
            os.umask(old)
    except OSError as exc:
        raise UsbipError(f"cannot create the control socket {path}: {_why(p, exc)}") from None


def _answer(sup: Supervisor, line: bytes) -> dict[str, Any]:
    cmd = line.decode(errors="replace").strip()
    if cmd == "status":
        return {"summary": sup.summary(), "exports": sup.status()}
    return {"error": f"unknown command {cmd!r}"}


def _refuse_a_live_supervisor(p: Path) -> None:
    """Remove a socket left by a supervisor that is gone; refuse one that answers."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(p.lstat().st_mode):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(p))
                except OSError:
                    p.unlink()
                else:
                    raise UsbipError(f"another supervisor is running (it answers on {p})")


def _why(p: Path, exc: OSError) -> str:
    """The reason a socket at ``p`` could not be made, in words."""
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        for parent in reversed(p.parents):
            if parent.exists() and not parent.is_dir():
                return f"{parent} is not a directory"
    if exc.errno == errno.EADDRINUSE:
        return "something that is not a socket is in the way"
    return exc.strerror or str(exc)


def query_status(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask a running supervisor for its status over the control socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(b"status\n")
            data = b""
            while not data.endswith(b"\n") and (chunk := s.recv(65536)):
                data += chunk  # one line of JSON
    except FileNotFoundError as exc:
        raise UsbipError(f"no supervisor is running (no control socket at {path})") from exc
    except PermissionError as exc:
        raise UsbipError(f"cannot open {path}: permission denied; are you root?") from exc
    except OSError as exc:
        raise UsbipError(f"cannot query the supervisor at {path}: {exc.strerror or exc}") \
            from exc
    try:
        body = json.loads(data)
    except ValueError as exc:
        raise UsbipError(f"unreadable answer from the supervisor at {path}") from exc
    if not isinstance(body, dict):
        raise UsbipError(f"unreadable answer from the supervisor at {path}")
    return body
