"""Kernel TLS (kTLS): the record keys of a finished TLS session, installed on its TCP socket.

After the handshake and the one USB/IP request/reply done in user space, the
kernel (usbip-host, vhci_hcd) takes the socket over.  With kTLS the kernel
then encrypts and decrypts the records itself: we derive each direction's
key, nonce base and next record sequence number (:func:`key_info`) and hand
them to it with ``setsockopt`` (:func:`install`).

Supported: TLS 1.3 with its three default suites, and TLS 1.2 AEAD suites
(AES-GCM, ChaCha20-Poly1305).  Everything else raises :class:`KtlsUnavailable`;
callers then fall back to the user-space relay (:mod:`usbipx.relay`).

The structs are ``struct tls12_crypto_info_*`` of ``linux/tls.h`` (kernel 6.1
uapi; the same layout since 5.x).  Linux 6.1 cannot rekey: a KeyUpdate, a
renegotiation or any non-data record after the handoff ends the connection.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import re
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from usbipx.errors import UsbipError, describe_errno
from usbipx.log import logger

SOL_TLS = 282
TLS_TX = 1
TLS_RX = 2
TCP_ULP = 31  # socket.TCP_ULP appears only in Python 3.12
TCP_ULP_NAME_MAX = 16

TLS_1_2_VERSION = 0x0303
TLS_1_3_VERSION = 0x0304
TLS_CIPHER_AES_GCM_128 = 51
TLS_CIPHER_AES_GCM_256 = 52
TLS_CIPHER_CHACHA20_POLY1305 = 54

CRYPTO_INFO_HEADER = struct.Struct("=HH")
"""``struct tls_crypto_info``: version and cipher type, in host byte order."""

SEQ_MAX = 1 << 64

# Labels of the NSS key log format (what OpenSSL's keylog callback writes).
LABEL_CLIENT_TRAFFIC = "CLIENT_TRAFFIC_SECRET_0"
LABEL_SERVER_TRAFFIC = "SERVER_TRAFFIC_SECRET_0"
LABEL_MASTER = "CLIENT_RANDOM"
"""TLS 1.2: the line carrying the master secret."""
KEY_LABELS = frozenset({LABEL_CLIENT_TRAFFIC, LABEL_SERVER_TRAFFIC, LABEL_MASTER})
"""The only key log lines :func:`key_info` needs."""


class KtlsUnavailable(UsbipError):
    """Why kernel TLS cannot carry this connection (no tls module, a suite or
    version the kernel cannot take, a refused setsockopt...); callers fall back
    to the user-space relay."""


@dataclass(frozen=True)
class Suite:
    """How one negotiated TLS suite maps to the kernel."""

    cipher_type: int
    key_len: int
    hash_name: str
    """The suite's hash: HKDF (1.3) or PRF (1.2)."""
    fixed_iv_len: int
    """Length of the IV from the TLS 1.2 key block: 4 (GCM salt) or 12 (ChaCha20).
    TLS 1.3 nonce bases are always 12 bytes."""

    @property
    def info_size(self) -> int:
        """Size of the kernel's crypto_info struct for this cipher (40 or 56)."""
        return _LAYOUT[self.cipher_type][0]


# cipher_type -> (struct size, iv field length, salt field length)
_LAYOUT = {
    TLS_CIPHER_AES_GCM_128: (40, 8, 4),
    TLS_CIPHER_AES_GCM_256: (56, 8, 4),
    TLS_CIPHER_CHACHA20_POLY1305: (56, 12, 0),
}

_TLS13_SUITES = {
    "TLS_AES_128_GCM_SHA256": Suite(TLS_CIPHER_AES_GCM_128, 16, "sha256", 12),
    "TLS_AES_256_GCM_SHA384": Suite(TLS_CIPHER_AES_GCM_256, 32, "sha384", 12),
    "TLS_CHACHA20_POLY1305_SHA256": Suite(TLS_CIPHER_CHACHA20_POLY1305, 32, "sha256", 12),
}

_TLS12_AEADS = {
    "AES128-GCM-SHA256": Suite(TLS_CIPHER_AES_GCM_128, 16, "sha256", 4),
    "AES256-GCM-SHA384": Suite(TLS_CIPHER_AES_GCM_256, 32, "sha384", 4),
    "CHACHA20-POLY1305": Suite(TLS_CIPHER_CHACHA20_POLY1305, 32, "sha256", 12),
}

