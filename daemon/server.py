"""The asyncio server shared by usbipd and usbipa.

It listens on one or more URLs (``tcp://`` as the C tools, ``tls://`` for
mutual TLS, served by :mod:`usbipx.daemon.tlsserve`, and ``wss://``, by
:mod:`usbipx.daemon.wsserve`).  Each connection carries one request.  The
server reads it with exact-size reads driven by the codec -- record-exact
under TLS -- never past the PDU: what follows belongs to the kernel once the
socket is handed over.  A plain handler function decides
(:mod:`usbipx.daemon.serving`); the server delivers the reply and the kernel
handoff in the order the transport needs, and then closes the outcome.
Handlers run on the event loop.  Over plain TCP the decision, the reply and
the handoff follow each other with no await between them; over TLS and wss
the reply is awaited, and the handler holds what it decided until the
outcome is closed (usbipa: the peer's bus id in flight).

A misbehaving client (junk, truncation, silence, oversize, a failed TLS
handshake) costs one log line and its connection, never the daemon.  Connections are admitted at
accept, before a byte is read: a peer the daemon's policy refuses is closed
at once, and caps on connections in all and per address keep one address
(or many idle connections) from taking every slot.  Requests must be complete
within ``request_timeout``, so slow and idle connections are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from usbipx.daemon.listen import Tally, listeners, times
from usbipx.daemon.serving import Handler, Outcome, Peer, settle
from usbipx.errors import ConfigError, ProtocolError, UsbipError
from usbipx.log import logger
from usbipx.net import DEFAULT_KEEPALIVE, Keepalive, tune_socket
from usbipx.protocol import Request, RequestDecoder
from usbipx.remote import DEFAULT_PING, DataPath
from usbipx.tlsconf import TlsFiles
from usbipx.tlsengine import TlsError
from usbipx.url import Endpoint

if TYPE_CHECKING:
    from usbipx.daemon.tlsserve import TlsServing
    from usbipx.daemon.wsserve import WssListener
    from usbipx.metrics import Metrics


@dataclass
class ServerConfig:
    """Listening options common to both daemons."""

    port: int = 3240
    ipv4: bool = True
    ipv6: bool = True
    bind_address: str | None = None
    request_timeout: float = 10.0
    max_connections: int = 256
    max_per_address: int = 64
    """Connections from one address at a time.  Generous: a board's supervisor exports
    all its devices at once, and many boards may share a NAT address."""
    keepalive: Keepalive = field(default_factory=lambda: DEFAULT_KEEPALIVE)
    listen: tuple[Endpoint, ...] = ()
    """Where to listen; empty: plain TCP on ``port`` (both families unless one is chosen)."""
    tls: TlsFiles | None = None
    """Certificate, key and CA for ``tls://`` listeners."""
    data_path: DataPath = "auto"
    """TLS data path: kernel TLS where it works, or forced."""
    handshake_timeout: float = 10.0
    ping: tuple[float, float] = DEFAULT_PING
    """``wss://`` ping interval and timeout: a dead path is noticed within their sum."""


_REASONS = {"peer": "network", "total": "connections", "address": "connections",
            "tls": "handshake", "identity": "identity", "path": "bad_request"}
"""The ``usbipx_refusals_total`` reason of each kind of refused connection."""

PeerPolicy = Callable[[str], str | None]
"""Why a peer address may not connect at all, or None if it may."""

_ACCEPT_BACKOFF = (0.05, 2.0)
"""First and longest pause after a failed accept() (doubling while it keeps failing)."""


