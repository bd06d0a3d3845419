"""The asyncio server shared by usbipd and usbipa.

Each connection carries one request.  The server reads it with exact-size
``sock_recv`` calls driven by the codec (never past the PDU: what follows
belongs to the kernel once the socket is handed over), passes it to a plain
handler function, and sends the handler's reply.  Handlers run
synchronously on the event loop, so they are serialised: two exports never
race for the same vhci port inside one daemon.

A misbehaving client (junk, truncation, silence, oversize) costs one log
line and its connection, never the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
from collections.abc import Callable, Iterator
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


class Server:
    """Accepts connections and dispatches one request each to ``handler``."""

    def __init__(self, name: str, handler: Handler, cfg: ServerConfig) -> None:
        self.name = name
        self.handler = handler
        self.cfg = cfg
        self.active = 0
        self.served = 0
        self.rejected = 0
        self._stop = asyncio.Event()
        self._listeners: list[socket.socket] = []

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for s in self._listeners]

    async def _read_request(self, conn: socket.socket) -> Request | None:
        loop = asyncio.get_running_loop()
        dec = RequestDecoder()
        while (req := dec.next_event()) is None:
            chunk = await loop.sock_recv(conn, dec.needed())
            if not chunk:
                if dec.unconsumed:
                    raise ProtocolError(f"connection closed after {len(dec.unconsumed)} bytes")
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

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        while True:
            try:
                conn, addr = await loop.sock_accept(lsock)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    logger.error("{}: out of file descriptors; pausing accept", self.name)
                    await asyncio.sleep(0.5)
                    continue
                raise
            if self.active >= self.cfg.max_connections:
                logger.warning("{}: too many connections; dropping {}", self.name, addr[0])
                conn.close()
                continue
            conn.setblocking(False)
            self.active += 1
            host = addr[0]
            if host.startswith("::ffff:"):
                host = host[7:]
            t = loop.create_task(self._serve_one(conn, Peer(host, addr[1])))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

    def open(self) -> None:
        """Bind the listening sockets (raises a clear error if the port is taken)."""
        self._listeners = _listeners(self.cfg)

    def stop(self) -> None:
        self._stop.set()

    async def run(self, ready: Callable[[Server], None] | None = None) -> None:
        """Serve until :meth:`stop` or SIGTERM/SIGINT."""
        if not self._listeners:
            self.open()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        accepts = [loop.create_task(self._accept_loop(s)) for s in self._listeners]
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


def daemonize() -> None:
    """Detach from the terminal (double fork, new session, stdio to /dev/null)."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


@contextlib.contextmanager
def pid_file(path: str | None) -> Iterator[None]:
    """Write our pid to ``path`` for the daemon's lifetime."""
    if not path:
        yield
        return
    with open(path, "w") as fh:
        fh.write(f"{os.getpid()}\n")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