_TLS12_NAME = re.compile(r"(?:(?:ECDHE|DHE)-(?:ECDSA|RSA)-)?(?P<aead>[A-Z0-9-]+)")
"""OpenSSL's names of the TLS 1.2 suites: key exchange, authentication, then the AEAD."""


def suite_for(version: str, cipher: str) -> Suite:
    """The kernel's view of ``cipher`` (an OpenSSL suite name) under ``version``
    (``TLSv1.3`` or ``TLSv1.2``, as :meth:`ssl.SSLObject.version` says)."""
    if version == "TLSv1.3":
        suite = _TLS13_SUITES.get(cipher)
        if suite is None:
            raise KtlsUnavailable(f"kernel TLS cannot take the TLS 1.3 suite {cipher}")
        return suite
    if version == "TLSv1.2":
        m = _TLS12_NAME.fullmatch(cipher)
        suite = _TLS12_AEADS.get(m.group("aead")) if m else None
        if suite is None:
            raise KtlsUnavailable(f"kernel TLS cannot take the TLS 1.2 suite {cipher} "
                                  "(only AES-GCM and ChaCha20-Poly1305)")
        return suite
    raise KtlsUnavailable(f"kernel TLS cannot take {version} (only TLS 1.2 and 1.3)")


# -- key derivation --------------------------------------------------------------


def hkdf_expand_label(secret: bytes, label: str, context: bytes, length: int,
                      hash_name: str) -> bytes:
    """HKDF-Expand-Label of RFC 8446 section 7.1."""
    full = b"tls13 " + label.encode("ascii")
    info = struct.pack(">H", length) + bytes([len(full)]) + full + bytes([len(context)]) + context
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(secret, block + info + bytes([counter]), hash_name).digest()
        out += block
        counter += 1
    return out[:length]


def tls12_prf(secret: bytes, label: bytes, seed: bytes, length: int, hash_name: str) -> bytes:
    """The TLS 1.2 PRF, P_hash(secret, label + seed), of RFC 5246 section 5."""
    seed = label + seed
    out, a = b"", seed
    while len(out) < length:
        a = hmac.new(secret, a, hash_name).digest()
        out += hmac.new(secret, a + seed, hash_name).digest()
    return out[:length]


def tls13_traffic_key(secret: bytes, suite: Suite) -> tuple[bytes, bytes]:
    """(write key, 12-byte nonce base) from a TLS 1.3 traffic secret (RFC 8446 7.3)."""
    return (hkdf_expand_label(secret, "key", b"", suite.key_len, suite.hash_name),
            hkdf_expand_label(secret, "iv", b"", 12, suite.hash_name))


def tls12_key_block(master: bytes, client_random: bytes, server_random: bytes,
                    suite: Suite) -> tuple[bytes, bytes, bytes, bytes]:
    """(client key, server key, client IV, server IV) of RFC 5246 6.3 for an AEAD
    suite (no MAC keys)."""
    k, v = suite.key_len, suite.fixed_iv_len
    block = tls12_prf(master, b"key expansion", server_random + client_random, 2 * (k + v),
                      suite.hash_name)
    return block[:k], block[k:2 * k], block[2 * k:2 * k + v], block[2 * k + v:]


def crypto_info(version: int, suite: Suite, key: bytes, nonce: bytes, seq: int) -> bytes:
    """One ``struct tls12_crypto_info_*`` for ``setsockopt(SOL_TLS, TLS_TX|TLS_RX)``.

    ``nonce`` is the 12-byte nonce base (TLS 1.3; TLS 1.2 ChaCha20), or for TLS
    1.2 AES-GCM the 4-byte salt followed by the 8-byte explicit nonce of the
    first record.  ``seq`` is the sequence number of the next record.

    Layouts (linux/tls.h): AES-GCM ``info, iv[8], key[16|32], salt[4],
    rec_seq[8]``; ChaCha20 ``info, iv[12], key[32], rec_seq[8]``.
    """
    size, iv_len, salt_len = _LAYOUT[suite.cipher_type]
    if len(key) != suite.key_len or len(nonce) != 12:
        raise ValueError("crypto_info: wrong key or nonce length")
    if not 0 <= seq < SEQ_MAX:
        raise ValueError(f"crypto_info: record sequence number {seq} out of range")
    salt, iv = nonce[:salt_len], nonce[salt_len:]
    info = (CRYPTO_INFO_HEADER.pack(version, suite.cipher_type) + iv + key + salt
            + seq.to_bytes(8, "big"))
    assert len(info) == size and len(iv) == iv_len
    return info


