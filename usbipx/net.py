"""TCP transports: connecting, tuning sockets for the kernel, and one request/reply.

Once a socket is handed to the kernel (``usbip_sockfd`` or vhci ``attach``)
userspace can no longer set options on it, and the kernel only notices a dead
peer through TCP itself.  So every socket gets TCP_NODELAY (URBs are small
and latency-bound), SO_KEEPALIVE with short probe timers, and
TCP_USER_TIMEOUT (unacknowledged data) *before* the handoff: a dead link is
detected in seconds, not after the two-hour keepalive default.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from usbipx.errors import ProtocolError, UsbipError, ValidationError
from usbipx.protocol import Reply, ReplyDecoder, Request
from usbipx.url import USBIP_PORT


@dataclass(frozen=True)
class Keepalive:
    """Dead-peer detection timers applied to every USB/IP socket.

    With the defaults an idle link is probed after 4 s, every 3 s, and given
    up after 3 unanswered probes (13 s); data left unacknowledged for 12 s
    aborts the connection too.  With TCP_USER_TIMEOUT set, Linux also waits
    for it before giving up on keepalive, so the two are kept close: a dead
    peer is noticed in about 13 s, well under 20 s even on a slow board.
    """

    idle: int = 4
    interval: int = 3
    count: int = 3
    user_timeout_ms: int = 12000

    def __post_init__(self) -> None:
        # Linux's limits (MAX_TCP_KEEPIDLE/KEEPINTVL/KEEPCNT, an int timeout):
        # beyond them setsockopt fails with EINVAL at connection time.
        if (not 1 <= self.idle <= 32767 or not 1 <= self.interval <= 32767
                or not 1 <= self.count <= 127 or not 0 <= self.user_timeout_ms <= 2**31 - 1):
            raise ValueError("keepalive idle/interval must be 1..32767, count 1..127 "
                             "and user timeout 0..2147483647 ms")

    @classmethod
    def parse(cls, text: str) -> Keepalive:
        """``IDLE,INTERVAL,COUNT[,USER_TIMEOUT_MS]`` as given to ``--keepalive``."""
        parts = text.split(",")
        if len(parts) not in (3, 4) or not all(p.strip().isdigit() for p in parts):
            raise ValidationError(
                f"bad keepalive {text!r}: expected IDLE,INTERVAL,COUNT[,USER_TIMEOUT_MS]"
            )
        try:
            return cls(*(int(p) for p in parts))
        except ValueError as exc:
            raise ValidationError(f"bad keepalive {text!r}: {exc}") from None


DEFAULT_KEEPALIVE = Keepalive()


def tune_socket(sock: socket.socket, keepalive: Keepalive = DEFAULT_KEEPALIVE) -> None:
    """Set TCP_NODELAY, SO_KEEPALIVE, keepalive timers and TCP_USER_TIMEOUT on ``sock``."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # AF_UNIX relays (e.g. a tunnel) have no TCP options
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive.idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, keepalive.interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, keepalive.count)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, keepalive.user_timeout_ms)


def connect(host: str, port: int = USBIP_PORT, timeout: float = 10.0,
            keepalive: Keepalive = DEFAULT_KEEPALIVE) -> socket.socket:
    """Open a tuned, blocking TCP connection to ``host:port`` (IPv4 or IPv6)."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as exc:
        raise UsbipError(f"cannot resolve {host}: {exc.strerror}") from exc
    except OSError as exc:
        raise UsbipError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from exc
    try:
        tune_socket(sock, keepalive)
    except OSError:
        sock.close()
        raise
    return sock


def request(sock: socket.socket, req: Request, timeout: float = 10.0) -> Reply:
    """Send ``req`` and read exactly its reply, not one byte more, within ``timeout``
    seconds in all (a peer trickling its reply cannot stretch it).

    The bytes after the reply belong to the kernel (URB traffic), so the
    reply is read with exact-size ``recv`` calls driven by the decoder.
    """
    deadline = time.monotonic() + timeout
    dec = ReplyDecoder(req)
    try:
        sock.settimeout(timeout)
        sock.sendall(req.pack())
        while (rep := dec.next_event()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            chunk = sock.recv(dec.needed())
            if not chunk:
                raise _closed(dec)
            dec.receive_data(chunk)
    except TimeoutError as exc:
        raise UsbipError(f"no reply from peer within {timeout:g} s") from exc
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise _closed(dec) from exc
    except OSError as exc:
        raise UsbipError(f"connection failed: {exc.strerror or exc}") from exc
    finally:
        # The kernel expects a blocking socket.
        sock.settimeout(None)
    return rep


def _closed(dec: ReplyDecoder) -> ProtocolError:
    reason = "connection closed by peer before the reply was complete"
    if dec.pending == 0:
        # Not one byte of reply: how a usbipa refuses an address at once.
        reason += " (a usbipa closes connections from addresses outside its --allow)"
    return ProtocolError(reason)
