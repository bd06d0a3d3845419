"""usbipx.tlsengine: the sans-IO engine in memory, its record-exact input, the record
counts behind the kernel's sequence numbers (checked against OpenSSL by sealing and
opening real records with the structs), failures with clear reasons, the key log,
and the blocking and asyncio socket drivers (usbipx.tlsio)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tlskit import Info, Pki, connect, make_pki, request_reply, split_records, tcp_pair, transfer

from usbipx import tlskeylog
from usbipx.ktls import KtlsUnavailable
from usbipx.tlsengine import TlsClosed, TlsEngine, TlsError
from usbipx.tlsio import (
    handshake_async,
    handshake_blocking,
    recv_async,
    recv_blocking,
    send_async,
    send_blocking,
)

TLS13_SUITE = os.environ.get("USBIPX_TEST_TLS13_SUITE", "TLS_AES_256_GCM_SHA384")
"""What two OpenSSL 3.0 ends negotiate by default; test_tls13_suites sets others."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def pair(pki: Pki, tls12: str | None = None) -> tuple[TlsEngine, TlsEngine]:
    """(client, server) engines; ``tls12``: pin TLS 1.2 with that suite."""
    cctx, sctx = pki.client_ctx(), pki.server_ctx()
    if tls12:
        cctx.maximum_version = ssl.TLSVersion.TLSv1_2
        sctx.set_ciphers(tls12)
    return TlsEngine(cctx, False, "localhost"), TlsEngine(sctx, True)


def infos(engine: TlsEngine) -> tuple[Info, Info]:
    tx, rx = engine.kernel_crypto()
    return Info.parse(tx), Info.parse(rx)


def check_against_openssl(spent: TlsEngine, tx: Info, rx: Info, live: TlsEngine) -> None:
    """``spent``'s structs work with ``live`` (its peer, still in OpenSSL): records
    sealed with ``tx`` from its seq on are read by ``live``, and ``live``'s next
    records open with ``rx`` at its seq.  Two records each way: the seqs advance."""
    assert not live.pending()
    for i, text in enumerate((b"from the kernel", b"and again")):
        live.receive_any(tx.seal(text, tx.seq + i))
        assert live.read() == text
    for i, text in enumerate((b"to the kernel", b"more")):
        live.write(text)
        (record,) = split_records(live.outgoing())
        assert rx.open(record, rx.seq + i) == (23, text)


# -- the handshake in memory -------------------------------------------------------------

def test_mutual_handshake_in_memory(pki):
    client, server = pair(pki)
    assert (client.version, client.cipher, client.peercert()) == (None, None, None)
    connect(client, server)
    assert client.complete and server.complete
    assert client.version == server.version == "TLSv1.3"
    assert client.cipher == server.cipher == TLS13_SUITE
    assert server.peercert()["subject"] == ((("commonName", "board"),),)
    assert client.peercert()["subject"] == ((("commonName", "server"),),)
    assert client.handshake() is True  # complete stays complete


def test_needed_and_receive_are_record_exact(pki):
    client, server = pair(pki)
    client.handshake()
    hello = client.outgoing()
    assert len(split_records(hello)) == 1
    body = int.from_bytes(hello[3:5], "big")
    assert server.needed() == 5
    server.receive(hello[:2])
    assert (server.needed(), server.pending(), server.records_received) == (3, 2, 0)
    server.receive(hello[2:5])
    assert server.needed() == body
    with pytest.raises(ValueError, match="the record wants"):
        server.receive(hello[5:] + b"x")
    server.receive(hello[5:-1])
    assert (server.needed(), server.records_received) == (1, 0)
    server.receive(hello[-1:])
    assert (server.needed(), server.records_received) == (5, 1)
    assert server.pending() == len(hello)  # fed to OpenSSL, not yet consumed
    assert server.handshake() is False
    assert server.pending() == 0


def test_receive_any_takes_any_split(pki):
    client, server = pair(pki)
    client.handshake()
    hello = client.outgoing()
    server.receive_any(hello[:7])
    server.receive_any(hello[7:] + b"\x17\x03")  # and the start of the next record
    assert (server.records_received, server.needed()) == (1, 3)


