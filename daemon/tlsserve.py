"""``tls://`` listeners: mutual TLS, the daemon side.

The handshake runs in user space (:class:`~usbipx.tlsengine.TlsEngine`, with
a deadline), then the peer's certificate identity is checked, then the one
USB/IP request is read record-exactly.  The reply and the kernel handoff go
in the order the data path needs: kernel TLS where it works (the reply is
the last record user space encrypts, then the keys go to the kernel), else
a relay thread between a socketpair the kernel holds and the TLS connection
(handoff first, so that a kernel refusal still reaches the peer).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from usbipx.daemon.serving import Outcome, Peer
from usbipx.errors import ProtocolError
from usbipx.log import logger
from usbipx.protocol import Request, RequestDecoder
from usbipx.tlsengine import TlsError

if TYPE_CHECKING:
    from usbipx.daemon.server import Server
    from usbipx.tlsengine import TlsEngine


class TlsServing:
    """Serves the connections of a :class:`~usbipx.daemon.server.Server`'s ``tls://``
    listeners with one server context."""

    def __init__(self, server: Server, context: ssl.SSLContext) -> None:
        self.server = server
        self.context = context

    async def serve(self, conn: socket.socket, plain: Peer) -> bool:
        """Handshake, identity, request, then the reply and the handoff in the order
        the data path needs.  True if a relay now owns the connection."""
        from usbipx.identity import peer_identity
        from usbipx.tlsengine import TlsEngine
        from usbipx.tlsio import handshake_async, recv_async

        srv = self.server
        loop = asyncio.get_running_loop()
        engine = TlsEngine(self.context, server_side=True)
        kept = False
        try:
            started = time.monotonic()
            try:
                await asyncio.wait_for(handshake_async(loop, conn, engine),
                                       srv.cfg.handshake_timeout)
                if srv.metrics is not None:
                    srv.metrics.handshake.labels("tls").observe(time.monotonic() - started)
            except (TimeoutError, TlsError) as exc:
                srv.rejected += 1
                why = (f"no handshake within {srv.cfg.handshake_timeout:.0f} s"
                       if isinstance(exc, TimeoutError) else str(exc))
                srv._log_refusal("tls", plain.host, f"TLS handshake failed: {why}")
                with contextlib.suppress(OSError):
                    conn.send(engine.outgoing())  # the alert, if any, tells the peer why
                return False
            identity = peer_identity(engine.peercert())
            refused: str | None = "its certificate names no usable identity"
            if identity is not None:
                refused = srv.refuse_identity(identity) if srv.refuse_identity else None
            if refused is not None or identity is None:
                srv.rejected += 1
                srv._log_refusal("identity", plain.host, f"refused {identity}: {refused}")
                return False
            peer = replace(plain, identity=identity, transport="tls")

            async def read() -> Request | None:
                dec = RequestDecoder()
                while (req := dec.next_event()) is None:
                    dec.receive_data(await recv_async(loop, conn, engine))
                if dec.pending:
                    raise ProtocolError("more than one request")
                return req

            req = await srv._request(read(), peer)
            if req is None or (outcome := srv._decide(req, peer)) is None:
                return False
            try:
                if outcome.handoff is None:
                    await self._send(conn, engine, outcome.reply.pack(), peer)
                    srv.served += 1
                    return False
                # No lock across connections: vhci_hcd's attach skips a port another
                # connection took meanwhile (usbipx.vhci), so handoffs may interleave.
                kept = await self._handoff(conn, engine, peer, outcome)
                return kept
            finally:
                outcome.close()
        finally:
            if not kept:
                engine.close()

    async def _send(self, conn: socket.socket, engine: TlsEngine, data: bytes,
                    peer: Peer) -> bool:
        from usbipx.tlsio import send_async

        srv = self.server
        try:
            await asyncio.wait_for(send_async(asyncio.get_running_loop(), conn, engine, data),
                                   srv.cfg.request_timeout)
        except (TimeoutError, OSError, TlsError) as exc:
            logger.warning("{}: {}: cannot send reply: {}", srv.name, peer.name,
                           exc or "timed out")
            return False
        return True

    async def _handoff(self, conn: socket.socket, engine: TlsEngine, peer: Peer,
                       outcome: Outcome) -> bool:
        """Reply and hand off: kernel TLS if it works (reply first), else a relay
        (handoff first, so that a kernel refusal still reaches the peer)."""
        from usbipx import ktls

        srv = self.server
        assert outcome.handoff is not None
        if srv.cfg.data_path == "relay":
            return await self._relay(conn, engine, peer, outcome, replied=False)
        if not await self._send(conn, engine, outcome.reply.pack(), peer):
            return False
        try:
            # The ULP first: if the kernel refuses it, the engine still has its
            # keys and the relay can take over.
            ktls.attach(conn)
            tx, rx = engine.kernel_crypto()
        except ktls.KtlsUnavailable as exc:
            if srv.cfg.data_path == "ktls":
                logger.error("{}: {}: kernel TLS unavailable: {}", srv.name, peer.name, exc)
                return False
            logger.info("{}: {}: kernel TLS unavailable ({}); relaying", srv.name, peer.name,
                        exc)
            return await self._relay(conn, engine, peer, outcome, replied=True)
        try:
            ktls.install(conn, tx, rx)
        except ktls.KtlsUnavailable as exc:
            logger.error("{}: {}: {}", srv.name, peer.name, exc)
            return False
        conn.setblocking(True)
        if outcome.handoff(conn.fileno(), "ktls") is not None:
            logger.error("{}: {}: the kernel refused the connection after the reply",
                         srv.name, peer.name)
            return False
        srv.served += 1
        return False

    async def _relay(self, conn: socket.socket, engine: TlsEngine, peer: Peer,
                     outcome: Outcome, replied: bool) -> bool:
        """Hand the kernel a socketpair end and pump the other to the TLS connection."""
        from usbipx.relay import Relay, relay_pair

        srv = self.server
        assert outcome.handoff is not None
        kernel_end, relay_end = relay_pair()
        try:
            failed = outcome.handoff(kernel_end.fileno(), "tls-relay")
        finally:
            kernel_end.close()  # the kernel holds its own reference
        if not replied:
            sent = await self._send(conn, engine, (failed or outcome.reply).pack(), peer)
            if not sent and failed is None and outcome.undo is not None:
                outcome.undo()
                failed = outcome.reply
        if failed is not None:
            relay_end.close()
            return False
        srv.served += 1
        stop = threading.Event()
        relay = Relay(relay_end, conn, engine, name=peer.name,
                      meter=srv.metrics.relayed if srv.metrics is not None else None)

        def run() -> None:
            try:
                why = relay.run(stop)
            finally:
                srv._relays.discard(stop)
            logger.info("{}: relay for {} ended: {}", srv.name, peer.name, why)

        srv._relays.add(stop)
        threading.Thread(target=run, name=f"relay {peer.name}", daemon=True).start()
        return True

