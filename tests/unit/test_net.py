"""usbipx.net.request against scripted peers on 127.0.0.1: one deadline for the whole reply."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from loopback import HOST

from usbipx import protocol as p
from usbipx.errors import ProtocolError, UsbipError
from usbipx.net import request


@pytest.fixture
def peer() -> Iterator[Callable[[Callable[[socket.socket], None]], int]]:
    """``peer(script)``: a one-connection TCP peer running ``script(conn)``; returns its port."""
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(script: Callable[[socket.socket], None]) -> int:
        ls = socket.create_server((HOST, 0))
        listeners.append(ls)

        def serve() -> None:
            conn, _ = ls.accept()
            # The client may give up first: that is what the tests expect.
            with conn, contextlib.suppress(OSError):
                script(conn)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        threads.append(t)
        return int(ls.getsockname()[1])

    yield start
    for ls in listeners:
        ls.close()
    for t in threads:
        t.join(10)


def test_a_peer_trickling_its_reply_fails_at_the_overall_timeout(peer) -> None:
    """One byte every 0.5 s keeps every single recv under a 1 s timeout; the request
    as a whole must still fail once 1 s has passed (the reply needs 6 s)."""
    reply = p.DevlistReply().pack()  # 12 bytes

    def trickle(conn: socket.socket) -> None:
        conn.recv(8)
        for b in reply:
            conn.sendall(bytes([b]))
            time.sleep(0.5)

    port = peer(trickle)
    with socket.create_connection((HOST, port), timeout=5) as sock, \
            pytest.raises(UsbipError, match="no reply from peer within 1 s"):
        request(sock, p.DevlistRequest(), timeout=1.0)


def test_a_prompt_reply_in_pieces_is_read_whole(peer) -> None:
    reply = p.ImportReply(p.Status.ST_OK, p.UsbDevice("/x", "1-1", 1, 2, p.Speed.HIGH, 1, 2, 3))
    raw = reply.pack() + b"URB traffic"

    def pieces(conn: socket.socket) -> None:
        conn.recv(40)
        for i in range(0, len(raw), 50):
            conn.sendall(raw[i:i + 50])
            time.sleep(0.01)
        conn.recv(1)  # hold the connection until the client closes it

    port = peer(pieces)
    with socket.create_connection((HOST, port), timeout=5) as sock:
        assert request(sock, p.ImportRequest("1-1"), timeout=5.0) == reply
        assert sock.gettimeout() is None  # blocking again, for the kernel
        sock.settimeout(5)
        assert sock.recv(100) == b"URB traffic"  # not read by request()


@pytest.mark.parametrize("reset", [False, True])
def test_a_peer_closing_without_a_reply(peer, reset: bool) -> None:
    """A usbipa closes at once on addresses it does not allow: a FIN or, when our request
    reached its closed socket, a reset.  Either way the same clear reason."""

    def close_at_once(conn: socket.socket) -> None:
        conn.recv(8)
        if reset:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    port = peer(close_at_once)
    with socket.create_connection((HOST, port), timeout=5) as sock, \
            pytest.raises(ProtocolError, match="closed by peer before the reply") as err:
        request(sock, p.DevlistRequest(), timeout=5.0)
    assert "--allow" in str(err.value)


def test_a_peer_closing_in_the_middle_of_a_reply(peer) -> None:
    def half(conn: socket.socket) -> None:
        conn.recv(8)
        conn.sendall(p.DevlistReply().pack()[:10])

    port = peer(half)
    with socket.create_connection((HOST, port), timeout=5) as sock, \
            pytest.raises(ProtocolError, match="closed by peer before the reply") as err:
        request(sock, p.DevlistRequest(), timeout=5.0)
    assert "--allow" not in str(err.value)  # it did answer: not a refusal
