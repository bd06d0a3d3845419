"""TLS test helpers: a throwaway PKI, an in-memory wire between two TlsEngines, and
an independent TLS record codec (``cryptography``'s AEADs) that checks what the
kernel would make of a crypto_info struct.

    pki = make_pki(tmp_path)
    client = TlsEngine(pki.client_ctx(), False, "localhost")
    server = TlsEngine(pki.server_ctx(), True)
    connect(client, server)
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from usbipx import pki as pkimod
from usbipx import tlsconf
from usbipx.tlsengine import TlsEngine

SERVER_NAMES = ["localhost", "127.0.0.1"]


@dataclass(frozen=True)
class Pki:
    """CA ``main`` (server, board, expired-server), CA ``other`` (server, board)."""

    root: Path

    def files(self, name: str, ca: str = "main", trust: str | None = None) -> tlsconf.TlsFiles:
        d = self.root / ca
        return tlsconf.TlsFiles(d / f"{name}.crt", d / f"{name}.key",
                                self.root / (trust or ca) / "ca.crt")

    def server_ctx(self, name: str = "server", ca: str = "main",
                   trust: str | None = None) -> ssl.SSLContext:
        return tlsconf.server_context(self.files(name, ca, trust))

    def client_ctx(self, name: str = "board", ca: str = "main",
                   trust: str | None = None) -> ssl.SSLContext:
        return tlsconf.client_context(self.files(name, ca, trust))


def make_pki(root: Path) -> Pki:
    for ca in ("main", "other"):
        pkimod.init_ca(root / ca, name=f"{ca} CA")
        pkimod.issue(root / ca, "server", servers=SERVER_NAMES)
        pkimod.issue(root / ca, "board")
    _expired_server(root / "main")
    return Pki(root)


def _expired_server(ca_dir: Path) -> None:
    """``expired.crt``: a server certificate of CA ``main`` whose not-after is past."""
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_path = ca_dir / "expired.key"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    (ca_dir / "expired.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# -- an in-memory wire ---------------------------------------------------------------

def split_records(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        end = pos + 5 + int.from_bytes(data[pos + 3:pos + 5], "big")
        out.append(data[pos:end])
        pos = end
    assert pos == len(data), "partial record"
    return out


def transfer(src: TlsEngine, dst: TlsEngine) -> int:
    """Deliver ``src``'s output to ``dst`` one record at a time, in pieces no larger
    than ``dst.needed()``; step ``dst``'s handshake after each record until it is
    complete (as the socket drivers do).  Returns the records delivered."""
    records = split_records(src.outgoing())
    for record in records:
        view = memoryview(record)
        while view:
            n = dst.needed()
            dst.receive(bytes(view[:n]))
            view = view[n:]
        if not dst.complete:
            dst.handshake()
    return len(records)


def connect(client: TlsEngine, server: TlsEngine) -> None:
    """The whole handshake in memory."""
    client.handshake()
    for _ in range(10):
        moved = transfer(client, server) + transfer(server, client)
        if client.complete and server.complete and not moved:
            return
    raise AssertionError("handshake did not finish")


def request_reply(client: TlsEngine, server: TlsEngine, request: bytes = b"OP_REQ_IMPORT",
                  reply: bytes = b"OP_REP_IMPORT") -> None:
    """One request and one reply through user space, as before a handoff."""
    client.write(request)
    transfer(client, server)
    assert server.read() == request
    server.write(reply)
    got = b""
    for record in split_records(server.outgoing()):
        client.receive_any(record)
        got += client.read()
    assert got == reply


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected blocking TCP sockets over 127.0.0.1: (client, server)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


# -- what the kernel would do with a crypto_info --------------------------------------

@dataclass(frozen=True)
class Info:
    """A parsed ``struct tls12_crypto_info_*``."""

    version: int
    cipher_type: int
    key: bytes
    salt: bytes
    iv: bytes
    seq: int

    @classmethod
    def parse(cls, raw: bytes) -> Info:
        version, cipher_type = struct.unpack_from("=HH", raw)
        if cipher_type == 54:  # chacha20: iv[12], key[32], rec_seq[8]
            assert len(raw) == 56
            return cls(version, cipher_type, raw[16:48], b"", raw[4:16],
                       int.from_bytes(raw[48:56], "big"))
        key_len = {51: 16, 52: 32}[cipher_type]  # gcm: iv[8], key, salt[4], rec_seq[8]
        assert len(raw) == 24 + key_len
        return cls(version, cipher_type, raw[12:12 + key_len], raw[12 + key_len:16 + key_len],
                   raw[4:12], int.from_bytes(raw[16 + key_len:24 + key_len], "big"))

    def _aead(self) -> AESGCM | ChaCha20Poly1305:
        return ChaCha20Poly1305(self.key) if self.cipher_type == 54 else AESGCM(self.key)

    def _xor_nonce(self, seq: int) -> bytes:
        base = self.salt + self.iv
        return bytes(a ^ b for a, b in zip(base, seq.to_bytes(12, "big"), strict=True))

    def seal(self, plaintext: bytes, seq: int, content_type: int = 23) -> bytes:
        """A record as the kernel would send it with these keys at ``seq``."""
        if self.version == 0x0304:
            inner = plaintext + bytes([content_type])
            header = bytes([23, 3, 3]) + (len(inner) + 16).to_bytes(2, "big")
            return header + self._aead().encrypt(self._xor_nonce(seq), inner, header)
        aad = seq.to_bytes(8, "big") + bytes([content_type, 3, 3]) \
            + len(plaintext).to_bytes(2, "big")
        if self.cipher_type == 54:
            body = self._aead().encrypt(self._xor_nonce(seq), plaintext, aad)
        else:  # the explicit nonce advances with the record count, from iv
            explicit = ((int.from_bytes(self.iv, "big") + seq - self.seq) % (1 << 64)) \
                .to_bytes(8, "big")
            body = explicit + self._aead().encrypt(self.salt + explicit, plaintext, aad)
        return bytes([content_type, 3, 3]) + len(body).to_bytes(2, "big") + body

    def open(self, record: bytes, seq: int) -> tuple[int, bytes]:
        """(content type, plaintext) of a record received at ``seq``."""
        header, body = record[:5], record[5:]
        if self.version == 0x0304:
            inner = self._aead().decrypt(self._xor_nonce(seq), body, header).rstrip(b"\0")
            return inner[-1], inner[:-1]
        if self.cipher_type == 54:
            nonce = self._xor_nonce(seq)
        else:
            nonce, body = self.salt + body[:8], body[8:]
        aad = seq.to_bytes(8, "big") + header[:3] + (len(body) - 16).to_bytes(2, "big")
        return header[0], self._aead().decrypt(nonce, body, aad)