# -- sequence numbers and the structs ----------------------------------------------------

SUITES = [
    pytest.param(None, (1, 1), id="tls13"),
    pytest.param("ECDHE-ECDSA-AES128-GCM-SHA256", (2, 2), id="tls12-aes128gcm"),
    pytest.param("ECDHE-ECDSA-AES256-GCM-SHA384", (2, 2), id="tls12-aes256gcm"),
    pytest.param("ECDHE-ECDSA-CHACHA20-POLY1305", (2, 2), id="tls12-chacha20"),
]


@pytest.mark.parametrize("side", ["server", "client"])
@pytest.mark.parametrize(("tls12", "seqs"), SUITES)
def test_kernel_structs_match_openssl(pki, tls12, seqs, side):
    """After the handshake and one request/reply: the exact sequence numbers
    (TLS 1.3: 1 each way; TLS 1.2: Finished + 1), and keys that OpenSSL agrees with."""
    client, server = pair(pki, tls12)
    connect(client, server)
    if tls12 is None:
        assert client.cipher == TLS13_SUITE
    else:
        assert client.cipher == tls12
    request_reply(client, server)
    spent, live = (server, client) if side == "server" else (client, server)
    tx, rx = infos(spent)
    assert (tx.seq, rx.seq) == seqs
    assert tx.version == (0x0304 if tls12 is None else 0x0303)
    check_against_openssl(spent, tx, rx, live)


def test_tls12_gcm_explicit_nonce_continues_past_openssls(pki):
    """The kernel's first explicit nonce is one past the last one OpenSSL sent under
    the same key: a GCM nonce is never used twice."""
    client, server = pair(pki, "ECDHE-ECDSA-AES128-GCM-SHA256")
    connect(client, server)
    client.write(b"request")
    (record,) = split_records(client.outgoing())
    client.receive_any(b"")  # nothing
    tx, _ = infos(client)
    assert int.from_bytes(tx.iv, "big") == (int.from_bytes(record[5:13], "big") + 1) % (1 << 64)


def test_tls13_session_tickets_count(pki):
    client, server = pair(pki)
    server_ctx = pki.server_ctx()
    server_ctx.num_tickets = 2
    server = TlsEngine(server_ctx, True)
    connect(client, server)
    request_reply(client, server)
    s_tx, _ = infos(server)
    c_tx, c_rx = infos(client)
    assert (s_tx.seq, c_rx.seq, c_tx.seq) == (3, 3, 1)  # 2 tickets + the reply
    assert c_rx.open(s_tx.seal(b"x", s_tx.seq), c_rx.seq) == (23, b"x")


def test_tls13_application_data_fed_with_the_finished(pki):
    """Not record-exact: the client's request arrives in the same read as its
    Finished; only records OpenSSL consumed after completion count."""
    client, server = pair(pki)
    client.handshake()
    transfer(client, server)
    transfer(server, client)
    assert client.complete
    client.write(b"request")
    server.receive_any(client.outgoing())  # Finished (+ Certificate...) and the request
    assert server.handshake() is True
    assert server.read() == b"request"
    server.write(b"reply")
    for record in split_records(server.outgoing()):
        client.receive_any(record)
    assert client.read() == b"reply"
    tx, rx = infos(server)
    assert (tx.seq, rx.seq) == (1, 1)
    check_against_openssl(server, tx, rx, client)


@pytest.mark.parametrize(
    "suite", ["TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256"])
