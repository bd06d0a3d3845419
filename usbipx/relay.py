"""The user-space TLS data path, for when kernel TLS cannot carry a connection.

The kernel gets one end of a ``socketpair`` (:func:`relay_pair`) instead of
the TCP socket; a :class:`Relay` pumps plaintext between the other end and
the TLS connection.  It runs in whatever the caller likes: a thread of a
daemon, a worker process, a forked background process.

Memory stays bounded: a side is read only while the buffer toward the other
side is below :data:`HIGH_WATER`, so a peer that does not read stalls the
reads from the other side (and TCP then stalls the sender) instead of
filling memory.  When either side ends, both sockets are shut down and
closed: the kernel on each side sees its connection end (no stuck vhci port,
no usbip-host device left in use).  What the ending side sent before it
ended is still delivered to the other (for at most :data:`FLUSH_TIMEOUT`);
on a stop or an error, buffered data is dropped.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Callable

from usbipx.errors import describe_errno
from usbipx.log import logger
from usbipx.remote import RelayStats
from usbipx.tlsengine import TlsClosed, TlsEngine, TlsError

HIGH_WATER = 256 * 1024
"""Bytes buffered toward one side before the other side is no longer read."""
CHUNK = 64 * 1024
"""Bytes read from a socket at a time."""
STOP_POLL = 0.1
"""Seconds between looks at the stop event."""
FLUSH_TIMEOUT = 1.0
"""Seconds to deliver what one side sent before it ended."""

KERNEL_CLOSED = "kernel side closed"
PEER_CLOSED = "peer closed"
STOPPED = "stopped"


class _Ended(Exception):
    """Ends the pump with a reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def relay_pair() -> tuple[socket.socket, socket.socket]:
    """A connected AF_UNIX stream pair (kernel_end, relay_end), both blocking:
    ``kernel_end`` goes to the kernel, ``relay_end`` to :class:`Relay`."""
    kernel_end, relay_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return kernel_end, relay_end


