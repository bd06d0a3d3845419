"""usbipx.relay over loopback: a socketpair plays the kernel, a TLS peer on TCP
(another relay, or Python's own ssl) the other end."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable

import pytest
from tlskit import Pki, make_pki, tcp_pair

from usbipx.relay import CHUNK, HIGH_WATER, Relay, relay_pair
from usbipx.tlsengine import TlsEngine
from usbipx.tlsio import handshake_blocking
from usbipx.tlsrecord import MAX_RECORD_BODY

MB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def connected(pki: Pki, bufsize: int = 0) -> tuple[socket.socket, TlsEngine,
                                                    socket.socket, TlsEngine]:
    """(client socket, engine, server socket, engine) after a mutual TLS handshake."""
    csock, ssock = tcp_pair()
    if bufsize:  # small TCP buffers: back-pressure shows after little data
        for sock in (csock, ssock):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
    client = TlsEngine(pki.client_ctx(), False, "localhost")
    server = TlsEngine(pki.server_ctx(), True)
    thread = threading.Thread(target=handshake_blocking,
                              args=(ssock, server, time.monotonic() + 10))
    thread.start()
    handshake_blocking(csock, client, time.monotonic() + 10)
    thread.join(10)
    assert server.complete
    return csock, client, ssock, server


class Background(threading.Thread):
    """Runs ``fn`` and keeps its result (or exception)."""

    def __init__(self, fn: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: object = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:
            self.error = exc

    def value(self, timeout: float = 30) -> object:
        self.join(timeout)
        assert not self.is_alive(), "still running"
        if self.error is not None:
            raise self.error
        return self.result


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(60)
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def at_eof(sock: socket.socket, timeout: float = 10) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def relays(pki: Pki, bufsize: int = 0) -> tuple[socket.socket, Relay, socket.socket, Relay]:
    """Our relay (the board) and the peer's (the server), each with its kernel end."""
    csock, client, ssock, server = connected(pki, bufsize)
    k_end, r_end = relay_pair()
    pk_end, pr_end = relay_pair()
    return k_end, Relay(r_end, csock, client, "board"), pk_end, Relay(pr_end, ssock, server,
                                                                       "server")


def test_relay_pair():
    kernel_end, relay_end = relay_pair()
    with kernel_end, relay_end:
        assert kernel_end.family == relay_end.family == socket.AF_UNIX
        assert kernel_end.type == socket.SOCK_STREAM
        assert kernel_end.getblocking() and relay_end.getblocking()
        kernel_end.sendall(b"ping")
        assert relay_end.recv(4) == b"ping"


def test_4mb_each_way_then_the_kernel_side_closes(pki):
    k_end, ours, pk_end, peer = relays(pki)
    ours_run, peer_run = Background(ours.run), Background(peer.run)
    up, down = os.urandom(4 * MB), os.urandom(4 * MB)
    writers = [Background(lambda: k_end.sendall(up)), Background(lambda: pk_end.sendall(down))]
    got_down = Background(lambda: recv_exactly(k_end, len(down)))
    assert recv_exactly(pk_end, len(up)) == up
    assert got_down.value() == down
    for w in writers:
        w.value()
    k_end.close()
    assert ours_run.value() == "kernel side closed"
    assert peer_run.value() == "peer closed"
    assert at_eof(pk_end)
    assert (ours.stats.to_network, ours.stats.to_kernel) == (4 * MB, 4 * MB)
    assert (peer.stats.to_network, peer.stats.to_kernel) == (4 * MB, 4 * MB)
    assert ours.network.fileno() == -1 and ours.kernel_side.fileno() == -1
    pk_end.close()


def test_peer_closing_ends_both(pki):
    csock, client, ssock, _ = connected(pki)
    k_end, r_end = relay_pair()
    run = Background(Relay(r_end, csock, client).run)
    ssock.close()
    assert run.value() == "peer closed"
    assert at_eof(k_end)
    k_end.close()


def test_close_notify_after_data(pki):
    """A peer's last words before its close_notify reach the kernel side, then EOF."""
    csock, ssock = tcp_pair()
    client = TlsEngine(pki.client_ctx(), False, "localhost")

    def peer() -> None:
        tls = pki.server_ctx().wrap_socket(ssock, server_side=True)
        tls.sendall(b"last words")
        with contextlib.suppress(OSError):  # our end does not answer the close_notify
            tls.unwrap()
        tls.close()

    peer_thread = Background(peer)
    handshake_blocking(csock, client, time.monotonic() + 10)
    k_end, r_end = relay_pair()
    run = Background(Relay(r_end, csock, client).run)
    assert recv_exactly(k_end, 10) == b"last words"
    assert run.value() == "peer closed"
    assert at_eof(k_end)
    peer_thread.value()
    k_end.close()


