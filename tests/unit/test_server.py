"""The asyncio Server shared by usbipd and usbipa, on 127.0.0.1 with in-test handlers.

Clients are plain sockets speaking raw bytes, so every test sees exactly what
goes over the wire: the reply, or the connection ending without one.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from loopback import HOST, LoopbackServer, read_to_eof

from usbipx import protocol as p
from usbipx.daemon.server import Server, ServerConfig
from usbipx.daemon.serving import Outcome, Peer
from usbipx.errors import UsbipError
from usbipx.net import Keepalive

GOLDEN = Path(__file__).parent.parent / "fixtures" / "golden"
# The C client's OP_REQ_IMPORT for 1-1 followed by the first URBs (CMD_SUBMIT).
IMPORT_WITH_URBS = (GOLDEN / "import-request-with-urbs.bin").read_bytes()
DEVLIST_REQ = p.DevlistRequest().pack()
EMPTY_DEVLIST = p.DevlistReply().pack()


class Recorder:
    """A handler answering an empty DEVLIST (or ST_NODEV to an import), recording its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[p.Request, Peer]] = []

    def __call__(self, req: p.Request, peer: Peer) -> Outcome:
        self.calls.append((req, peer))
        if isinstance(req, p.ImportRequest):
            return Outcome(p.ImportReply(p.Status.ST_NODEV))
        return Outcome(p.DevlistReply())



def exchange(srv: LoopbackServer, data: bytes) -> bytes:
    """Send ``data``, then read until the server closes the connection."""
    with srv.connect() as c:
        c.sendall(data)
        return read_to_eof(c)


def test_request_reply_and_close() -> None:
    h = Recorder()
    with LoopbackServer(h) as srv, srv.connect() as c:
        c.sendall(DEVLIST_REQ)
        assert read_to_eof(c) == EMPTY_DEVLIST  # the reply, then the server closes
        (req, peer), = h.calls
        assert req == p.DevlistRequest()
        assert peer == Peer(HOST, c.getsockname()[1])
        srv.wait_for(lambda s: s.active == 0)
        assert (srv.server.served, srv.server.rejected) == (1, 0)


def test_request_is_read_exactly_and_the_rest_stays_in_the_socket() -> None:
    """What follows the request belongs to the kernel: the server must not read it."""
    seen: list[tuple[p.Request, bytes]] = []

    def handler(req: p.Request, peer: Peer) -> Outcome:
        def handoff(fd: int, transport: str) -> p.Reply | None:
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.settimeout(2.0)
                rest = b""
                while len(rest) < len(IMPORT_WITH_URBS) - 40:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    rest += chunk
            seen.append((req, rest))
            return p.ImportReply(p.Status.ST_NODEV)

        return Outcome(p.ImportReply(p.Status.ST_NODEV), handoff)

    with LoopbackServer(handler) as srv:
        assert exchange(srv, IMPORT_WITH_URBS) == p.ImportReply(p.Status.ST_NODEV).pack()
    (req, rest), = seen
    assert req == p.ImportRequest("1-1")
    assert rest == IMPORT_WITH_URBS[40:]
    assert struct.unpack(">I", rest[:4]) == (1,)  # USBIP_CMD_SUBMIT, untouched


def test_request_in_one_byte_segments() -> None:
    h = Recorder()
    with LoopbackServer(h) as srv, srv.connect() as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for b in p.ImportRequest("3-1.4.2").pack():
            c.sendall(bytes([b]))
            time.sleep(0.001)
        assert read_to_eof(c) == p.ImportReply(p.Status.ST_NODEV).pack()
    assert [r for r, _ in h.calls] == [p.ImportRequest("3-1.4.2")]