class Relay:
    """Pumps plaintext between ``kernel_side`` (our end of the socketpair) and the
    TLS connection ``engine`` runs over ``network`` (its TCP socket).

    The relay owns both sockets and the engine from :meth:`run` on.  The
    engine's handshake must be complete; plaintext or records it already holds
    are relayed first.
    """

    def __init__(self, kernel_side: socket.socket, network: socket.socket, engine: TlsEngine,
                 name: str = "", meter: Callable[[str, int], None] | None = None) -> None:
        self.kernel_side = kernel_side
        self.meter = meter
        """Told ``("to_network" | "to_kernel", nbytes)`` as plaintext moves (metrics)."""
        self.network = network
        self.engine = engine
        self.name = name or f"fd {network.fileno()}"
        self.stats = RelayStats()
        self._to_net = bytearray()  # ciphertext waiting for the network
        self._to_kernel = bytearray()  # plaintext waiting for the kernel side
        self.peak_buffered = 0
        """The most :meth:`buffered` was between two socket events."""

    def buffered(self) -> int:
        """Bytes this relay holds in user space right now (both ways).  Not for
        other threads while :meth:`run` runs (see :attr:`peak_buffered`)."""
        return len(self._to_net) + len(self._to_kernel) + self.engine.pending()

    def run(self, stop: threading.Event | None = None) -> str:
        """Relay until either side ends or ``stop`` is set (looked at every
        :data:`STOP_POLL` s); then close both sockets and the engine.

        Returns why it ended: ``kernel side closed``, ``peer closed``,
        ``network error: ...`` or ``stopped``.
        """
        try:
            reason = self._pump(stop)
            self._flush(reason)
        finally:
            self._close()
        logger.debug("relay {}: {} ({} bytes to the network, {} to the kernel, at most {} "
                     "buffered)", self.name, reason, self.stats.to_network, self.stats.to_kernel,
                     self.peak_buffered)
        return reason

    # -- the loop ----------------------------------------------------------------

    def _pump(self, stop: threading.Event | None) -> str:
        self.kernel_side.setblocking(False)
        self.network.setblocking(False)
        timeout = None if stop is None else STOP_POLL
        with selectors.DefaultSelector() as sel:
            try:
                self._from_network(b"")  # what the engine already holds
                while True:
                    if stop is not None and stop.is_set():
                        return STOPPED
                    self._interest(sel)
                    for key, events in sel.select(timeout):
                        self._ready(key.fileobj, events)
                    self.peak_buffered = max(self.peak_buffered, self.buffered())
            except _Ended as end:
                return end.reason

    def _interest(self, sel: selectors.BaseSelector) -> None:
        read, write = selectors.EVENT_READ, selectors.EVENT_WRITE
        kernel = (read if len(self._to_net) < HIGH_WATER else 0) | (write if self._to_kernel else 0)
        net = (read if len(self._to_kernel) < HIGH_WATER else 0) | (write if self._to_net else 0)
        _want(sel, self.kernel_side, kernel)
        _want(sel, self.network, net)

    def _ready(self, sock: object, events: int) -> None:
        if sock is self.kernel_side:
            if events & selectors.EVENT_WRITE:
                self._send_kernel()
            if events & selectors.EVENT_READ:
                self._recv_kernel()
        else:
            if events & selectors.EVENT_WRITE:
                self._send_network()
            if events & selectors.EVENT_READ:
                self._recv_network()

    # -- each direction ----------------------------------------------------------

    def _recv_kernel(self) -> None:
        try:
            data = self.kernel_side.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            raise _Ended(KERNEL_CLOSED) from None
        if not data:
            raise _Ended(KERNEL_CLOSED)
        try:
            self.engine.write(data)
        except TlsError as exc:
            raise _Ended(f"network error: {exc}") from None
        self.stats.to_network += len(data)
        if self.meter is not None:
            self.meter("to_network", len(data))
        self._to_net += self.engine.outgoing()

    def _send_kernel(self) -> None:
        try:
            sent = self.kernel_side.send(self._to_kernel)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            raise _Ended(KERNEL_CLOSED) from None
        del self._to_kernel[:sent]
        self.stats.to_kernel += sent
        if self.meter is not None:
            self.meter("to_kernel", sent)

    def _recv_network(self) -> None:
        try:
            data = self.network.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise _Ended(f"network error: {_errno(exc)}") from None
        if not data:
            raise _Ended(PEER_CLOSED)
        self._from_network(data)

    def _from_network(self, data: bytes) -> None:
        try:
            self.engine.receive_any(data)
            # Twice at least: plaintext before a close_notify comes first, the end next.
            while chunk := self.engine.read():
                self._to_kernel += chunk
        except TlsClosed:
            raise _Ended(PEER_CLOSED) from None
        except TlsError as exc:
            raise _Ended(f"network error: {exc}") from None
        finally:
            with contextlib.suppress(RuntimeError):
                self._to_net += self.engine.outgoing()

    def _send_network(self) -> None:
        try:
            sent = self.network.send(self._to_net)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise _Ended(f"network error: {_errno(exc)}") from None
        del self._to_net[:sent]

    # -- the end -------------------------------------------------------------------

    def _flush(self, reason: str) -> None:
        """Deliver what the side that ended sent before its end."""
        if reason == PEER_CLOSED and self._to_kernel:
            sock, data = self.kernel_side, self._to_kernel
        elif reason == KERNEL_CLOSED and self._to_net:
            sock, data = self.network, self._to_net
        else:
            return
        try:
            sock.settimeout(FLUSH_TIMEOUT)
            sock.sendall(data)
        except OSError:
            return
        if sock is self.kernel_side:
            self.stats.to_kernel += len(data)

    def _close(self) -> None:
        # shutdown() first: the FIN goes out even if a forked process still holds
        # a copy of the descriptor.
        for sock in (self.kernel_side, self.network):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.engine.close()
        self._to_net.clear()
        self._to_kernel.clear()


def _want(sel: selectors.BaseSelector, sock: socket.socket, events: int) -> None:
    """Register, modify or unregister ``sock`` for ``events``."""
    try:
        current = sel.get_key(sock).events
    except KeyError:
        current = 0
    if events == current:
        return
    if not events:
        sel.unregister(sock)
    elif not current:
        sel.register(sock, events)
    else:
        sel.modify(sock, events)


def _errno(exc: OSError) -> str:
    return describe_errno(exc.errno) if exc.errno else str(exc)
