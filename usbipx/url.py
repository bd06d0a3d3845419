"""Where to reach a peer, or where to listen: ``HOST``, ``tcp://``, ``tls://``, ``wss://`` URLs.

::

    HOST | tcp://HOST[:PORT]         plain TCP (the C tools' peer; LAN)
    tls://HOST[:PORT]                mutual TLS
    wss://HOST[:PORT]/PATH           TLS + WebSocket (through HTTP proxies)

A bare ``HOST`` (or ``[v6addr]``) is plain TCP on the default port, so the
commands keep the C tools' ``-r HOST``.  IPv6 addresses go in brackets.
Everything is validated here, once: the rest of usbipx takes :class:`Endpoint`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from usbipx.errors import ValidationError

Scheme = Literal["tcp", "tls", "wss"]
_SCHEMES: dict[str, Scheme] = {"tcp": "tcp", "tls": "tls", "wss": "wss"}
USBIP_PORT = 3240
WSS_PORT = 443

_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")
_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]{0,255}")
_URL = re.compile(r"(?:(?P<scheme>[a-z]+)://)?(?P<host>\[[^\]/]*\]|[^:/\[\]]*)"
                  r"(?::(?P<port>[0-9]{1,5}))?(?P<path>/.*)?")


@dataclass(frozen=True)
class Endpoint:
    """A validated peer or listening address."""

    scheme: Scheme
    host: str
    """A host name or an IP address (IPv6 without brackets)."""
    port: int
    path: str = "/"
    """The WebSocket path (``wss`` only)."""

    @property
    def secure(self) -> bool:
        """Whether the link is TLS (``tls`` or ``wss``)."""
        return self.scheme != "tcp"

    @property
    def hostport(self) -> str:
        """``host:port``, brackets around an IPv6 address."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        tail = self.path if self.scheme == "wss" else ""
        return f"{self.scheme}://{self.hostport}{tail}"


def _check_host(host: str, text: str) -> str:
    if host.startswith("["):
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise ValidationError(f"bad address in {text!r}: {host} is not an IPv6 address")\
                from None
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(host):
        raise ValidationError(f"bad host in {text!r}: expected a host name or an IP address "
                              "(IPv6 in brackets)")
    return host


def parse_endpoint(text: str, default_port: int = USBIP_PORT) -> Endpoint:
    """``text`` as an :class:`Endpoint`; :class:`ValidationError` says what is wrong.

    ``default_port`` is used for ``HOST``, ``tcp://`` and ``tls://`` without a port
    (the global ``-t``); ``wss://`` defaults to 443.  A bare IPv6 address (``::1``,
    as the C tools take it) is plain TCP to that address.
    """
    with contextlib.suppress(ValueError):
        return Endpoint("tcp", str(ipaddress.IPv6Address(text)), default_port)
    m = _URL.fullmatch(text)
    if m is None or not m["host"]:
        raise ValidationError(f"bad remote {text!r}: expected HOST, tcp://HOST[:PORT], "
                              "tls://HOST[:PORT] or wss://HOST[:PORT]/PATH")
    scheme = _SCHEMES.get(m["scheme"] or "tcp")
    if scheme is None:
        raise ValidationError(f"bad remote {text!r}: unknown scheme {m['scheme']}:// "
                              "(use tcp://, tls:// or wss://)")
    host = _check_host(m["host"], text)
    port = int(m["port"]) if m["port"] else (WSS_PORT if scheme == "wss" else default_port)
    if not 1 <= port <= 65535:
        raise ValidationError(f"bad port in {text!r}: must be 1..65535")
    path = m["path"] or "/"
    if scheme != "wss" and m["path"] not in (None, "/"):
        raise ValidationError(f"bad remote {text!r}: only wss:// URLs have a path")
    if not _PATH.fullmatch(path):
        raise ValidationError(f"bad path in {text!r}")
    return Endpoint(scheme, host, port, path if scheme == "wss" else "/")
