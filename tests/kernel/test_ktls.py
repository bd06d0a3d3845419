"""Kernel TLS on the lab kernel: a TlsEngine handshake and one request/reply in user
space, then the keys installed with usbipx.ktls and data through plain send/recv.

(End-to-end USB/IP over kTLS is the integration's test; this is the mechanism.)
"""

from __future__ import annotations

import errno
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from labkit import kernel_crypto, tls_stat, wait_for

from usbipx import ktls, pki, tlsconf
from usbipx.tlsengine import TlsEngine
from usbipx.tlsio import handshake_blocking, recv_blocking, send_blocking

pytestmark = pytest.mark.kernel

MB = 1 << 20


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki") / "ca"
    pki.init_ca(root)
    pki.issue(root, "server", servers=["127.0.0.1"])
    pki.issue(root, "board")
    return root


def contexts(ca: Path, tls12: str | None) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    def files(name: str) -> tlsconf.TlsFiles:
        return tlsconf.TlsFiles(ca / f"{name}.crt", ca / f"{name}.key", ca / "ca.crt")

    cctx, sctx = tlsconf.client_context(files("board")), tlsconf.server_context(files("server"))
    if tls12:
        cctx.maximum_version = ssl.TLSVersion.TLSv1_2
        sctx.set_ciphers(tls12)
    return cctx, sctx


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


class Background(threading.Thread):
    def __init__(self, fn: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:
            self.error = exc

    def value(self, timeout: float = 300) -> object:
        self.join(timeout)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error
        return self.result


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 16))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def handoff(ca: Path, tls12: str | None, rx_skew: int = 0
            ) -> tuple[socket.socket, socket.socket, TlsEngine]:
    """Mutual TLS and one request/reply in user space over 127.0.0.1, then kTLS on
    both sockets.  ``rx_skew`` spoils the server's receive sequence number."""
    cctx, sctx = contexts(ca, tls12)
    csock, ssock = tcp_pair()
    client, server = TlsEngine(cctx, False, "127.0.0.1"), TlsEngine(sctx, True)

    def serve() -> None:
        deadline = time.monotonic() + 60
        handshake_blocking(ssock, server, deadline)
        request = b""
        while not request:
            request = recv_blocking(ssock, server, deadline)
        assert request == b"OP_REQ_IMPORT"
        send_blocking(ssock, server, b"OP_REP_IMPORT", deadline)
        tx, rx = server.kernel_crypto()
        seq = int.from_bytes(rx[-8:], "big") + rx_skew
        ktls.install(ssock, tx, rx[:-8] + seq.to_bytes(8, "big"))

    served = Background(serve)
    deadline = time.monotonic() + 60
    handshake_blocking(csock, client, deadline)
    send_blocking(csock, client, b"OP_REQ_IMPORT", deadline)
    reply = b""
    while not reply:
        reply = recv_blocking(csock, client, deadline)
    assert reply == b"OP_REP_IMPORT"
    ktls.install(csock, *client.kernel_crypto())
    served.value()
    return csock, ssock, client


def test_preload_loads_tls_and_the_aeads():
    """After preload the kernel has tls and both AEADs instantiated, whichever module
    provides them (the gcm template, or aesni_intel's own gcm(aes) on the lab's CPU)."""
    ktls.preload()
    modules = {line.split()[0] for line in Path("/proc/modules").read_text().splitlines()}
    assert "tls" in modules
    names = {alg.get("name") for alg in kernel_crypto()}
    assert {"gcm(aes)", "rfc7539(chacha20,poly1305)"} <= names


@pytest.mark.parametrize("tls12", [
    pytest.param(None, id="tls13"),
    pytest.param("ECDHE-ECDSA-AES128-GCM-SHA256", id="tls12-aes128gcm"),
    pytest.param("ECDHE-ECDSA-AES256-GCM-SHA384", id="tls12-aes256gcm"),
    pytest.param("ECDHE-ECDSA-CHACHA20-POLY1305", id="tls12-chacha20"),
])
def test_one_megabyte_each_way_through_ktls(ca, tls12):
    before = tls_stat()
    csock, ssock, client = handoff(ca, tls12)
    assert client.version == ("TLSv1.2" if tls12 else "TLSv1.3")
    assert ktls.is_ktls(csock) and ktls.is_ktls(ssock)
    during = tls_stat()
    assert during["TlsCurrTxSw"] - before["TlsCurrTxSw"] == 2
    assert during["TlsCurrRxSw"] - before["TlsCurrRxSw"] == 2
    up, down = bytes(range(256)) * (MB // 256), bytes(reversed(range(256))) * (MB // 256)
    senders = [Background(lambda: csock.sendall(up)), Background(lambda: ssock.sendall(down))]
    got_down = Background(lambda: recv_exactly(csock, MB))
    assert recv_exactly(ssock, MB) == up
    assert got_down.value() == down
    for s in senders:
        s.value()
    assert tls_stat()["TlsDecryptError"] == before["TlsDecryptError"]
    csock.close()
    ssock.close()
    wait_for(lambda: tls_stat()["TlsCurrTxSw"] == before["TlsCurrTxSw"], 10,
             what="kTLS contexts to be released")


def test_is_ktls_false_on_a_plain_socket():
    csock, ssock = tcp_pair()
    with csock, ssock:
        assert not ktls.is_ktls(csock)
        csock.setsockopt(socket.IPPROTO_TCP, ktls.TCP_ULP, b"tls")  # ULP, but no keys
        assert not ktls.is_ktls(csock)


def test_install_twice_is_refused_with_the_step(ca):
    csock, ssock, _ = handoff(ca, None)
    with csock, ssock, pytest.raises(ktls.KtlsUnavailable,
                                     match=r"setsockopt TLS_TX refused: EBUSY"):
        ktls.install(csock, *_dummy_infos())


def _dummy_infos() -> tuple[bytes, bytes]:
    suite = ktls.suite_for("TLSv1.3", "TLS_AES_128_GCM_SHA256")
    info = ktls.crypto_info(ktls.TLS_1_3_VERSION, suite, bytes(16), bytes(12), 0)
    return info, info


def test_off_by_one_rx_sequence_number_fails_to_decrypt(ca):
    """The record accounting matters: one record off and the first read fails."""
    before = tls_stat()
    csock, ssock, _ = handoff(ca, None, rx_skew=1)
    with csock, ssock:
        csock.sendall(b"first URB")
        ssock.settimeout(30)
        with pytest.raises(OSError) as err:
            ssock.recv(100)
        assert err.value.errno == errno.EBADMSG
    assert tls_stat()["TlsDecryptError"] == before["TlsDecryptError"] + 1
