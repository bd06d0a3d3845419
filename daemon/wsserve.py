"""``wss://`` listeners: USB/IP over a secure WebSocket, the daemon side.

The ``websockets`` package serves the listening socket: mutual TLS (the
daemon's certificate, client certificates required), the HTTP upgrade on
one path (anything else -- a plain HTTP request, another path -- gets an
HTTP error status), ping/pong keepalive, size and time limits on the
handshake.  A connection carries one USB/IP request in binary messages;
its outcome is handed to the kernel through a socketpair, and this daemon
relays between that socketpair and the WebSocket until either ends.  A
dead path (no pong) ends the relay, and the kernel sees its connection end.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from usbipx.daemon.serving import Peer
from usbipx.errors import ProtocolError
from usbipx.log import logger
from usbipx.protocol import Request, RequestDecoder
from usbipx.wslink import CHUNK, MAX_MESSAGE, WS_CLOSE_TIMEOUT

if TYPE_CHECKING:
    from websockets.asyncio.server import Server as WsServer
    from websockets.asyncio.server import ServerConnection
    from websockets.http11 import Request as HttpRequest
    from websockets.http11 import Response

    from usbipx.daemon.server import Server
    from usbipx.url import Endpoint


class WssListener:
    """One ``wss://ADDR:PORT/PATH`` listener of a :class:`~usbipx.daemon.server.Server`."""

    def __init__(self, server: Server, sock: socket.socket, endpoint: Endpoint) -> None:
        self.server = server
        self.sock = sock
        self.path = endpoint.path
        self.active: dict[str, int] = {}
        self._ws: WsServer | None = None
        self._relays: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        from websockets.asyncio.server import serve

        from usbipx.tlsconf import server_context

        cfg = self.server.cfg
        assert cfg.tls is not None
        interval, timeout = cfg.ping
        self._ws = await serve(
            self._connection, sock=self.sock, ssl=server_context(cfg.tls),
            process_request=self._admit, open_timeout=cfg.handshake_timeout,
            ping_interval=interval, ping_timeout=timeout, close_timeout=WS_CLOSE_TIMEOUT,
            max_size=MAX_MESSAGE, compression=None, server_header="usbipx", logger=_QUIET,
            create_connection=_timed_connection())

    async def aclose(self) -> None:
        """Stop listening and end every connection and relay of this listener."""
        for task in self._relays:
            task.cancel()
        if self._ws is not None:
            self._ws.close()
            await self._ws.wait_closed()

    def _admit(self, conn: ServerConnection, request: HttpRequest) -> Response | None:
        """Before the upgrade: the path, the peer's address, the connection caps."""
        host = _host(conn)
        if request.path != self.path:
            self.server.rejected += 1
            self.server._log_refusal("path", host, f"wrong path {request.path[:80]!r}")
            return conn.respond(HTTPStatus.NOT_FOUND, "no USB/IP here\n")
        refusal = self.server._refusal(host)
        if refusal is not None:
            kind, reason = refusal
            self.server._log_refusal(kind, host, reason)
            return conn.respond(HTTPStatus.FORBIDDEN if kind == "peer"
                                else HTTPStatus.SERVICE_UNAVAILABLE, f"{reason}\n")
        return None

    async def _connection(self, ws: ServerConnection) -> None:
        from usbipx.identity import peer_identity

        srv = self.server
        host, port = _host(ws), int(ws.remote_address[1])
        identity = peer_identity(ws.transport.get_extra_info("peercert"))
        refused = ("its certificate names no usable identity" if identity is None
                   else srv.refuse_identity(identity) if srv.refuse_identity else None)
        if refused is not None or identity is None:
            srv.rejected += 1
            srv._log_refusal("identity", host, f"refused {identity}: {refused}")
            await ws.close(1008, "refused")
            return
        accepted = getattr(ws, "accepted", None)
        if srv.metrics is not None and accepted is not None:
            srv.metrics.handshake.labels("wss").observe(time.monotonic() - accepted)
        peer = Peer(host, port, identity, "wss")
        srv.active += 1
        srv._per_host[host] = srv._per_host.get(host, 0) + 1
        try:
            await self._serve(ws, peer)
        finally:
            srv.active -= 1
            left = srv._per_host[host] - 1
            if left:
                srv._per_host[host] = left
            else:
                del srv._per_host[host]

    async def _serve(self, ws: ServerConnection, peer: Peer) -> None:
        from websockets.exceptions import ConnectionClosed

        srv = self.server
        req = await srv._request(self._read_request(ws), peer)
        if req is None or (outcome := srv._decide(req, peer)) is None:
            return
        try:
            if outcome.handoff is None:
                await ws.send(outcome.reply.pack())
                srv.served += 1
                return
            from usbipx.relay import relay_pair

            kernel_end, relay_end = relay_pair()
            try:
                failed = outcome.handoff(kernel_end.fileno(), "wss-relay")
            finally:
                kernel_end.close()  # the kernel holds its own reference
            try:
                await ws.send((failed or outcome.reply).pack())
            except ConnectionClosed:
                if failed is None and outcome.undo is not None:
                    outcome.undo()
                relay_end.close()
                return
            if failed is not None:
                relay_end.close()
                return
            srv.served += 1
            task = asyncio.current_task()
            assert task is not None
            self._relays.add(task)
            try:
                why = await relay(ws, relay_end,
                                  srv.metrics.relayed if srv.metrics is not None else None)
            finally:
                self._relays.discard(task)
            logger.info("{}: relay for {} ended: {}", srv.name, peer.name, why)
        except ConnectionClosed as exc:
            logger.info("{}: {}: connection closed: {}", srv.name, peer.name, exc)
        finally:
            outcome.close()

    async def _read_request(self, ws: ServerConnection) -> Request | None:
        dec = RequestDecoder()
        while (req := dec.next_event()) is None:
            msg = await ws.recv()
            if isinstance(msg, str):
                await ws.close(1003, "binary messages only")
                raise ProtocolError("a text message instead of binary")
            dec.receive_data(msg)
        if dec.pending:
            raise ProtocolError("more than one request")
        return req