def key_info(version: str, cipher: str, secrets: Mapping[str, bytes], *, server_side: bool,
             tx_seq: int, rx_seq: int, client_random: bytes = b"",
             server_random: bytes = b"", tx_explicit_nonce: int | None = None,
             ) -> tuple[bytes, bytes]:
    """(tx_info, rx_info) for :func:`install`, from this end's point of view.

    ``secrets`` maps NSS key log labels to secrets: TLS 1.3 needs
    ``CLIENT_TRAFFIC_SECRET_0`` and ``SERVER_TRAFFIC_SECRET_0``; TLS 1.2 needs
    the master secret (label ``CLIENT_RANDOM``) and both hello randoms.
    ``tx_seq``/``rx_seq`` are the sequence numbers of the next record each way
    (records already carried under these keys).  ``tx_explicit_nonce`` (TLS 1.2
    AES-GCM) is the explicit nonce of the kernel's first record: one past the
    last one user space sent, so no nonce is ever used twice; default ``tx_seq``.
    """
    suite = suite_for(version, cipher)
    if version == "TLSv1.3":
        kver = TLS_1_3_VERSION
        client_key, client_iv = tls13_traffic_key(_need(secrets, LABEL_CLIENT_TRAFFIC), suite)
        server_key, server_iv = tls13_traffic_key(_need(secrets, LABEL_SERVER_TRAFFIC), suite)
        tx_nonce_extra = rx_nonce_extra = b""
    else:
        kver = TLS_1_2_VERSION
        if len(client_random) != 32 or len(server_random) != 32:
            raise KtlsUnavailable("TLS 1.2 key derivation needs both 32-byte hello randoms")
        client_key, server_key, client_iv, server_iv = tls12_key_block(
            _need(secrets, LABEL_MASTER), client_random, server_random, suite)
        if suite.fixed_iv_len == 4:  # GCM: salt + explicit nonce
            first = tx_seq if tx_explicit_nonce is None else tx_explicit_nonce
            tx_nonce_extra = (first % SEQ_MAX).to_bytes(8, "big")
            rx_nonce_extra = rx_seq.to_bytes(8, "big")  # the kernel reads it from each record
        else:
            tx_nonce_extra = rx_nonce_extra = b""
    if server_side:
        tx = (server_key, server_iv + tx_nonce_extra)
        rx = (client_key, client_iv + rx_nonce_extra)
    else:
        tx = (client_key, client_iv + tx_nonce_extra)
        rx = (server_key, server_iv + rx_nonce_extra)
    return (crypto_info(kver, suite, tx[0], tx[1], tx_seq),
            crypto_info(kver, suite, rx[0], rx[1], rx_seq))


def _need(secrets: Mapping[str, bytes], label: str) -> bytes:
    value = secrets.get(label)
    if not value:
        raise KtlsUnavailable(f"the TLS key log has no {label} for this connection")
    return value


# -- the socket ------------------------------------------------------------------


def _check_info(info: bytes) -> None:
    if len(info) < CRYPTO_INFO_HEADER.size:
        raise ValueError("crypto_info too short")
    version, cipher_type = CRYPTO_INFO_HEADER.unpack_from(info)
    layout = _LAYOUT.get(cipher_type)
    if version not in (TLS_1_2_VERSION, TLS_1_3_VERSION) or layout is None \
            or len(info) != layout[0]:
        raise ValueError(f"not a crypto_info struct: version {version:#06x}, "
                         f"cipher {cipher_type}, {len(info)} bytes")


def attach(sock: socket.socket) -> None:
    """Attach the kernel's ``tls`` ULP to ``sock`` (nothing if it is attached already).

    With no keys installed yet the socket still carries plain bytes, so a
    caller that then cannot install keys (a cipher the kernel lacks) can still
    relay over it.  :class:`KtlsUnavailable` if the kernel refuses (no ``tls``
    module): the socket is unchanged.
    """
    if _ulp(sock) == b"tls":
        return
    _setsockopt(sock, "TCP_ULP tls", socket.IPPROTO_TCP, TCP_ULP, b"tls")


