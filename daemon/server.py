"""The asyncio server shared by usbipd and usbipa.

Each connection carries one request.  The server reads it with exact-size
``sock_recv`` calls driven by the codec (never past the PDU: what follows
belongs to the kernel once the socket is handed over), passes it to a plain
handler function, and sends the handler's reply.  Handlers run
synchronously on the event loop, so they are serialised: two exports never
race for the same vhci port inside one daemon.

A misbehaving client (junk, truncation, silence, oversize) costs one log
line and its connection, never the daemon.  Connections are admitted at
accept, before a byte is read: a peer the daemon's policy refuses is closed
at once, and caps on connections in all and per address keep one address
(or many idle connections) from taking every slot.  Requests must be complete
within ``request_timeout``, so slow and idle connections are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from loguru import logger

from usbipx.errors import ProtocolError, UsbipError
from usbipx.net import DEFAULT_KEEPALIVE, Keepalive, tune_socket
from usbipx.protocol import Reply, Request, RequestDecoder


@dataclass(frozen=True)
class Peer:
    """The remote end of a connection."""

    host: str
    port: int


@dataclass
class Outcome:
    """What a handler decided: the reply, and how to undo its kernel action
    if the reply cannot be delivered."""

    reply: Reply
    undo: Callable[[], None] | None = None


Handler = Callable[[Request, Peer, socket.socket], Outcome]


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


def _listeners(cfg: ServerConfig) -> list[socket.socket]:
    families: list[tuple[socket.AddressFamily, str]] = []
    if cfg.bind_address:
        infos = socket.getaddrinfo(cfg.bind_address, cfg.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        families = [(info[0], str(info[4][0])) for info in infos[:1]]
    else:
        if cfg.ipv4:
            families.append((socket.AF_INET, "0.0.0.0"))
        if cfg.ipv6 and socket.has_ipv6:
            families.append((socket.AF_INET6, "::"))
    socks: list[socket.socket] = []
    for fam, addr in families:
        s = socket.socket(fam, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                # One socket per family, as usbipd does.
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr, cfg.port))
            s.listen(128)
            s.setblocking(False)
        except OSError as exc:
            s.close()
            if fam == socket.AF_INET6 and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                logger.warning("IPv6 unavailable ({}); listening on IPv4 only", exc.strerror)
                continue
            for other in socks:
                other.close()
            raise UsbipError(f"cannot listen on {addr} port {cfg.port}: {exc.strerror}") from exc
        socks.append(s)
    if not socks:
        raise UsbipError("no address family to listen on")
    return socks


PeerPolicy = Callable[[str], str | None]
"""Why a peer address may not connect at all, or None if it may."""

_ACCEPT_BACKOFF = (0.05, 2.0)
"""First and longest pause after a failed accept() (doubling while it keeps failing)."""


class _Tally:
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


def _times(n: int) -> str:
    return "" if n == 1 else f" (connection {n} refused so far)"


class Server:
    """Accepts connections and dispatches one request each to ``handler``.

    ``refuse_peer`` (usbipa's policy) is asked about every connection's
    address at accept; a refused connection is closed before anything is read.
    """

    def __init__(self, name: str, handler: Handler, cfg: ServerConfig,
                 refuse_peer: PeerPolicy | None = None) -> None:
        self.name = name
        self.handler = handler
        self.cfg = cfg
        self.refuse_peer = refuse_peer
        self.active = 0
        self.served = 0
        self.rejected = 0
        self._per_host: dict[str, int] = {}
        self._tally = _Tally()
        self._stop = asyncio.Event()
        self._listeners: list[socket.socket] = []
        self._failure: BaseException | None = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for s in self._listeners]

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

    async def _serve_one(self, conn: socket.socket, peer: Peer) -> None:
        try:
            try:
                req = await asyncio.wait_for(self._read_request(conn), self.cfg.request_timeout)
            except TimeoutError:
                self.rejected += 1
                logger.warning("{}: {}: no complete request within {:.0f} s", self.name,
                               peer.host, self.cfg.request_timeout)
                return
            except ProtocolError as exc:
                self.rejected += 1
                logger.warning("{}: {}: bad request: {}", self.name, peer.host, exc)
                return
            if req is None:
                return
            logger.debug("{}: {}:{} sent {}", self.name, peer.host, peer.port, req)
            # The kernel will own the socket: give it blocking mode and the
            # keepalive/NODELAY options now, while userspace still can.
            conn.setblocking(True)
            tune_socket(conn, self.cfg.keepalive)
            try:
                outcome = self.handler(req, peer, conn)
            except Exception as exc:  # a handler bug must not kill the daemon
                logger.exception("{}: handler failed for {}: {}", self.name, peer.host, exc)
                return
            try:
                # A reply is at most a few hundred bytes per device; a blocking
                # send (with a timeout) keeps it ahead of any kernel traffic.
                conn.settimeout(self.cfg.request_timeout)
                conn.sendall(outcome.reply.pack())
            except OSError as exc:
                logger.warning("{}: {}: cannot send reply: {}", self.name, peer.host, exc)
                if outcome.undo is not None:
                    outcome.undo()
                return
            finally:
                with contextlib.suppress(OSError):
                    conn.settimeout(None)
            self.served += 1
        except OSError as exc:
            logger.debug("{}: {}: connection error: {}", self.name, peer.host, exc)
        finally:
            # After a handoff the kernel holds its own reference; closing our
            # descriptor does not end the connection (no shutdown()!).
            conn.close()
            self.active -= 1
            left = self._per_host[peer.host] - 1
            if left:
                self._per_host[peer.host] = left
            else:
                del self._per_host[peer.host]

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
        if (n := self._tally.count(kind, host)) is not None:
            logger.warning("{}: refused connection from {}: {}{}", self.name, host, reason,
                           _times(n))
        return None

    async def _accept_loop(self, lsock: socket.socket) -> None:
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
            t = loop.create_task(self._serve_one(conn, peer))
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
        if not self._listeners:
            self._listeners = _listeners(self.cfg)

    def close(self) -> None:
        """Close the listening sockets of a server that will not run."""
        for s in self._listeners:
            s.close()
        self._listeners = []

    def stop(self) -> None:
        self._stop.set()

    async def run(self, ready: Callable[[Server], None] | None = None) -> None:
        """Serve until :meth:`stop` or SIGTERM/SIGINT."""
        self.open()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        accepts = [loop.create_task(self._accept_loop(s)) for s in self._listeners]
        for t in accepts:
            t.add_done_callback(self._accept_ended)
        for host, port in self.addresses:
            logger.info("{} listening on {} port {}", self.name, host, port)
        if ready is not None:
            ready(self)
        try:
            await self._stop.wait()
        finally:
            for t in accepts:
                t.cancel()
            for s in self._listeners:
                s.close()
            logger.info("{} stopped", self.name)
        if self._failure is not None:
            raise UsbipError(f"{self.name}: accept loop failed: {self._failure}")
