"""A relay that outlives the command that started it.

``connect`` and ``attach`` return once the kernel has the device; when the
data goes through a user-space relay (TLS without kernel TLS), that relay
must keep running until the export ends.  :func:`run_relay` starts it in a
background process of its own (double fork, new session, standard streams
on /dev/null), like a daemon, and returns once it runs.  The relay ends by
itself when either side closes; ``disconnect`` finds it through the export's
ownership record and ends it too.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from usbipx.errors import UsbipError

if TYPE_CHECKING:
    from usbipx.relay import Relay


def run_relay(relay: Relay, on_start: Callable[[], None] | None = None) -> int:
    """Run ``relay`` in a background process; its pid.

    ``on_start`` runs in that process first (to record it, e.g.).  This
    process's copies of the relay's sockets are closed on return, so the
    relay alone holds the connection.
    """
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked process
        os.close(r)
        _daemon(relay, on_start, w)
    os.close(w)
    try:
        os.waitpid(child, 0)
        answer = os.read(r, 256)
    finally:
        os.close(r)
        relay.kernel_side.close()
        relay.network.close()
    if not answer.startswith(b"ok "):
        raise UsbipError("the background relay did not start: " +
                         (answer.decode(errors="replace") or "it exited"))
    return int(answer[3:])


def _daemon(relay: Relay, on_start: Callable[[], None] | None,
            w: int) -> None:  # pragma: no cover - runs in the forked process
    try:
        os.setsid()
        if os.fork() > 0:
            os._exit(0)
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        # SIGTERM keeps its default: the process ends, the kernel closes both
        # sockets, and each side sees its connection end.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if on_start is not None:
            on_start()
        os.write(w, f"ok {os.getpid()}".encode())
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(w, str(exc).encode()[:200])
        os._exit(1)
    os.close(w)
    try:
        relay.run()
    finally:
        os._exit(0)