def test_handler_socket_is_tuned_blocking_and_connected() -> None:
    """The socket the kernel will get has NODELAY, keepalive timers and a user timeout."""
    ka = Keepalive(idle=7, interval=2, count=4, user_timeout_ms=9000)
    opts: dict[str, int | bool | float | None] = {}

    def handler(req: p.Request, peer: Peer) -> Outcome:
        def handoff(fd: int, transport: str) -> None:
            with socket.socket(fileno=os.dup(fd)) as sock:
                g = sock.getsockopt
                opts.update(
                    nodelay=g(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                    keepalive=g(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    idle=g(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    intvl=g(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                    cnt=g(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                    user_timeout=g(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                    blocking=os.get_blocking(fd),
                    transport=transport,
                )

        return Outcome(p.DevlistReply(), handoff)

    with LoopbackServer(handler, keepalive=ka) as srv:
        assert exchange(srv, DEVLIST_REQ) == EMPTY_DEVLIST
    assert opts["nodelay"] != 0 and opts["keepalive"] != 0
    assert (opts["idle"], opts["intvl"], opts["cnt"], opts["user_timeout"]) == (7, 2, 4, 9000)
    assert opts["blocking"] is True and opts["transport"] == "tcp"


@pytest.mark.parametrize("junk", [
    b"\xde\xad\xbe\xef" * 4,                                  # bad version
    bytes.fromhex("0111 8009 00000000"),                      # unknown request code
    bytes.fromhex("0111 8005 00000001"),                      # a request with a status
    bytes.fromhex("0111 0005 00000000"),                      # a reply, not a request
    bytes.fromhex("0111 8003 00000000") + b"x" * 32,          # bus id not NUL-terminated
    bytes.fromhex("0111 8003 00000000") + b"../../etc" + b"\0" * 23,  # not a bus id
])
def test_junk_closes_without_reply_and_the_server_keeps_serving(junk: bytes,
                                                                 logs: list[str]) -> None:
    h = Recorder()
    with LoopbackServer(h) as srv:
        assert exchange(srv, junk) == b""
        assert h.calls == []
        srv.wait_for(lambda s: s.rejected == 1)
        assert any("bad request" in m for m in logs)
        assert exchange(srv, DEVLIST_REQ) == EMPTY_DEVLIST
        assert len(h.calls) == 1


@pytest.mark.parametrize("part", [
    DEVLIST_REQ[:5],
    p.ImportRequest("1-1").pack()[:20],
    p.ExportRequest(p.UsbDevice("/x", "1-1", 1, 2, p.Speed.HIGH, 1, 2, 3)).pack()[:300],
])
def test_truncated_request_then_eof_is_closed_at_once(part: bytes, logs: list[str]) -> None:
    h = Recorder()
    with LoopbackServer(h, request_timeout=5.0) as srv, srv.connect() as c:
        c.sendall(part)
        c.shutdown(socket.SHUT_WR)
        t0 = time.monotonic()
        assert read_to_eof(c) == b""
        assert time.monotonic() - t0 < 2.0  # not the 5 s request timeout
        srv.wait_for(lambda s: s.rejected == 1)
    assert h.calls == []
    assert any(f"connection closed after {len(part)} bytes" in m for m in logs)


def test_connection_closed_before_any_byte_is_not_an_error() -> None:
    h = Recorder()
    with LoopbackServer(h) as srv:
        with srv.connect():
            srv.wait_for(lambda s: s.active == 1)
        srv.wait_for(lambda s: s.active == 0)
        assert (srv.server.served, srv.server.rejected, h.calls) == (0, 0, [])


def test_silent_client_is_dropped_after_the_request_timeout(logs: list[str]) -> None:
    h = Recorder()
    with LoopbackServer(h, request_timeout=0.3) as srv, srv.connect() as c:
        c.sendall(DEVLIST_REQ[:3])  # and then nothing
        t0 = time.monotonic()
        assert read_to_eof(c) == b""
        elapsed = time.monotonic() - t0
        assert 0.15 <= elapsed < 2.0  # the timeout, give or take scheduling
        srv.wait_for(lambda s: s.rejected == 1)
        assert exchange(srv, DEVLIST_REQ) == EMPTY_DEVLIST  # still serving
    assert any("no complete request within" in m for m in logs)


def test_max_connections() -> None:
    h = Recorder()
    with LoopbackServer(h, max_connections=2, request_timeout=5.0) as srv:
        a, b = srv.connect(), srv.connect()
        srv.wait_for(lambda s: s.active == 2)
        with srv.connect() as third:
            # The third is accepted and closed at once: no reply, whatever it sends.
            assert read_to_eof(third, timeout=2.0) == b""
        assert srv.server.active == 2
        a.close()
        srv.wait_for(lambda s: s.active == 1)
        assert exchange(srv, DEVLIST_REQ) == EMPTY_DEVLIST
        b.sendall(DEVLIST_REQ)  # the held connection is still served
        assert read_to_eof(b) == EMPTY_DEVLIST
        b.close()
    assert len(h.calls) == 2


def test_handler_exception_costs_only_its_connection(logs: list[str]) -> None:
    calls = []

    def handler(req: p.Request, peer: Peer) -> Outcome:
        calls.append(req)
        if len(calls) == 1:
            raise RuntimeError("handler bug")
        return Outcome(p.DevlistReply())

    with LoopbackServer(handler) as srv:
        assert exchange(srv, DEVLIST_REQ) == b""
        assert exchange(srv, DEVLIST_REQ) == EMPTY_DEVLIST
        srv.wait_for(lambda s: s.active == 0)
        assert srv.server.served == 1
    assert any("handler failed" in m and "handler bug" in m for m in logs)


def test_undo_when_the_reply_cannot_be_delivered(logs: list[str]) -> None:
    """The client resets the connection while the handler works: the kernel action is undone,
    and what the handler held for the request (usbipa: the bus id in flight) is released."""
    undone = threading.Event()
    released = threading.Event()
    reset_seen = []

    def handler(req: p.Request, peer: Peer) -> Outcome:
        if reset_seen:  # later connections are served normally
            return Outcome(p.DevlistReply())

        def handoff(fd: int, transport: str) -> None:
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.settimeout(3.0)
                try:
                    reset_seen.append(sock.recv(1) == b"")  # wait for the client's RST
                except ConnectionResetError:
                    reset_seen.append(True)

        return Outcome(p.DevlistReply(), handoff, undone.set, release=released.set)

    with LoopbackServer(handler) as srv:
        c = srv.connect()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.sendall(DEVLIST_REQ)
        srv.wait_for(lambda s: s.active == 1)
        c.close()  # SO_LINGER 0: RST
        assert undone.wait(5.0)
        assert released.wait(5.0)
        srv.wait_for(lambda s: s.active == 0)
        assert srv.server.served == 0
        assert exchange(srv, DEVLIST_REQ) == EMPTY_DEVLIST
    assert reset_seen == [True]
    assert any("cannot send reply" in m for m in logs)


KERNEL_URB = struct.pack(">I", 1) + b"\x00" * 44  # a USBIP_CMD_SUBMIT header


def _export_outcome(reply_first: bool, failed: p.Reply | None = None):
    """A handler whose handoff makes the 'kernel' speak at once on the socket, as
    vhci_hcd does when it enumerates a device it was just given."""

    def handler(req: p.Request, peer: Peer) -> Outcome:
        def handoff(fd: int, transport: str) -> p.Reply | None:
            os.write(fd, KERNEL_URB)
            return failed

        return Outcome(p.DevlistReply(), handoff, reply_first=reply_first)

    return handler


def test_a_kernel_that_speaks_first_gets_the_reply_ahead_of_it() -> None:
    """usbipa's vhci attach starts enumeration at once: over plain TCP the board
    must read OP_REP_EXPORT before the first URB, never a URB as the reply."""
    with LoopbackServer(_export_outcome(reply_first=True)) as srv:
        assert exchange(srv, DEVLIST_REQ) == EMPTY_DEVLIST + KERNEL_URB


def test_a_handoff_refused_after_the_reply_ends_the_connection(logs: list[str]) -> None:
    refused = p.DevlistReply((), p.Status.ST_ERROR)
    with LoopbackServer(_export_outcome(reply_first=True, failed=refused)) as srv:
        # the reply went out; the kernel refused the socket: the link just ends
        assert exchange(srv, DEVLIST_REQ).startswith(EMPTY_DEVLIST)
        srv.wait_for(lambda s: s.active == 0)
        assert srv.server.served == 0
    assert any("after the reply" in m for m in logs)


def test_undo_is_not_called_when_the_reply_is_delivered() -> None:
    undone = []

    def handler(req: p.Request, peer: Peer) -> Outcome:
        return Outcome(p.DevlistReply(), undo=lambda: undone.append(1))

    with LoopbackServer(handler) as srv:
        assert exchange(srv, DEVLIST_REQ) == EMPTY_DEVLIST
        srv.wait_for(lambda s: s.active == 0)
    assert undone == []


def test_default_config_listens_on_ipv4_any() -> None:
    """``ServerConfig(port=0, ipv6=False)``: one IPv4 listener, reachable on loopback."""
    h = Recorder()
    with LoopbackServer(h, bind_address=None) as srv:
        assert [a for a, _ in srv.server.addresses] == ["0.0.0.0"]
        assert exchange(srv, DEVLIST_REQ) == EMPTY_DEVLIST


def test_ipv6_loopback() -> None:
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    h = Recorder()
    with LoopbackServer(h, bind_address="::1") as srv, \
            socket.create_connection(("::1", srv.port), timeout=5) as c:
        c.sendall(DEVLIST_REQ)
        assert read_to_eof(c) == EMPTY_DEVLIST
    assert h.calls[0][1].host == "::1"


def test_port_in_use_is_a_clear_error() -> None:
    with LoopbackServer(Recorder()) as srv:
        other = Server("other", Recorder(), ServerConfig(port=srv.port, ipv6=False,
                                                         bind_address=HOST))
        with pytest.raises(UsbipError, match=f"cannot listen on 127.0.0.1 port {srv.port}"):
            other.open()


def test_stop_closes_the_listeners() -> None:
    srv = LoopbackServer(Recorder())
    with srv:
        port = srv.port
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, port), timeout=2).close()


# -- admission at accept: peer policy and connection caps ---------------------------

OTHER = "127.0.0.2"  # a second local source address (all of 127/8 is loopback)


def connect_from(srv: LoopbackServer, source: str) -> socket.socket:
    """A client connection whose source address is ``source``."""
    return socket.create_connection((HOST, srv.port), timeout=5, source_address=(source, 0))


def only_local(host: str) -> str | None:
    return None if host == HOST else "peer is outside the allowed networks"


def test_refused_peers_are_closed_at_accept_and_take_no_slot(logs: list[str]) -> None:
    """Idle connections from a refused address cannot lock out an allowed one: each is
    closed at once, before any request is read, and never counts as active."""
    h = Recorder()
    with LoopbackServer(h, max_connections=4, request_timeout=30.0,
                        refuse_peer=only_local) as srv:
        held = [connect_from(srv, OTHER) for _ in range(12)]
        try:
            for c in held:
                assert read_to_eof(c, timeout=5.0) == b""  # closed without a reply
            held[0].sendall(DEVLIST_REQ)  # a request changes nothing
            assert exchange(srv, DEVLIST_REQ) == EMPTY_DEVLIST  # 127.0.0.1 is served
            srv.wait_for(lambda s: s.active == 0)
        finally:
            for c in held:
                c.close()
    assert [peer.host for _, peer in h.calls] == [HOST]
    refusals = [m for m in logs if "refused connection from 127.0.0.2" in m]
    assert refusals and "outside the allowed networks" in refusals[0]
    assert len(refusals) <= 2  # the 1st and the 10th: a flood does not flood the log


def test_per_address_cap(logs: list[str]) -> None:
    h = Recorder()
    with LoopbackServer(h, max_per_address=2, request_timeout=30.0) as srv:
        a, b = connect_from(srv, OTHER), connect_from(srv, OTHER)
        srv.wait_for(lambda s: s.active == 2)
        with connect_from(srv, OTHER) as third:
            assert read_to_eof(third, timeout=5.0) == b""  # over the cap: closed at once
        assert exchange(srv, DEVLIST_REQ) == EMPTY_DEVLIST  # another address is served
        a.close()
        srv.wait_for(lambda s: s.active == 1)
        with connect_from(srv, OTHER) as again:  # a slot of 127.0.0.2 is free again
            again.sendall(DEVLIST_REQ)
            assert read_to_eof(again) == EMPTY_DEVLIST
        b.sendall(DEVLIST_REQ)
        assert read_to_eof(b) == EMPTY_DEVLIST
        b.close()
    assert [peer.host for _, peer in h.calls] == [HOST, OTHER, OTHER]
    assert any("127.0.0.2" in m and "2 connections from one address" in m for m in logs)


def test_total_cap_is_logged(logs: list[str]) -> None:
    with LoopbackServer(Recorder(), max_connections=1, request_timeout=30.0) as srv, \
            srv.connect():
        srv.wait_for(lambda s: s.active == 1)
        with connect_from(srv, OTHER) as extra:
            assert read_to_eof(extra, timeout=5.0) == b""
    assert any("127.0.0.2" in m and "1 connections in all" in m for m in logs)


# -- accept errors ------------------------------------------------------------------------

class FlakyListener(socket.socket):
    """A listening socket whose next accept() calls fail with the given errnos first."""

    failures: list[int]

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failures:
            err = self.failures.pop(0)
            raise OSError(err, os.strerror(err))
        return super().accept()


@pytest.mark.parametrize("err", [errno.ECONNABORTED, errno.EPROTO, errno.ENOBUFS,
                                 errno.ENOMEM, errno.EPERM, errno.EMFILE, errno.ENFILE,
                                 errno.ENETUNREACH])
def test_a_failing_accept_does_not_stop_the_server(err: int, logs: list[str]) -> None:
    srv = LoopbackServer(Recorder())
    srv.server.open()
    ((listener, scheme),) = srv.server._listeners
    flaky = FlakyListener(listener.family, listener.type, fileno=listener.detach())
    flaky.failures = [err]
    srv.server._listeners = [(flaky, scheme)]
    with srv:
        assert exchange(srv, DEVLIST_REQ) == EMPTY_DEVLIST
        assert flaky.failures == []  # the failure did happen, before this client
    assert any("accept failed" in m and os.strerror(err) in m for m in logs)


def test_a_bug_in_the_accept_loop_stops_the_server_loudly(logs: list[str]) -> None:
    """Not a silent daemon that serves no one: run() ends with the error."""

    def broken(host: str) -> str | None:
        raise RuntimeError("policy bug")

    srv = LoopbackServer(Recorder(), refuse_peer=broken)
    with pytest.raises(UsbipError, match="accept loop failed: policy bug"), srv:
        with srv.connect() as c:
            assert read_to_eof(c) == b""
        srv._thread.join(5.0)
        assert not srv._thread.is_alive()
    assert any("accept loop failed" in m for m in logs)


@pytest.mark.parametrize("handoff", [False, True])
def test_the_server_closes_every_outcome_it_carried_out(handoff: bool) -> None:
    released: list[int] = []

    def handler(req: p.Request, peer: Peer) -> Outcome:
        return Outcome(p.DevlistReply(), (lambda fd, transport: None) if handoff else None,
                       reply_first=True, release=lambda: released.append(1))

    with LoopbackServer(handler) as srv:
        assert exchange(srv, DEVLIST_REQ) == EMPTY_DEVLIST
        srv.wait_for(lambda s: s.active == 0)
    assert released == [1]

