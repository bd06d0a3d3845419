"""A real :class:`usbipx.daemon.server.Server` on 127.0.0.1, served from a background thread.

    with LoopbackServer(handler) as srv:           # handler: (request, peer) -> Outcome
        sock = srv.connect()                        # a plain client socket
        list_remote(srv.remote)

The server runs its own event loop in a daemon thread; leaving the block
stops it (as SIGTERM would) and waits for the thread.  Handlers run in that
thread: a fake kernel they touch is the one the test sees (pyfakefs is
process-wide).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from fakekernel import FakeKernel

from usbipx import protocol as p
from usbipx.daemon.server import PeerPolicy, Server, ServerConfig
from usbipx.daemon.serving import Handler, Outcome, Peer
from usbipx.remote import Remote
from usbipx.vhci import VhciDriver

HOST = "127.0.0.1"

HANDOFF_LAG = 0.05
"""Seconds a reply-first handoff waits after the reply.  The client may then act
on the reply before the server attaches (as it may on a real board): a test that
reads the server's effects must wait for :meth:`LoopbackServer.idle`, and one
that forgets fails every time instead of once in a while."""


def _lagging(handler: Handler) -> Handler:
    def call(req: p.Request, peer: Peer) -> Outcome:
        out = handler(req, peer)
        give = out.handoff
        if give is not None and out.reply_first:
            def handoff(fd: int, transport: str) -> p.Reply | None:
                time.sleep(HANDOFF_LAG)
                return give(fd, transport)

            out.handoff = handoff
        return out

    return call


class Spy:
    """Wraps a handler to keep the requests, peers and the descriptors the server
    handed off (-1 for a request with no handoff)."""

    def __init__(self, inner: Handler) -> None:
        self.inner = inner
        self.calls: list[tuple[p.Request, Peer, int]] = []

    def __call__(self, req: p.Request, peer: Peer) -> Outcome:
        n = len(self.calls)
        self.calls.append((req, peer, -1))
        out = self.inner(req, peer)
        give = out.handoff
        if give is not None:
            def handoff(fd: int, transport: str) -> p.Reply | None:
                self.calls[n] = (req, peer, fd)
                return give(fd, transport)

            out.handoff = handoff
        return out

    @property
    def fds(self) -> list[int]:
        return [fd for _, _, fd in self.calls]

    def kinds(self) -> list[str]:
        return [type(r).__name__ for r, _, _ in self.calls]


def used_ports(kernel: FakeKernel) -> list[int]:
    """The fake kernel's vhci ports in use."""
    return [x.port for x in VhciDriver(kernel.sysfs).ports() if not x.free]


class LoopbackServer:
    """``Server(name, handler, cfg, refuse_peer)`` bound to 127.0.0.1 on a free port.

    The server is bound when the block is entered, unless :meth:`Server.open`
    was called before (a test may then replace its listeners)."""

    def __init__(self, handler: Handler, name: str = "test",
                 refuse_peer: PeerPolicy | None = None,
                 refuse_identity: PeerPolicy | None = None, **cfg: Any) -> None:
        cfg.setdefault("port", 0)
        cfg.setdefault("ipv6", False)
        cfg.setdefault("bind_address", HOST)
        self.server = Server(name, _lagging(handler), ServerConfig(**cfg), refuse_peer,
                             refuse_identity)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"server-{name}", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        def ready(_: Server) -> None:
            self._loop = asyncio.get_running_loop()
            self._ready.set()

        try:
            asyncio.run(self.server.run(ready))
        except BaseException as exc:  # surfaced by __exit__
            self.error = exc
            self._ready.set()

    @property
    def port(self) -> int:
        return self.server.addresses[0][1]

    @property
    def remote(self) -> Remote:
        """How a client reaches this server (plain TCP)."""
        return Remote.tcp(HOST, self.port)

    def connect(self, timeout: float = 5.0) -> socket.socket:
        """A plain blocking TCP connection to the server."""
        return socket.create_connection((HOST, self.port), timeout=timeout)

    def wait_for(self, cond: Callable[[Server], bool], timeout: float = 5.0) -> None:
        """Poll until ``cond(server)`` holds (e.g. a connection was accepted)."""
        deadline = time.monotonic() + timeout
        while not cond(self.server):
            if time.monotonic() > deadline:
                raise AssertionError("server did not reach the expected state in time")
            time.sleep(0.01)

    def idle(self, timeout: float = 5.0) -> None:
        """Wait until no connection is being served: every handoff has happened."""
        self.wait_for(lambda s: s.active == 0, timeout)

    def __enter__(self) -> LoopbackServer:
        self.server.open()
        self._thread.start()
        if not self._ready.wait(5.0) or self.error is not None:
            raise RuntimeError(f"server did not start: {self.error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.server.stop)
        self._thread.join(5.0)
        assert not self._thread.is_alive(), "server thread did not stop"

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if self.error is not None and exc is None:
            raise self.error


def read_to_eof(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the peer sends until it closes (a reset counts as the end)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def free_port() -> int:
    """A loopback port nobody listens on (for connection-refused tests)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])
