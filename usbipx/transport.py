"""Client links: a connection to a peer by URL, one USB/IP request, then the kernel's.

:func:`open_link` dials a :class:`Remote` -- plain TCP, or mutual TLS -- and
returns a :class:`Link` ready for one request.  :meth:`Link.hand_to_kernel`
then gives the connection to the kernel through the callable the caller
passes (``usbip_sockfd`` or vhci's ``attach``) and says what carries the
data from then on (:class:`KernelPath`):

* ``tcp`` -- the socket itself, as the C tools do;
* ``ktls`` -- the TLS socket itself with the record keys installed in the
  kernel (kernel TLS): the kernel encrypts, nothing runs in user space;
* ``tls-relay`` -- one end of a socketpair, the other end pumped to the TLS
  connection by a :class:`~usbipx.relay.Relay` that the caller must run for
  as long as the export lives (a background process for a one-shot command,
  the worker itself in the supervisor).

Every socket gets keepalive and TCP_USER_TIMEOUT before anything else, so a
dead link is noticed whichever path carries the data.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from usbipx.errors import ProtocolError, UsbipError
from usbipx.log import logger
from usbipx.net import connect, request
from usbipx.protocol import Reply, ReplyDecoder, Request
from usbipx.remote import KernelPath, Remote

if TYPE_CHECKING:
    from usbipx.tlsengine import TlsEngine
    from usbipx.url import Endpoint
    from usbipx.wslink import WsLink

class Link:
    """One connection to a peer, good for one request and then for the kernel."""

    def __init__(self, remote: Remote, sock: socket.socket,
                 engine: TlsEngine | None = None) -> None:
        self.remote = remote
        self.sock = sock
        self.engine = engine
        self.relayed = False

    def request(self, req: Request) -> Reply:
        """Send ``req`` and read exactly its reply, not one byte (or record) more, within
        the remote's reply timeout from now."""
        if self.engine is None:
            return request(self.sock, req, self.remote.reply_timeout)
        from usbipx.tlsengine import TlsError
        from usbipx.tlsio import recv_blocking, send_blocking

        deadline = time.monotonic() + self.remote.reply_timeout
        try:
            send_blocking(self.sock, self.engine, req.pack(), deadline)
            dec = ReplyDecoder(req)
            while (rep := dec.next_event()) is None:
                data = recv_blocking(self.sock, self.engine, deadline)
                if data:
                    dec.receive_data(data)
        except TlsError as exc:
            raise UsbipError(f"{self.remote}: {exc}") from exc
        except OSError as exc:
            raise UsbipError(f"connection to {self.remote} failed: {exc.strerror or exc}") \
                from exc
        if dec.pending:
            raise ProtocolError(f"{self.remote} sent more than its reply")
        return rep

    def hand_to_kernel(self, give: Callable[[int], None]) -> KernelPath:
        """Give the connection to the kernel with ``give(fd)``; what carries it now.

        For TLS: kernel TLS if the remote's ``data_path`` allows it and it can be
        installed, else a relay socketpair.  If ``give`` raises, nothing is left
        behind (the caller closes the link).
        """
        self.sock.settimeout(None)  # the kernel expects a blocking socket
        if self.engine is None:
            give(self.sock.fileno())
            return KernelPath("tcp")
        from usbipx import ktls
        from usbipx.relay import Relay, relay_pair

        engine = self.engine
        if self.remote.data_path != "relay":
            try:
                # The ULP first: if the kernel refuses it (no tls module), the
                # engine has not given up its keys and the relay can take over.
                ktls.attach(self.sock)
                tx, rx = engine.kernel_crypto()
            except ktls.KtlsUnavailable as exc:
                if self.remote.data_path == "ktls":
                    raise
                logger.info("kernel TLS unavailable ({}); relaying in user space", exc)
            else:
                ktls.install(self.sock, tx, rx)
                give(self.sock.fileno())
                return KernelPath("ktls")
        kernel_end, relay_end = relay_pair()
        try:
            give(kernel_end.fileno())
        except BaseException:
            relay_end.close()
            raise
        finally:
            kernel_end.close()  # the kernel holds its own reference now
        self.relayed = True  # the relay owns the connection now
        return KernelPath("tls-relay", Relay(relay_end, self.sock, engine,
                                             name=str(self.remote)))

    def close(self) -> None:
        """Close our descriptor: the kernel keeps the connection alive on its own
        reference.  A relay's connection is the relay's to close."""
        if not self.relayed:
            self.sock.close()


def preload(endpoint: Endpoint) -> None:
    """Import now what reaching ``endpoint`` imports on first use.

    The imports stay lazy so that a plain TCP command loads no TLS; a supervisor
    calls this before forking, so that its workers share these modules instead
    of each importing its own copy.
    """
    # socket encodes a str host with the idna codec, which imports stringprep
    # and unicodedata on first use.
    import encodings.idna  # noqa: F401

    if endpoint.scheme == "wss":
        from usbipx import wslink

        wslink.preload()
    elif endpoint.secure:
        import usbipx.relay
        import usbipx.tlsconf
        import usbipx.tlsio  # noqa: F401


def open_link(remote: Remote) -> Link | WsLink:
    """Connect to ``remote`` (TCP, then the TLS handshake for ``tls://``; proxy, TLS and
    the WebSocket upgrade for ``wss://``)."""
    if remote.endpoint.scheme == "wss":
        from usbipx.wslink import open_wss

        return open_wss(remote)
    deadline = time.monotonic() + remote.timeout
    sock = connect(remote.host, remote.port, timeout=remote.timeout, keepalive=remote.keepalive)
    if not remote.endpoint.secure:
        return Link(remote, sock)
    from usbipx.tlsconf import client_context
    from usbipx.tlsengine import TlsEngine, TlsError
    from usbipx.tlsio import handshake_blocking

    assert remote.tls is not None
    try:
        engine = TlsEngine(client_context(remote.tls), server_side=False,
                           server_hostname=remote.host)
        handshake_blocking(sock, engine, deadline)
    except TlsError as exc:
        sock.close()
        raise UsbipError(f"{remote}: {exc}") from exc
    except BaseException:
        sock.close()
        raise
    return Link(remote, sock, engine)