async def relay(ws: ServerConnection, sock: socket.socket,
                meter: Callable[[str, int], None] | None = None) -> str:
    """Pump ``sock`` (the kernel's socketpair end) to and from ``ws`` until either ends;
    then close both.  The reason it ended.  ``meter`` is told
    ``("to_network" | "to_kernel", nbytes)`` as data moves (metrics)."""
    from websockets.exceptions import ConnectionClosed

    loop = asyncio.get_running_loop()
    sock.setblocking(False)

    async def to_kernel() -> str:
        try:
            async for msg in ws:
                if isinstance(msg, str):
                    return "the peer sent a text message"
                await loop.sock_sendall(sock, msg)
                if meter is not None:
                    meter("to_kernel", len(msg))
        except ConnectionClosed as exc:
            return f"peer closed ({exc})"
        return "peer closed"

    async def to_network() -> str:
        try:
            while data := await loop.sock_recv(sock, CHUNK):
                await ws.send(data)
                if meter is not None:
                    meter("to_network", len(data))
        except ConnectionClosed as exc:
            return f"peer closed ({exc})"
        return "kernel side closed"

    tasks = [asyncio.ensure_future(to_kernel()), asyncio.ensure_future(to_network())]
    why = "stopped"
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        why = next(iter(done)).result()
    except OSError as exc:
        why = f"kernel side error: {exc.strerror or exc}"
    finally:
        for t in tasks:
            t.cancel()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        with contextlib.suppress(Exception):
            await ws.close()
    return why


def _timed_connection() -> type[ServerConnection]:
    """websockets' connection, knowing when it was accepted: the protocol object is made
    at accept, before the TLS handshake, so the wss handshake (TLS and HTTP upgrade)
    lasts from then until the handler runs."""
    from websockets.asyncio.server import ServerConnection

    class Timed(ServerConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.accepted = time.monotonic()

    return Timed


def _host(conn: ServerConnection) -> str:
    host = str(conn.remote_address[0])
    return host[7:] if host.startswith("::ffff:") else host


class _Debug:
    """websockets' own logger, as loguru debug lines (``--debug``): a flood of bad
    handshakes must not flood the log, and refusals are logged once by us."""

    def _log(self, msg: object, *args: Any, **kw: Any) -> None:
        with contextlib.suppress(Exception):
            logger.debug("websockets: {}", str(msg) % args if args else msg)

    debug = info = warning = error = exception = _log

    def log(self, level: int, msg: object, *args: Any, **kw: Any) -> None:
        self._log(msg, *args)

    def isEnabledFor(self, level: int) -> bool:
        return True


_QUIET: Any = _Debug()

