"""USB/IP over a secure WebSocket (``wss://``), the client side: through HTTP proxies.

Networks that let nothing out but HTTPS usually do it through a proxy.
:func:`open_wss` dials ``wss://HOST[:PORT]/PATH`` with the ``websockets``
package -- mutual TLS with this board's certificate, through an HTTP proxy
(CONNECT, with credentials if the proxy URL has them) given as ``--proxy``
or found in ``https_proxy``/``wss_proxy`` (``no_proxy`` respected).  USB/IP
bytes travel in binary messages.  The data path is always a relay
(:class:`WsRelay`): a socketpair end goes to the kernel, the relay pumps the
other end to the WebSocket.

Through a proxy, TCP keepalive watches only the hop to the proxy; the
WebSocket's own ping/pong (``ping``: interval and timeout) notices a dead
path end to end and ends the relay, which ends the export on both sides.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from usbipx.errors import ProtocolError, UsbipError
from usbipx.log import logger
from usbipx.protocol import Reply, ReplyDecoder, Request
from usbipx.remote import KernelPath, RelayStats

if TYPE_CHECKING:
    from websockets.sync.client import ClientConnection

    from usbipx.remote import Remote

MAX_MESSAGE = 1 << 20
"""Largest WebSocket message taken (a relay sends at most 64 KiB at a time)."""
CHUNK = 65536
WS_CLOSE_TIMEOUT = 2.0
"""How long a WebSocket waits for the peer's close frame.  After a failed
keepalive the path is dead and this wait is pure delay (websockets' default is
10 s, which would push loss detection past 20 s); a live peer answers in one
round trip."""


class WsLink:
    """A WebSocket connection to a usbipx daemon, good for one request, then a relay."""

    def __init__(self, remote: Remote, ws: ClientConnection) -> None:
        self.remote = remote
        self.ws = ws
        self.relayed = False

    def request(self, req: Request) -> Reply:
        """Send ``req`` as one binary message; read messages until its reply is whole."""
        from websockets.exceptions import ConnectionClosed

        deadline = time.monotonic() + self.remote.reply_timeout
        dec = ReplyDecoder(req)
        try:
            self.ws.send(req.pack())
            while (rep := dec.next_event()) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                msg = self.ws.recv(timeout=left)
                if isinstance(msg, str):
                    raise ProtocolError(f"{self.remote} sent a text message")
                dec.receive_data(msg)
        except TimeoutError:
            raise UsbipError(f"no reply from {self.remote} within "
                             f"{self.remote.reply_timeout:.0f} s") from None
        except ConnectionClosed as exc:
            raise UsbipError(f"{self.remote} closed the connection ({exc})") from None
        if dec.pending:
            raise ProtocolError(f"{self.remote} sent more than its reply")
        return rep

    def hand_to_kernel(self, give: Callable[[int], None]) -> KernelPath:
        """Give the kernel one end of a socketpair with ``give(fd)``; the relay that
        pumps the other end to this WebSocket must then run as long as the export."""
        from usbipx.relay import relay_pair

        if self.remote.data_path == "ktls":
            raise UsbipError("wss:// data always goes through a relay; --tls-data ktls "
                             "applies to tls://")
        kernel_end, relay_end = relay_pair()
        try:
            give(kernel_end.fileno())
        except BaseException:
            relay_end.close()
            raise
        finally:
            kernel_end.close()  # the kernel holds its own reference now
        self.relayed = True
        return KernelPath("wss-relay", WsRelay(relay_end, self.ws, str(self.remote)))

    def close(self) -> None:
        if not self.relayed:
            with contextlib.suppress(Exception):
                self.ws.close()


class WsRelay:
    """Pumps a socketpair end (the kernel's other end) to and from a WebSocket.

    Runs until either side ends, then closes both: the kernel sees its
    connection end (no stuck vhci port or usbip-host device), the peer sees
    the WebSocket close.  The WebSocket's pings end it on a dead path.
    """

    def __init__(self, kernel_side: socket.socket, ws: ClientConnection, name: str = "") -> None:
        self.kernel_side = kernel_side
        self.ws = ws
        self.name = name
        self.stats = RelayStats()
        self._why = ""
        self._done = threading.Event()

    def _end(self, why: str) -> None:
        if not self._done.is_set():
            self._why = why
            self._done.set()

    def _to_network(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            while data := self.kernel_side.recv(CHUNK):
                self.ws.send(data)
                self.stats.to_network += len(data)
            self._end("kernel side closed")
        except ConnectionClosed as exc:
            self._end(f"peer closed ({exc})")
        except OSError as exc:
            self._end(f"kernel side error: {exc.strerror or exc}")

    def _to_kernel(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            for msg in self.ws:
                if isinstance(msg, str):
                    self._end("the peer sent a text message")
                    return
                self.kernel_side.sendall(msg)
                self.stats.to_kernel += len(msg)
            self._end("peer closed")
        except ConnectionClosed as exc:
            self._end(f"peer closed ({exc})")
        except OSError as exc:
            self._end(f"kernel side error: {exc.strerror or exc}")

    def run(self, stop: threading.Event | None = None) -> str:
        """Relay until either side ends (or ``stop`` is set); close both; the reason."""
        threads = [threading.Thread(target=f, daemon=True, name=f"ws {self.name}")
                   for f in (self._to_network, self._to_kernel)]
        for t in threads:
            t.start()
        while not self._done.wait(0.2):
            if stop is not None and stop.is_set():
                self._end("stopped")
        with contextlib.suppress(OSError):
            self.kernel_side.shutdown(socket.SHUT_RDWR)
        self.kernel_side.close()
        with contextlib.suppress(Exception):
            self.ws.close()
        for t in threads:
            t.join(5)
        logger.debug("wss relay {} ended: {}", self.name, self._why)
        return self._why


def preload() -> None:
    """Import now what :func:`open_wss` and a :class:`WsLink` import on first use
    (see :func:`usbipx.transport.preload`)."""
    import websockets.exceptions
    import websockets.sync.client  # noqa: F401

    import usbipx.relay
    import usbipx.tlsconf  # noqa: F401


def open_wss(remote: Remote) -> WsLink:
    """Dial ``remote`` (a ``wss://`` endpoint): proxy, TLS, WebSocket upgrade."""
    from websockets.exceptions import (
        ConnectionClosed,
        InvalidHandshake,
        InvalidProxy,
        InvalidProxyStatus,
        InvalidStatus,
        InvalidURI,
    )
    from websockets.sync.client import connect

    from usbipx.net import tune_socket
    from usbipx.tlsconf import client_context

    assert remote.tls is not None
    ep = remote.endpoint
    uri = f"wss://{ep.hostport}{ep.path}"
    interval, timeout = remote.ping
    try:
        ws = connect(uri, ssl=client_context(remote.tls), proxy=remote.proxy or True,
                     open_timeout=remote.timeout, ping_interval=interval,
                     ping_timeout=timeout, close_timeout=WS_CLOSE_TIMEOUT,
                     max_size=MAX_MESSAGE, compression=None,
                     user_agent_header="usbipx", legacy=True)
    except InvalidProxyStatus as exc:
        raise UsbipError(f"{remote}: the proxy refused the connection (HTTP "
                         f"{exc.response.status_code} {exc.response.reason_phrase})") from None
    except InvalidProxy as exc:
        raise UsbipError(f"{remote}: bad proxy: {exc}") from None
    except InvalidStatus as exc:
        raise UsbipError(f"{remote}: the server answered HTTP "
                         f"{exc.response.status_code} to the WebSocket upgrade") from None
    except (InvalidHandshake, InvalidURI) as exc:
        raise UsbipError(f"{remote}: WebSocket handshake failed: {exc}") from None
    except ConnectionClosed:
        # TLS 1.3: the server checks our certificate after our side of the
        # handshake is done, and hangs up.
        raise UsbipError(f"{remote}: the server closed the connection during the "
                         "handshake (is this board's certificate one it trusts?)") from None
    except TimeoutError:
        raise UsbipError(f"{remote}: no WebSocket connection within "
                         f"{remote.timeout:.0f} s") from None
    except OSError as exc:
        raise UsbipError(f"cannot connect to {remote}: {_why(exc)}") from None
    with contextlib.suppress(OSError):
        tune_socket(ws.socket, remote.keepalive)
    return WsLink(remote, ws)


def _why(exc: OSError) -> str:
    import ssl

    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    return exc.strerror or str(exc)
