"""Listening sockets for the daemons, and the tally that keeps refusals from flooding the log."""

from __future__ import annotations

import errno
import ipaddress
import socket

from usbipx.errors import UsbipError
from usbipx.log import logger
from usbipx.url import Endpoint


def _bind(fam: socket.AddressFamily, addr: str, port: int) -> socket.socket:
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            # One socket per family, as usbipd does.
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port))
        s.listen(128)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def listeners(listen: tuple[Endpoint, ...], port: int, ipv4: bool = True, ipv6: bool = True,
              bind_address: str | None = None) -> list[tuple[socket.socket, Endpoint]]:
    """The listening sockets, each with the URL it serves: one per URL in ``listen``,
    else plain TCP on ``port`` (on ``bind_address``, or on both families unless only
    one is wanted)."""
    wanted: list[tuple[socket.AddressFamily, Endpoint]] = []
    if listen:
        for ep in listen:
            fam = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
            if not _is_address(ep.host):
                infos = socket.getaddrinfo(ep.host, ep.port, type=socket.SOCK_STREAM,
                                           flags=socket.AI_PASSIVE)
                fam = infos[0][0]
            wanted.append((fam, ep))
    elif bind_address:
        infos = socket.getaddrinfo(bind_address, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        wanted = [(info[0], Endpoint("tcp", str(info[4][0]), port)) for info in infos[:1]]
    else:
        if ipv4:
            wanted.append((socket.AF_INET, Endpoint("tcp", "0.0.0.0", port)))
        if ipv6 and socket.has_ipv6:
            wanted.append((socket.AF_INET6, Endpoint("tcp", "::", port)))
    socks: list[tuple[socket.socket, Endpoint]] = []
    for fam, ep in wanted:
        addr, at = ep.host, ep.port
        try:
            socks.append((_bind(fam, addr, at), ep))
        except OSError as exc:
            if (not listen and fam == socket.AF_INET6
                    and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)):
                logger.warning("IPv6 unavailable ({}); listening on IPv4 only", exc.strerror)
                continue
            for other, _ in socks:
                other.close()
            raise UsbipError(f"cannot listen on {addr} port {at}: {exc.strerror}") from exc
    if not socks:
        raise UsbipError("no address family to listen on")
    return socks


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Tally:
    """Counts repeated events per key and says when to log: the 1st, 10th, 100th...

    A flood of refused connections costs a handful of log lines, not one
    each.  Forgets everything past ``limit`` keys (many source addresses).
    """

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._counts: dict[tuple[str, str], int] = {}

    def count(self, kind: str, host: str) -> int | None:
        """This event's number if it should be logged, else None."""
        if len(self._counts) >= self.limit:
            self._counts.clear()
        n = self._counts.get((kind, host), 0) + 1
        self._counts[(kind, host)] = n
        return n if str(n).rstrip("0") == "1" else None


def times(n: int) -> str:
    return "" if n == 1 else f" (connection {n} refused so far)"