class Server:
    """Accepts connections and dispatches one request each to ``handler``.

    ``refuse_peer`` (usbipa's policy) is asked about every connection's
    address at accept; a refused connection is closed before anything is read.
    """

    def __init__(self, name: str, handler: Handler, cfg: ServerConfig,
                 refuse_peer: PeerPolicy | None = None,
                 refuse_identity: PeerPolicy | None = None,
                 metrics: Metrics | None = None) -> None:
        self.name = name
        self.metrics = metrics
        """Refusals, handshake latency and relayed bytes are counted here (None: off)."""
        self.handler = handler
        self.cfg = cfg
        self.refuse_peer = refuse_peer
        self.refuse_identity = refuse_identity
        """Why a TLS peer's certificate identity may not be served (usbipa's policy)."""
        self.active = 0
        self.served = 0
        self.rejected = 0
        self._per_host: dict[str, int] = {}
        self._tally = Tally()
        self._stop = asyncio.Event()
        self._listeners: list[tuple[socket.socket, Endpoint]] = []
        self._wss: list[WssListener] = []
        self._failure: BaseException | None = None
        self._relays: set[threading.Event] = set()
        self._tls: TlsServing | None = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for s, _ in self._listeners]

    @property
    def listening(self) -> list[str]:
        """Each listener as a URL (``tls://0.0.0.0:3240``)."""
        out = []
        for s, ep in self._listeners:
            host, port = s.getsockname()[:2]
            out.append(str(replace(ep, host=host, port=port)))
        return out

    def _log_refusal(self, kind: str, host: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.refused(_REASONS[kind])
        if (n := self._tally.count(kind, host)) is not None:
            logger.warning("{}: refused connection from {}: {}{}", self.name, host, reason,
                           times(n))

    async def _read_request(self, conn: socket.socket) -> Request | None:
        loop = asyncio.get_running_loop()
        dec = RequestDecoder()
        while (req := dec.next_event()) is None:
            chunk = await loop.sock_recv(conn, dec.needed())
            if not chunk:
                if dec.pending:
                    raise ProtocolError(f"connection closed after {dec.pending} bytes")
                return None
            dec.receive_data(chunk)
        return req

    async def _request(self, read: Awaitable[Request | None], peer: Peer) -> Request | None:
        """The request, or None (logged) if it is late, malformed or never comes."""
        try:
            req = await asyncio.wait_for(read, self.cfg.request_timeout)
        except TimeoutError:
            self.rejected += 1
            if self.metrics is not None:
                self.metrics.refused("bad_request")
            logger.warning("{}: {}: no complete request within {:.0f} s", self.name,
                           peer.name, self.cfg.request_timeout)
            return None
        except (ProtocolError, TlsError) as exc:
            self.rejected += 1
            if self.metrics is not None:
                self.metrics.refused("bad_request")
            logger.warning("{}: {}: bad request: {}", self.name, peer.name, exc)
            return None
        if req is not None:
            logger.debug("{}: {}:{} sent {}", self.name, peer.name, peer.port, req)
        return req

    def _decide(self, req: Request, peer: Peer) -> Outcome | None:
        try:
            return self.handler(req, peer)
        except Exception as exc:  # a handler bug must not kill the daemon
            logger.exception("{}: handler failed for {}: {}", self.name, peer.name, exc)
            return None

    async def _serve_one(self, conn: socket.socket, peer: Peer, scheme: str) -> None:
        kept = False
        try:
            # The kernel may own the socket later: keepalive and NODELAY now,
            # while userspace still can.
            tune_socket(conn, self.cfg.keepalive)
            if scheme == "tls":
                assert self._tls is not None
                kept = await self._tls.serve(conn, peer)
            else:
                await self._serve_tcp(conn, peer)
        except OSError as exc:
            logger.debug("{}: {}: connection error: {}", self.name, peer.name, exc)
        finally:
            # After a handoff the kernel holds its own reference; closing our
            # descriptor does not end the connection (no shutdown()!).  A
            # relay keeps the connection: it closes it when the export ends.
            if not kept:
                conn.close()
            self.active -= 1
            left = self._per_host[peer.host] - 1
            if left:
                self._per_host[peer.host] = left
            else:
                del self._per_host[peer.host]

    async def _serve_tcp(self, conn: socket.socket, peer: Peer) -> None:
        req = await self._request(self._read_request(conn), peer)
        if req is None or (outcome := self._decide(req, peer)) is None:
            return
        try:
            self._carry_out_tcp(conn, peer, outcome)
        finally:
            outcome.close()

    def _carry_out_tcp(self, conn: socket.socket, peer: Peer, outcome: Outcome) -> None:
        conn.setblocking(True)  # the kernel expects a blocking socket
        first = outcome.reply_first and outcome.handoff is not None
        reply = outcome.reply if first else settle(outcome, conn.fileno(), "tcp")
        try:
            # A reply is at most a few hundred bytes per device: a blocking send
            # (with a timeout) has it on the wire when sendall returns.
            conn.settimeout(self.cfg.request_timeout)
            conn.sendall(reply.pack())
        except OSError as exc:
            logger.warning("{}: {}: cannot send reply: {}", self.name, peer.name, exc)
            if outcome.undo is not None and not first:
                outcome.undo()
            return
        finally:
            with contextlib.suppress(OSError):
                conn.settimeout(None)
        if first and settle(outcome, conn.fileno(), "tcp") is not outcome.reply:
            # Refused after the peer was told yes: closing the link tells it now
            # (its kernel sees the connection end and frees the device).
            logger.warning("{}: {}: the kernel refused the connection after the reply; "
                           "closing it", self.name, peer.name)
            return
        self.served += 1

    def _refusal(self, host: str) -> tuple[str, str] | None:
        """(kind, reason) if a connection from ``host`` may not be served now."""
        if self.refuse_peer is not None:
            reason = self.refuse_peer(host)
            if reason:
                return "peer", reason
        if self.active >= self.cfg.max_connections:
            return "total", f"limit of {self.cfg.max_connections} connections in all reached"
        if self._per_host.get(host, 0) >= self.cfg.max_per_address:
            return "address", (f"limit of {self.cfg.max_per_address} connections from one "
                               "address reached")
        return None

    def _admit(self, conn: socket.socket, addr: tuple[str, int]) -> Peer | None:
        """The connection's peer if it may be served; else close it at once."""
        host = addr[0]
        if host.startswith("::ffff:"):
            host = host[7:]
        try:
            refusal = self._refusal(host)
        except BaseException:
            conn.close()
            raise
        if refusal is None:
            self.active += 1
            self._per_host[host] = self._per_host.get(host, 0) + 1
            return Peer(host, addr[1])
        conn.close()
        kind, reason = refusal
        self._log_refusal(kind, host, reason)
        return None

    async def _accept_loop(self, lsock: socket.socket, scheme: str) -> None:
        """Accept until the listener is closed.  A failed accept() (an aborted
        connection, no descriptors or memory, a firewall's EPERM...) is logged
        and retried after a pause that grows while it keeps failing."""
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        pause = _ACCEPT_BACKOFF[0]
        while True:
            try:
                conn, addr = await loop.sock_accept(lsock)
            except OSError as exc:
                if lsock.fileno() < 0:
                    return  # closed: the server is stopping
                logger.error("{}: accept failed: {}; retrying in {:.2f} s", self.name,
                             exc.strerror or exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, _ACCEPT_BACKOFF[1])
                continue
            pause = _ACCEPT_BACKOFF[0]
            peer = self._admit(conn, addr)
            if peer is None:
                continue
            conn.setblocking(False)
            t = loop.create_task(self._serve_one(conn, peer, scheme))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

    def _accept_ended(self, task: asyncio.Task[None]) -> None:
        """An accept loop only ends when its listener is closed; anything else is a bug
        that must not leave a daemon running that serves no one."""
        if task.cancelled() or task.exception() is None:
            return
        self._failure = task.exception()
        logger.critical("{}: accept loop failed: {!r}; stopping", self.name, self._failure)
        self._stop.set()

    def open(self) -> None:
        """Bind the listening sockets (raises a clear error if the port is taken).

        Does nothing if they are bound already."""
        if self._listeners:
            return
        if any(ep.secure for ep in self.cfg.listen) and self.cfg.tls is None:
            raise ConfigError("tls:// and wss:// listeners need --cert, --key and --ca "
                              "(or USBIPX_CERT, USBIPX_KEY, USBIPX_CA)")
        if any(ep.scheme == "tls" for ep in self.cfg.listen):
            from usbipx import ktls
            from usbipx.daemon.tlsserve import TlsServing
            from usbipx.tlsconf import server_context

            assert self.cfg.tls is not None
            self._tls = TlsServing(self, server_context(self.cfg.tls))
            if self.cfg.data_path != "relay":
                ktls.preload()  # the first handoff must not wait for modules to load
        cfg = self.cfg
        self._listeners = listeners(cfg.listen, cfg.port, cfg.ipv4, cfg.ipv6, cfg.bind_address)

    def close(self) -> None:
        """Close the listening sockets of a server that will not run."""
        for s, _ in self._listeners:
            s.close()
        self._listeners = []

    def stop(self) -> None:
        self._stop.set()
        for relay in list(self._relays):
            relay.set()  # a relayed export cannot outlive the process that relays it

    async def run(self, ready: Callable[[Server], None] | None = None) -> None:
        """Serve until :meth:`stop` or SIGTERM/SIGINT."""
        self.open()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        accepts = [loop.create_task(self._accept_loop(s, ep.scheme))
                   for s, ep in self._listeners if ep.scheme != "wss"]
        for s, ep in self._listeners:
            if ep.scheme == "wss":
                from usbipx.daemon.wsserve import WssListener

                wss = WssListener(self, s, ep)
                await wss.start()
                self._wss.append(wss)
        for t in accepts:
            t.add_done_callback(self._accept_ended)
        for url in self.listening:
            logger.info("{} listening on {}", self.name, url)
        if ready is not None:
            ready(self)
        try:
            await self._stop.wait()
        finally:
            for t in accepts:
                t.cancel()
            for wss in self._wss:
                await wss.aclose()
            self.close()
            self.stop()
            logger.info("{} stopped", self.name)
        if self._failure is not None:
            raise UsbipError(f"{self.name}: accept loop failed: {self._failure}")