def test_stop_event(pki):
    k_end, ours, pk_end, peer = relays(pki)
    stop = threading.Event()
    ours_run, peer_run = Background(lambda: ours.run(stop)), Background(peer.run)
    k_end.sendall(b"hello")
    assert recv_exactly(pk_end, 5) == b"hello"
    stop.set()
    assert ours_run.value(timeout=5) == "stopped"
    assert at_eof(k_end)
    assert peer_run.value() == "peer closed"
    assert at_eof(pk_end)
    k_end.close()
    pk_end.close()


def test_what_the_engine_already_holds_goes_first(pki):
    """Plaintext and records read beyond the user-space exchange are not lost."""
    csock, client, ssock, server = connected(pki)
    server.write(b"already ")
    server.write(b"here")
    records = server.outgoing()
    ssock.sendall(records)
    client.receive_any(recv_exactly(csock, len(records)))  # both records, not read
    assert client.pending() > 0
    k_end, r_end = relay_pair()
    run = Background(Relay(r_end, csock, client).run)
    assert recv_exactly(k_end, 12) == b"already here"
    k_end.close()
    assert run.value() == "kernel side closed"
    ssock.close()


def test_garbage_from_the_network(pki):
    csock, client, ssock, _ = connected(pki)
    k_end, r_end = relay_pair()
    run = Background(Relay(r_end, csock, client).run)
    ssock.sendall(b"\x17\x03\x03\x00\x20" + os.urandom(32))
    reason = run.value()
    assert reason == "network error: TLS connection failed: decryption failed or bad record mac"
    assert at_eof(k_end)
    assert at_eof(ssock)
    k_end.close()
    ssock.close()


BOUND = HIGH_WATER + CHUNK + 2 * (5 + MAX_RECORD_BODY)
"""A relay's buffers: below the high-water mark, plus one read, plus partial records."""


@pytest.mark.parametrize("stalled", ["kernel", "network"])
def test_back_pressure_bounds_memory(pki, stalled):
    """A side that does not read stalls the sender; no relay buffers more than BOUND.
    Then everything arrives intact."""
    k_end, ours, pk_end, peer = relays(pki, bufsize=64 * 1024)
    source, sink = (pk_end, k_end) if stalled == "kernel" else (k_end, pk_end)
    ours_run, peer_run = Background(ours.run), Background(peer.run)
    data = os.urandom(8 * MB)
    sent = [0]

    def write() -> None:
        view = memoryview(data)
        while sent[0] < len(data):
            sent[0] += source.send(view[sent[0]:sent[0] + CHUNK])

    writer = Background(write)
    last, still_since = -1, time.monotonic()
    while time.monotonic() - still_since < 0.5:  # until nothing moves for 0.5 s
        if sent[0] != last:
            last, still_since = sent[0], time.monotonic()
        assert writer.is_alive(), "everything was buffered somewhere"
        time.sleep(0.02)
    assert sent[0] < len(data)
    assert ours.peak_buffered <= BOUND
    assert peer.peak_buffered <= BOUND
    assert recv_exactly(sink, len(data)) == data
    writer.value()
    k_end.close()
    assert ours_run.value() == "kernel side closed"
    assert peer_run.value() == "peer closed"
    assert ours.peak_buffered <= BOUND and peer.peak_buffered <= BOUND
    pk_end.close()


def test_relay_in_a_forked_process(pki):
    """A background process relays; the parent still holds copies of its sockets, yet
    the peer sees the end (shutdown, not just close)."""
    k_end, ours, pk_end, peer = relays(pki)
    peer_run = Background(peer.run)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reports by exit status
        code = 1
        try:
            k_end.close()
            pk_end.close()
            code = 0 if ours.run() == "kernel side closed" else 2
        finally:
            os._exit(code)
    # The parent keeps ours.network and ours.kernel_side open, as a careless caller might.
    k_end.sendall(b"x" * MB)
    assert recv_exactly(pk_end, MB) == b"x" * MB
    pk_end.sendall(b"y" * MB)
    assert recv_exactly(k_end, MB) == b"y" * MB
    k_end.close()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert peer_run.value() == "peer closed"
    assert at_eof(pk_end)
    pk_end.close()
    ours.network.close()
    ours.kernel_side.close()