def test_tls13_suites(tmp_path, suite):
    """Python 3.11 cannot choose TLS 1.3 suites; OpenSSL's config can: rerun the
    TLS 1.3 struct test in a process with ``Ciphersuites`` set."""
    conf = tmp_path / "openssl.cnf"
    conf.write_text("openssl_conf = default_conf\n[default_conf]\nssl_conf = ssl_sect\n"
                    "[ssl_sect]\nsystem_default = system_default_sect\n"
                    f"[system_default_sect]\nCiphersuites = {suite}\n")
    env = dict(os.environ, OPENSSL_CONF=str(conf), USBIPX_TEST_TLS13_SUITE=suite)
    # The venv's pytest script, not ``python -m pytest``: that would put the
    # checkout (not the installed package) first on sys.path.
    pytest_bin = Path(sys.executable).with_name("pytest")
    run = subprocess.run(
        [str(pytest_bin), "-q", "-p", "no:cacheprovider",
         f"{__file__}::test_kernel_structs_match_openssl", "-k", "tls13"],
        env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed" in run.stdout


# -- when the handoff must not happen -----------------------------------------------------

def test_pending_input_refuses_kernel_crypto(pki):
    client, server = pair(pki)
    connect(client, server)
    client.write(b"request")
    transfer(client, server)  # in OpenSSL's input, not read yet
    assert server.pending() > 0
    with pytest.raises(KtlsUnavailable, match="still in user space"):
        server.kernel_crypto()
    assert server.read() == b"request"  # still usable after the refusal
    client.write(b"x")
    record = client.outgoing()
    server.receive(record[:3])  # a partial record
    assert server.pending() == 3
    with pytest.raises(KtlsUnavailable, match="3 bytes of TLS input"):
        server.kernel_crypto()
    server.receive_any(record[3:])
    assert server.read() == b"x"
    tx, rx = infos(server)
    assert (tx.seq, rx.seq) == (0, 2)


def test_engine_is_spent_after_kernel_crypto(pki):
    client, server = pair(pki)
    connect(client, server)
    server.kernel_crypto()
    for call in (server.read, server.outgoing, server.handshake, server.kernel_crypto,
                 lambda: server.write(b"x"), lambda: server.receive(b"\x17")):
        with pytest.raises(RuntimeError, match="handed to the kernel"):
            call()


def test_kernel_crypto_misuse(pki):
    client, server = pair(pki)
    with pytest.raises(RuntimeError, match="not complete"):
        client.kernel_crypto()
    connect(client, server)
    client.write(b"unsent")
    with pytest.raises(RuntimeError, match="send outgoing"):
        client.kernel_crypto()


def test_close_is_idempotent_and_spends(pki):
    client, server = pair(pki)
    connect(client, server)
    client.close()
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.write(b"x")


def ssl_peer(pki: Pki, server: TlsEngine) -> tuple[ssl.SSLObject, ssl.MemoryBIO]:
    """A plain ssl.SSLObject client connected to ``server``: (object, its output BIO)."""
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    peer = pki.client_ctx().wrap_bio(c_in, c_out, server_hostname="localhost")
    while True:
        try:
            peer.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        server.receive_any(c_out.read())
        server.handshake()
        c_in.write(server.outgoing())
        if done and server.complete:
            return peer, c_out


def close_notify(peer: ssl.SSLObject) -> None:
    with contextlib.suppress(ssl.SSLWantReadError):  # sent; the answer is not awaited
        peer.unwrap()


def test_close_notify_alone_is_the_end(pki):
    """A close_notify in a record of its own, after all data was read."""
    server = TlsEngine(pki.server_ctx(), True)
    peer, wire = ssl_peer(pki, server)
    peer.write(b"data")
    server.receive_any(wire.read())
    assert server.read() == b"data"
    close_notify(peer)
    server.receive_any(wire.read())
    with pytest.raises(TlsClosed, match="peer closed the TLS connection"):
        server.read()


def test_close_notify_then_the_end(pki):
    """Plaintext ahead of a close_notify is returned first; then TlsClosed."""
    server = TlsEngine(pki.server_ctx(), True)
    peer, wire = ssl_peer(pki, server)
    peer.write(b"last words")
    close_notify(peer)
    server.receive_any(wire.read())
    assert server.read() == b"last words"
    with pytest.raises(TlsClosed, match="peer closed the TLS connection"):
        server.read()
    with pytest.raises(TlsClosed):
        server.read()
    with pytest.raises(TlsClosed, match="peer closed the TLS connection"):
        server.kernel_crypto()  # a connection that ended cannot go to the kernel


# -- failures have reasons --------------------------------------------------------------

def test_client_certificate_from_another_ca(pki):
    client = TlsEngine(pki.client_ctx("board", ca="other", trust="main"), False, "localhost")
    server = TlsEngine(pki.server_ctx(), True)
    client.handshake()
    transfer(client, server)
    transfer(server, client)
    assert client.complete  # TLS 1.3: the client learns of the refusal later
    with pytest.raises(TlsError, match=r"^TLS handshake failed: certificate verify failed "
                                       r"\(unable to get local issuer certificate\)$"):
        transfer(client, server)
    with pytest.raises(TlsError, match=r"^TLS handshake failed: certificate verify failed"):
        server.handshake()  # and again
    client.receive_any(server.outgoing())  # the alert
    with pytest.raises(TlsError, match=r"^TLS connection failed: peer sent TLS alert unknown ca$"):
        client.read()


def test_server_from_an_unknown_ca(pki):
    client = TlsEngine(pki.client_ctx(trust="other"), False, "localhost")
    server = TlsEngine(pki.server_ctx(), True)
    with pytest.raises(TlsError, match=r"^TLS handshake failed: certificate verify failed "
                                       r"\(self-signed certificate in certificate chain\)$"):
        connect(client, server)
    server.receive_any(client.outgoing())
    with pytest.raises(TlsError, match=r"peer sent TLS alert unknown ca$"):
        server.handshake()


def test_wrong_hostname(pki):
    client = TlsEngine(pki.client_ctx(), False, "board.example")
    server = TlsEngine(pki.server_ctx(), True)
    with pytest.raises(TlsError, match=r"certificate verify failed \(Hostname mismatch, "
                                       r"certificate is not valid for 'board.example'.\)"):
        connect(client, server)


def test_expired_server_certificate(pki):
    client = TlsEngine(pki.client_ctx(), False, "localhost")
    server = TlsEngine(pki.server_ctx("expired"), True)
    with pytest.raises(TlsError, match=r"certificate verify failed \(certificate has expired\)"):
        connect(client, server)


def test_client_without_certificate(pki):
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_verify_locations(pki.root / "main" / "ca.crt")
    client = TlsEngine(cctx, False, "localhost")
    server = TlsEngine(pki.server_ctx(), True)
    with pytest.raises(TlsError, match="peer did not return a certificate"):
        connect(client, server)


@pytest.mark.parametrize("header", [
    b"GET /",                    # HTTP
    b"\x16\x03\x01\x48\x01",     # one byte over 2^14 + 2048
    b"\x16\x02\x01\x00\x10",     # version 2.x
    b"\x18\x03\x03\x00\x10",     # content type 24
    b"\x80\x2e\x01\x03\x01",     # an SSLv2-style hello
])
def test_malformed_record_header_is_an_error(pki, header):
    _, server = pair(pki)
    with pytest.raises(TlsError, match=rf"^not a TLS record \(header {header.hex()}\)$"):
        server.receive(header)
    with pytest.raises(TlsError):
        server.receive(b"\x16")  # no way back


def test_largest_record_is_accepted(pki):
    _, server = pair(pki)
    server.receive(b"\x17\x03\x03\x48\x00")
    assert server.needed() == (1 << 14) + 2048


def test_garbage_in_a_record_fails_the_handshake(pki):
    _, server = pair(pki)
    server.receive(b"\x16\x03\x01\x00\x05")
    server.receive(b"hello")
    with pytest.raises(TlsError, match=r"^TLS handshake failed: "):
        server.handshake()


def test_client_hello_fragmented_over_tiny_records(pki):
    """The client random is found even when the hello is split into 10-byte records."""
    client, server = pair(pki)
    client.handshake()
    body = client.outgoing()[5:]
    for i in range(0, len(body), 10):
        chunk = body[i:i + 10]
        server.receive_any(b"\x16\x03\x01" + len(chunk).to_bytes(2, "big") + chunk)
        server.handshake()
    connect(client, server)
    request_reply(client, server)
    tx, rx = infos(server)
    check_against_openssl(server, tx, rx, client)


def test_truncated_client_hello_waits_in_memory(pki):
    client, server = pair(pki)
    client.handshake()
    hello = client.outgoing()
    server.receive_any(hello[:40])
    assert server.handshake() is False  # no error, no hang: it wants the rest
    assert server.needed() == len(hello) - 40


# -- the key log ---------------------------------------------------------------------

def keylog_lines(ctx: ssl.SSLContext) -> tuple[int, list[bytes]]:
    log = tlskeylog._logs[ctx]
    size = os.fstat(log.fd).st_size
    data = os.pread(log.fd, size, 0)
    return size, [x for x in data.split(b"\n") if x.strip(b"\0") and not x.startswith(b"#")]


def test_secrets_are_wiped_then_the_log_truncated(pki):
    sctx = pki.server_ctx()
    idle = TlsEngine(sctx, True)  # another connection's handshake in flight
    client, server = TlsEngine(pki.client_ctx(), False, "localhost"), TlsEngine(sctx, True)
    connect(client, server)
    size, lines = keylog_lines(sctx)
    assert size > 0 and lines == []  # our lines were zeroed in place
    assert tlskeylog._logs[sctx].path == sctx.keylog_filename
    assert tlskeylog._logs[sctx].path.startswith("/proc/self/fd/")
    idle.close()
    assert keylog_lines(sctx) == (0, [])


def test_closing_a_key_log_whose_fd_is_gone_does_not_raise(pki):
    """Closing runs from a finalizer too (when the context dies), where an error
    would only print as an unraisable exception: an fd already gone is fine."""
    ctx = pki.server_ctx()
    tlskeylog.lease(ctx).release()
    log = tlskeylog._logs[ctx]
    os.close(log.fd)  # behind its back
    log.close()
    assert not log.current()


def test_releasing_a_lease_whose_key_log_fd_is_gone_does_not_raise(pki):
    """A lease is released from an engine's finalizer too: a failed truncate of
    its log (the lines are already zeroed) must not escape it."""
    ctx = pki.server_ctx()
    lease = tlskeylog.lease(ctx)
    log = tlskeylog._logs[ctx]
    os.close(log.fd)  # behind its back
    lease.release()
    assert log.users == 0
    log.fd = -1  # closed above: keep the teardown off a reused descriptor


def test_engine_keeps_only_the_kernels_secrets_and_drops_them(pki):
    client, server = pair(pki)
    connect(client, server)
    assert set(server._secrets) == {"CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0"}
    server.kernel_crypto()
    assert server._secrets == {}
    client.close()
    assert client._secrets == {}


def test_failed_handshake_wipes_its_secrets(pki):
    sctx = pki.server_ctx()
    client = TlsEngine(pki.client_ctx("board", ca="other", trust="main"), False, "localhost")
    server = TlsEngine(sctx, True)
    idle = TlsEngine(sctx, True)
    client.handshake()
    transfer(client, server)
    transfer(server, client)
    assert keylog_lines(sctx)[1]  # the server's secrets are in the log
    with pytest.raises(TlsError):
        transfer(client, server)
    assert keylog_lines(sctx)[1] == []
    idle.close()


def test_two_handshakes_interleaved_on_shared_contexts(pki):
    """Daemons share one context: each engine gets its own connection's secrets."""
    cctx, sctx = pki.client_ctx(), pki.server_ctx()
    c1, s1 = TlsEngine(cctx, False, "localhost"), TlsEngine(sctx, True)
    c2, s2 = TlsEngine(cctx, False, "localhost"), TlsEngine(sctx, True)
    c1.handshake()
    c2.handshake()
    for _ in range(4):
        for c, s in ((c1, s1), (c2, s2)):
            transfer(c, s)
        for c, s in ((c2, s2), (c1, s1)):
            transfer(s, c)
    assert all(e.complete for e in (c1, s1, c2, s2))
    for c, s in ((c1, s1), (c2, s2)):
        request_reply(c, s)
        tx, rx = infos(s)
        check_against_openssl(s, tx, rx, c)


def test_replayed_client_hello_fails_closed(pki):
    """Two server handshakes with one client random: neither may guess whose
    secrets are whose; the connection itself still works (for the relay)."""
    sctx = pki.server_ctx()
    client, server, replay = (TlsEngine(pki.client_ctx(), False, "localhost"),
                              TlsEngine(sctx, True), TlsEngine(sctx, True))
    client.handshake()
    hello = client.outgoing()
    for s in (server, replay):
        s.receive_any(hello)
        s.handshake()
    connect(client, server)
    request_reply(client, server)
    with pytest.raises(KtlsUnavailable, match="two sessions with this client random"):
        server.kernel_crypto()
    replay.close()


def test_replayed_client_hello_closed_first_fails_closed(pki):
    """The replay's end wipes every line of that client random: no keys, no kTLS."""
    sctx = pki.server_ctx()
    client, server, replay = (TlsEngine(pki.client_ctx(), False, "localhost"),
                              TlsEngine(sctx, True), TlsEngine(sctx, True))
    client.handshake()
    hello = client.outgoing()
    for s in (server, replay):
        s.receive_any(hello)
        s.handshake()
    replay.close()
    connect(client, server)
    request_reply(client, server)
    with pytest.raises(KtlsUnavailable, match="no SERVER_TRAFFIC_SECRET_0"):
        server.kernel_crypto()


def test_no_keylog_still_handshakes(pki, monkeypatch):
    def no_log(ctx):
        raise KtlsUnavailable("no in-memory TLS key log: test")

    monkeypatch.setattr(tlskeylog, "lease", no_log)
    client, server = pair(pki)
    connect(client, server)
    request_reply(client, server)
    with pytest.raises(KtlsUnavailable, match="no in-memory TLS key log: test"):
        server.kernel_crypto()


def test_forked_child_has_its_own_keylog(pki):
    cctx, sctx = pki.client_ctx(), pki.server_ctx()
    client, server = TlsEngine(cctx, False, "localhost"), TlsEngine(sctx, True)
    client.handshake()
    transfer(client, server)  # the server has logged its secrets
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports by exit status
        code = 1
        try:
            c2, s2 = TlsEngine(cctx, False, "localhost"), TlsEngine(sctx, True)
            connect(c2, s2)
            request_reply(c2, s2)
            tx, rx = infos(s2)
            check_against_openssl(s2, tx, rx, c2)
            code = 0 if tlskeylog._logs[sctx].pid == os.getpid() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    connect(client, server)
    request_reply(client, server)
    tx, rx = infos(server)
    check_against_openssl(server, tx, rx, client)


# -- the socket drivers -------------------------------------------------------------

def test_blocking_client_and_asyncio_server(pki):
    csock, ssock = tcp_pair()
    ssock.setblocking(False)
    client, server = pair(pki)
    result: dict[str, object] = {}

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(handshake_async(loop, ssock, server), 10)
        request = b""
        while not request:
            request = await recv_async(loop, ssock, server)
        await send_async(loop, ssock, server, b"reply to " + request)
        result["infos"] = infos(server)

    thread = threading.Thread(target=lambda: asyncio.run(serve()))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        handshake_blocking(csock, client, deadline)
        send_blocking(csock, client, b"request", deadline)
        reply = b""
        while not reply:
            reply = recv_blocking(csock, client, deadline)
    finally:
        thread.join(10)
    assert reply == b"reply to request"
    assert csock.gettimeout() is None  # the drivers leave the socket as they found it
    s_tx, s_rx = result["infos"]
    c_tx, c_rx = infos(client)
    assert (c_tx.seq, c_rx.seq, s_tx.seq, s_rx.seq) == (1, 1, 1, 1)
    assert (c_tx.key, c_rx.key) == (s_rx.key, s_tx.key)
    csock.close()
    ssock.close()


def test_silent_server_times_out(pki):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        csock = socket.create_connection(listener.getsockname())
        peer, _ = listener.accept()
    client, _ = pair(pki)
    start = time.monotonic()
    with csock, peer, pytest.raises(TlsError, match=r"^no TLS handshake within 0.5 s$"):
        handshake_blocking(csock, client, start + 0.5)
    assert time.monotonic() - start < 5


def hello_bytes(pki: Pki) -> bytes:
    client, _ = pair(pki)
    client.handshake()
    return client.outgoing()


def test_truncated_client_hello_then_close(pki):
    csock, ssock = tcp_pair()
    _, server = pair(pki)
    csock.sendall(hello_bytes(pki)[:20])
    csock.close()
    with ssock, pytest.raises(
            TlsError, match=r"^peer closed the connection during the TLS handshake$"):
        handshake_blocking(ssock, server, time.monotonic() + 10)


def test_truncated_client_hello_then_silence(pki):
    csock, ssock = tcp_pair()
    _, server = pair(pki)
    csock.sendall(hello_bytes(pki)[:20])
    with csock, ssock, pytest.raises(TlsError, match=r"^no TLS handshake within 0.3 s$"):
        handshake_blocking(ssock, server, time.monotonic() + 0.3)


def test_junk_over_a_socket(pki):
    csock, ssock = tcp_pair()
    _, server = pair(pki)
    csock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with csock, ssock, pytest.raises(TlsError, match=r"^not a TLS record \(header 474554202f\)$"):
        handshake_blocking(ssock, server, time.monotonic() + 10)


def connected(pki: Pki) -> tuple[socket.socket, TlsEngine, socket.socket, TlsEngine]:
    """A TLS connection over loopback TCP, handshake done with the blocking driver."""
    csock, ssock = tcp_pair()
    client, server = pair(pki)
    thread = threading.Thread(
        target=handshake_blocking, args=(ssock, server, time.monotonic() + 10))
    thread.start()
    handshake_blocking(csock, client, time.monotonic() + 10)
    thread.join(10)
    assert server.complete
    return csock, client, ssock, server


def test_recv_blocking_times_out(pki):
    csock, client, ssock, _ = connected(pki)
    with csock, ssock, pytest.raises(TlsError, match=r"^no TLS record within 0.3 s$"):
        recv_blocking(csock, client, time.monotonic() + 0.3)


def test_recv_blocking_peer_closed(pki):
    csock, client, ssock, _ = connected(pki)
    ssock.close()
    with csock, pytest.raises(TlsError, match=r"^peer closed the connection$"):
        recv_blocking(csock, client, time.monotonic() + 10)


def test_send_blocking_times_out_on_a_peer_that_does_not_read(pki):
    csock, client, ssock, _ = connected(pki)
    with csock, ssock, pytest.raises(TlsError,
                                     match=r"^could not send to the TLS peer within 0.5 s$"):
        send_blocking(csock, client, bytes(32 << 20), time.monotonic() + 0.5)


def test_async_handshake_peer_closes(pki):
    csock, ssock = tcp_pair()
    ssock.setblocking(False)
    _, server = pair(pki)
    csock.close()

    async def run() -> None:
        await handshake_async(asyncio.get_running_loop(), ssock, server)

    with ssock, pytest.raises(TlsError, match=r"during the TLS handshake$"):
        asyncio.run(run())


def test_alert_reaches_the_peer_over_sockets(pki):
    """A client that refuses the server's certificate tells it why."""
    csock, ssock = tcp_pair()
    ssock.setblocking(False)
    client = TlsEngine(pki.client_ctx(trust="other"), False, "localhost")
    server = TlsEngine(pki.server_ctx(), True)
    errors: list[Exception] = []

    async def handshake() -> None:
        await handshake_async(asyncio.get_running_loop(), ssock, server)

    def serve() -> None:
        try:
            asyncio.run(asyncio.wait_for(handshake(), 10))
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    with pytest.raises(TlsError, match="certificate verify failed"):
        handshake_blocking(csock, client, time.monotonic() + 10)
    thread.join(10)
    csock.close()
    ssock.close()
    assert [str(e) for e in errors] == ["TLS handshake failed: peer sent TLS alert unknown ca"]


# -- module structure -----------------------------------------------------------

@pytest.mark.parametrize("first", ["usbipx.tlsengine", "usbipx.tlsio"])
def test_the_engine_loads_without_its_drivers(first: str) -> None:
    """tlsio imports the engine, never the other way (either may be imported first)."""
    probe = "\n".join([
        "import importlib, sys",
        f"importlib.import_module({first!r})",
        "import usbipx.tlsengine as engine",
        f"assert ('usbipx.tlsio' in sys.modules) == {first == 'usbipx.tlsio'}",
        "assert not hasattr(engine, 'handshake_blocking')",
    ])
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr

