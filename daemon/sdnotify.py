"""systemd's notify protocol (``sd_notify``), without libsystemd.

Messages go as one datagram to the AF_UNIX socket named by ``NOTIFY_SOCKET``
(a leading ``@`` means the abstract namespace).  Outside systemd the
variable is unset and every call is a no-op.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send ``message`` (e.g. ``READY=1``); False if not under systemd or it failed."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        # Never block: a notify socket nobody reads (its queue holds only a
        # few datagrams) must not stall the event loop that sends to it.
        with socket.socket(socket.AF_UNIX,
                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as s:
            s.connect(addr)
            s.send(message.encode())
    except OSError:  # BlockingIOError included: the message is dropped
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``WATCHDOG_USEC``), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        timeout = int(usec)
    except ValueError:
        return None
    if timeout <= 0:
        return None  # as sd_watchdog_enabled(): no watchdog
    return max(timeout / 2e6, 0.1)