def install(sock: socket.socket, tx_info: bytes, rx_info: bytes) -> None:
    """Hand ``sock``'s record encryption to the kernel: ``TCP_ULP "tls"`` (see
    :func:`attach`), then ``TLS_TX`` and ``TLS_RX`` (structs from :func:`key_info`).

    Any refusal raises :class:`KtlsUnavailable` naming the step and the errno.
    A socket where this failed after the ULP (e.g. TX set, RX refused) is in an
    undefined TLS state and must not be used any more, neither by the kernel
    nor for a relay: callers close it.  The first ``TLS_TX`` of a boot may take
    seconds while the kernel loads its AEAD (see :func:`preload`).
    """
    _check_info(tx_info)
    _check_info(rx_info)
    attach(sock)
    _setsockopt(sock, "TLS_TX", SOL_TLS, TLS_TX, tx_info)
    _setsockopt(sock, "TLS_RX", SOL_TLS, TLS_RX, rx_info)


def _setsockopt(sock: socket.socket, step: str, level: int, option: int, value: bytes) -> None:
    try:
        sock.setsockopt(level, option, value)
    except OSError as exc:
        raise KtlsUnavailable(
            f"kernel TLS: setsockopt {step} refused: {_errno_text(exc)}{_hint(step, exc)}"
        ) from None


def _ulp(sock: socket.socket) -> bytes | None:
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, TCP_ULP, TCP_ULP_NAME_MAX).rstrip(b"\0")
    except OSError:
        return None


def _errno_text(exc: OSError) -> str:
    return describe_errno(exc.errno) if exc.errno else str(exc)


def _hint(step: str, exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        what = "the tls module" if step.startswith("TCP_ULP") else "the kernel's AEAD (gcm)"
        return f"; {what} could not be loaded"
    return ""


def is_ktls(sock: socket.socket) -> bool:
    """True if ``sock`` has the ``tls`` ULP with both TX and RX keys installed.

    Reads only ``struct tls_crypto_info`` (version and cipher, 4 bytes): the
    kernel answers that size without copying the keys out, which the full
    40/56-byte struct would.
    """
    if _ulp(sock) != b"tls":
        return False
    for option in (TLS_TX, TLS_RX):
        try:
            head = sock.getsockopt(SOL_TLS, option, CRYPTO_INFO_HEADER.size)
        except OSError:
            return False  # EBUSY: that direction has no keys
        if len(head) != CRYPTO_INFO_HEADER.size:
            return False
        version, cipher_type = CRYPTO_INFO_HEADER.unpack(head)
        if version not in (TLS_1_2_VERSION, TLS_1_3_VERSION) or cipher_type not in _LAYOUT:
            return False
    return True


def preload() -> None:
    """Best effort: make the kernel load ``tls`` and its AEADs now, not at the
    first handoff (the first ``TLS_TX`` of a boot loads ``gcm``, ``ghash`` and
    runs crypto self-tests: seconds on a slow machine, while a concurrent
    ``TCP_ULP`` waits as long).

    Installs dummy keys on a throwaway loopback TCP pair: AES-GCM on one end,
    ChaCha20-Poly1305 on the other.  May block for those seconds; never raises.
    """
    try:
        _preload()
    except Exception as exc:  # best effort by contract: a daemon must start regardless
        logger.debug("kTLS preload failed: {}", exc)


def _preload() -> None:
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        client = stack.enter_context(socket.create_connection(listener.getsockname(), 5))
        server, _ = listener.accept()
        stack.enter_context(server)
        ciphers = (TLS_CIPHER_AES_GCM_256, TLS_CIPHER_CHACHA20_POLY1305)
        for sock, cipher_type in zip((client, server), ciphers, strict=True):
            suite = next(s for s in _TLS13_SUITES.values() if s.cipher_type == cipher_type)
            dummy = crypto_info(TLS_1_3_VERSION, suite, bytes(suite.key_len), bytes(12), 0)
            sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
            sock.setsockopt(SOL_TLS, TLS_TX, dummy)
