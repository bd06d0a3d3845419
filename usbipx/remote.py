"""A peer to reach and what carries an export's data: the types both link kinds
(:mod:`usbipx.transport` for ``tcp``/``tls``, :mod:`usbipx.wslink` for ``wss``)
share, so that neither imports the other for them."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from usbipx.errors import ConfigError
from usbipx.net import DEFAULT_KEEPALIVE, Keepalive
from usbipx.url import Endpoint

if TYPE_CHECKING:
    from usbipx.tlsconf import TlsFiles

DataPath = Literal["auto", "ktls", "relay"]
"""How TLS data reaches the kernel: kernel TLS where it works (``auto``), or forced."""

Transport = Literal["tcp", "ktls", "tls-relay", "wss-relay"]
REPLY_TIMEOUT = 30.0
DEFAULT_PING = (5.0, 10.0)
"""WebSocket ping interval and timeout: with ``usbipx.wslink.WS_CLOSE_TIMEOUT``, a
dead path is noticed within 17 s."""


@dataclass(frozen=True)
class Remote:
    """A peer to reach, and how: its URL, this end's TLS files, socket timers."""

    endpoint: Endpoint
    tls: TlsFiles | None = None
    keepalive: Keepalive = field(default=DEFAULT_KEEPALIVE)
    timeout: float = 10.0
    """Seconds for the connection and the TLS/WebSocket handshake."""
    reply_timeout: float = REPLY_TIMEOUT
    """Seconds for the reply, counted from when the request is sent: a peer (or
    this board) slowed by a busy CPU is slow, not dead."""
    data_path: DataPath = "auto"
    proxy: str | None = None
    """HTTP proxy for ``wss://`` (``http://[USER:PASS@]HOST:PORT``); None: from the
    environment (``https_proxy``, ``wss_proxy``, ``no_proxy``)."""
    ping: tuple[float, float] = DEFAULT_PING
    """``wss://`` ping interval and timeout, seconds."""

    def __post_init__(self) -> None:
        if self.endpoint.secure and self.tls is None:
            raise ConfigError(f"{self.endpoint.scheme}:// needs --cert, --key and --ca "
                              "(or USBIPX_CERT, USBIPX_KEY, USBIPX_CA)")
        if self.proxy is not None and self.endpoint.scheme != "wss":
            raise ConfigError("--proxy applies to wss:// only (tcp:// and tls:// do not "
                              "cross HTTP proxies)")

    @classmethod
    def tcp(cls, host: str, port: int, keepalive: Keepalive = DEFAULT_KEEPALIVE,
            timeout: float = 10.0) -> Remote:
        """Plain TCP to ``host:port``."""
        return cls(Endpoint("tcp", host, port), None, keepalive, timeout)

    @property
    def host(self) -> str:
        return self.endpoint.host

    @property
    def port(self) -> int:
        return self.endpoint.port

    def __str__(self) -> str:
        return self.endpoint.hostport if self.endpoint.scheme == "tcp" else str(self.endpoint)

    @property
    def label(self) -> str:
        """How messages name the peer: its host (plain TCP, as the C tools), else the URL."""
        return self.host if self.endpoint.scheme == "tcp" else str(self.endpoint)


@dataclass
class RelayStats:
    """Plaintext bytes a relay has moved each way."""

    to_network: int = 0
    to_kernel: int = 0


class Relayer(Protocol):
    """What carries an export's data in user space (:class:`~usbipx.relay.Relay`,
    :class:`~usbipx.wslink.WsRelay`): runs until either side ends, then closes both."""

    stats: RelayStats
    """What it has relayed so far (other threads may read it while it runs)."""

    def run(self, stop: threading.Event | None = None) -> str:
        """Relay until either side ends or ``stop`` is set; the reason it ended."""


@dataclass
class KernelPath:
    """What carries an export's data once the kernel has the connection."""

    transport: Transport
    relay: Relayer | None = None
    """The relay to run (``tls-relay``, ``wss-relay``)."""
