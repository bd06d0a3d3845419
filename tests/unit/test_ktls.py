"""usbipx.ktls: key derivation against published vectors, the kernel's struct
layouts byte for byte, and what can be checked of install/is_ktls on a host
without kernel TLS (the real installation is tests/kernel/test_ktls.py)."""

from __future__ import annotations

import socket
import sys

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from usbipx import ktls
from usbipx.ktls import KtlsUnavailable


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def head(version: int, cipher: int) -> bytes:
    """struct tls_crypto_info: two __u16 in host byte order, written out by hand."""
    lo = bytes([version & 0xFF, version >> 8, cipher & 0xFF, cipher >> 8])
    return lo if sys.byteorder == "little" else bytes([version >> 8, version & 0xFF, cipher >> 8, cipher & 0xFF])


# -- RFC 8448 section 3 (Simple 1-RTT Handshake, TLS_AES_128_GCM_SHA256) -------------

C_AP_SECRET = h("9e40646ce79a7f9dc05af8889bce6552875afa0b06df0087f792ebb7c17504a5")
S_AP_SECRET = h("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643")
C_AP_KEY, C_AP_IV = h("17422dda596ed5d9acd890e3c63f5051"), h("5b78923dee08579033e523d9")
S_AP_KEY, S_AP_IV = h("9f02283b6c9c07efc26bb9f2ac92e356"), h("cf782b88dd83549aadf1e984")
S_HS_SECRET = h("b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38")
S_HS_KEY, S_HS_IV = h("3fce516009c21727d0f2e4e86ee403bc"), h("5d313eb2671276ee13000b30")
# The server's application_data record (sequence number 1: its NewSessionTicket was 0)
# carrying 00 01 .. 31.
RFC_SERVER_RECORD = h("""
    17 03 03 00 43 2e 93 7e 11 ef 4a c7 40 e5 38 ad 36 00 5f c4 a4 69 32 fc 32 25 d0 5f
    82 aa 1b 36 e3 0e fa f9 7d 90 e6 df fc 60 2d cb 50 1a 59 a8 fc c4 9c 4b f2 e5 f0 a2
    1c 00 47 c2 ab f3 32 54 0d d0 32 e1 67 c2 95 5d""")
RFC_PLAINTEXT = bytes(range(0x32))

AES128 = ktls.suite_for("TLSv1.3", "TLS_AES_128_GCM_SHA256")


def test_hkdf_expand_label_reproduces_rfc8448_traffic_keys():
    assert ktls.tls13_traffic_key(C_AP_SECRET, AES128) == (C_AP_KEY, C_AP_IV)
    assert ktls.tls13_traffic_key(S_AP_SECRET, AES128) == (S_AP_KEY, S_AP_IV)
    assert ktls.tls13_traffic_key(S_HS_SECRET, AES128) == (S_HS_KEY, S_HS_IV)


def test_key_info_tls13_client_structs_are_exact():
    secrets = {"CLIENT_TRAFFIC_SECRET_0": C_AP_SECRET, "SERVER_TRAFFIC_SECRET_0": S_AP_SECRET}
    tx, rx = ktls.key_info("TLSv1.3", "TLS_AES_128_GCM_SHA256", secrets, server_side=False,
                           tx_seq=0, rx_seq=1)
    # tls12_crypto_info_aes_gcm_128: info, iv[8], key[16], salt[4], rec_seq[8] (big endian)
    assert tx == head(0x0304, 51) + h("ee08579033e523d9") + C_AP_KEY + h("5b78923d") \
        + h("0000000000000000")
    assert rx == head(0x0304, 51) + h("dd83549aadf1e984") + S_AP_KEY + h("cf782b88") \
        + h("0000000000000001")
    assert len(tx) == len(rx) == 40


def test_key_info_tls13_server_side_swaps_directions():
    secrets = {"CLIENT_TRAFFIC_SECRET_0": C_AP_SECRET, "SERVER_TRAFFIC_SECRET_0": S_AP_SECRET}
    tx, rx = ktls.key_info("TLSv1.3", "TLS_AES_128_GCM_SHA256", secrets, server_side=True,
                           tx_seq=7, rx_seq=0x0102030405060708)
    assert tx[12:28] == S_AP_KEY and tx[32:] == h("0000000000000007")
    assert rx[12:28] == C_AP_KEY and rx[32:] == h("0102030405060708")


def test_rx_struct_decrypts_the_rfc8448_server_record():
    """The struct's salt/iv split and rec_seq mean what the kernel makes of them:
    nonce = (salt || iv) XOR seq, the record header as additional data."""
    secrets = {"CLIENT_TRAFFIC_SECRET_0": C_AP_SECRET, "SERVER_TRAFFIC_SECRET_0": S_AP_SECRET}
    _, rx = ktls.key_info("TLSv1.3", "TLS_AES_128_GCM_SHA256", secrets, server_side=False,
                          tx_seq=0, rx_seq=1)
    iv, key, salt, seq = rx[4:12], rx[12:28], rx[28:32], int.from_bytes(rx[32:40], "big")
    nonce = bytes(a ^ b for a, b in zip(salt + iv, seq.to_bytes(12, "big"), strict=True))
    inner = AESGCM(key).decrypt(nonce, RFC_SERVER_RECORD[5:], RFC_SERVER_RECORD[:5])
    assert inner == RFC_PLAINTEXT + b"\x17"


# -- the TLS 1.2 PRF (the IETF TLS WG's published P_SHA256 / P_SHA384 vectors) ----------

def test_tls12_prf_sha256_vector():
    out = ktls.tls12_prf(h("9bbe436ba940f017b17652849a71db35"), b"test label",
                         h("a0ba9f936cda311827a6f796ffd5198c"), 100, "sha256")
    assert out == h("""
        e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a
        6b301791e90d35c9c9a46b4e14baf9af0fa022f7077def17abfd3797c0564bab
        4fbc91666e9def9b97fce34f796789baa48082d122ee42c5a72e5a5110fff701
        87347b66""")


def test_tls12_prf_sha384_vector():
    out = ktls.tls12_prf(h("b80b733d6ceefcdc71566ea48e5567df"), b"test label",
                         h("cd665cf6a8447dd6ff8b27555edb7465"), 148, "sha384")
    assert out == h("""
        7b0c18e9ced410ed1804f2cfa34a336a1c14dffb4900bb5fd7942107e81c83cd
        e9ca0faa60be9fe34f82b1233c9146a0e534cb400fed2700884f9dc236f80edd
        8bfa961144c9e8d792eca722a7b32fc3d416d473ebc2c5fd4abfdad05d918425
        9b5bf8cd4d90fa0d31e2dec479e4f1a26066f2eea9a69236a3e52655c9e9aee6
        91c8f3a26854308d5eaa3be85e0990703d73e56f""")


def test_key_info_tls12_gcm_uses_the_rfc5246_key_block_order():
    master, cr, sr = bytes(range(48)), b"\x01" * 32, b"\x02" * 32
    # key_block = PRF(master, "key expansion", server_random + client_random):
    # client_write_key | server_write_key | client_write_IV | server_write_IV (no MAC keys)
    block = ktls.tls12_prf(master, b"key expansion", sr + cr, 40, "sha256")
    ck, sk, civ, siv = block[0:16], block[16:32], block[32:36], block[36:40]
    tx, rx = ktls.key_info("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256", {"CLIENT_RANDOM": master},
                           server_side=False, tx_seq=2, rx_seq=3, client_random=cr,
                           server_random=sr, tx_explicit_nonce=0x1122334455667788)
    # iv = the explicit nonce of the first kernel record; salt = the implicit IV
    assert tx == head(0x0303, 51) + h("1122334455667788") + ck + civ + h("0000000000000002")
    assert rx == head(0x0303, 51) + h("0000000000000003") + sk + siv + h("0000000000000003")


def test_key_info_tls12_chacha_struct_is_exact():
    master, cr, sr = bytes(range(48)), b"\x03" * 32, b"\x04" * 32
    block = ktls.tls12_prf(master, b"key expansion", sr + cr, 88, "sha256")
    ck, sk, civ, siv = block[0:32], block[32:64], block[64:76], block[76:88]
    tx, rx = ktls.key_info("TLSv1.2", "ECDHE-RSA-CHACHA20-POLY1305", {"CLIENT_RANDOM": master},
                           server_side=True, tx_seq=2, rx_seq=2, client_random=cr,
                           server_random=sr)
    # tls12_crypto_info_chacha20_poly1305: info, iv[12], key[32], rec_seq[8]
    assert tx == head(0x0303, 54) + siv + sk + h("0000000000000002")
    assert rx == head(0x0303, 54) + civ + ck + h("0000000000000002")
    assert len(tx) == 56


def test_crypto_info_aes256_layout_is_exact():
    suite = ktls.suite_for("TLSv1.3", "TLS_AES_256_GCM_SHA384")
    key, nonce = bytes(range(32)), h("a0a1a2a3 b0b1b2b3b4b5b6b7")
    info = ktls.crypto_info(0x0304, suite, key, nonce, 0x0A0B)
    # tls12_crypto_info_aes_gcm_256: info, iv[8], key[32], salt[4], rec_seq[8]
    assert info == head(0x0304, 52) + h("b0b1b2b3b4b5b6b7") + key + h("a0a1a2a3") \
        + h("0000000000000a0b")
    assert len(info) == 56


def test_tls13_sha384_suite_uses_sha384():
    suite = ktls.suite_for("TLSv1.3", "TLS_AES_256_GCM_SHA384")
    secret = bytes(48)
    key, iv = ktls.tls13_traffic_key(secret, suite)
    assert key == ktls.hkdf_expand_label(secret, "key", b"", 32, "sha384")
    assert key != ktls.hkdf_expand_label(secret, "key", b"", 32, "sha256")
    assert len(iv) == 12


@pytest.mark.parametrize(("version", "cipher", "cipher_type"), [
    ("TLSv1.3", "TLS_AES_128_GCM_SHA256", 51),
    ("TLSv1.3", "TLS_AES_256_GCM_SHA384", 52),
    ("TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256", 54),
    ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256", 51),
    ("TLSv1.2", "ECDHE-RSA-AES256-GCM-SHA384", 52),
    ("TLSv1.2", "ECDHE-ECDSA-CHACHA20-POLY1305", 54),
    ("TLSv1.2", "DHE-RSA-AES128-GCM-SHA256", 51),
    ("TLSv1.2", "AES256-GCM-SHA384", 52),
])
def test_suite_for_supported(version, cipher, cipher_type):
    assert ktls.suite_for(version, cipher).cipher_type == cipher_type


@pytest.mark.parametrize(("version", "cipher"), [
    ("TLSv1.3", "TLS_AES_128_CCM_SHA256"),
    ("TLSv1.2", "ECDHE-ECDSA-AES128-SHA256"),
    ("TLSv1.2", "ECDHE-ECDSA-ARIA128-GCM-SHA256"),
    ("TLSv1.2", "ECDHE-ECDSA-AES128-CCM"),
    ("TLSv1.1", "ECDHE-ECDSA-AES128-SHA"),
])
def test_suite_for_refuses_what_the_kernel_cannot_take(version, cipher):
    with pytest.raises(KtlsUnavailable, match="kernel TLS cannot take"):
        ktls.suite_for(version, cipher)


def test_key_info_without_secrets_is_unavailable():
    with pytest.raises(KtlsUnavailable, match="no CLIENT_TRAFFIC_SECRET_0"):
        ktls.key_info("TLSv1.3", "TLS_AES_128_GCM_SHA256", {}, server_side=False,
                      tx_seq=0, rx_seq=0)
    with pytest.raises(KtlsUnavailable, match="hello randoms"):
        ktls.key_info("TLSv1.2", "AES128-GCM-SHA256", {"CLIENT_RANDOM": bytes(48)},
                      server_side=False, tx_seq=0, rx_seq=0)


def test_crypto_info_rejects_bad_sequence_numbers():
    with pytest.raises(ValueError, match="out of range"):
        ktls.crypto_info(0x0304, AES128, bytes(16), bytes(12), 1 << 64)
    with pytest.raises(ValueError, match="out of range"):
        ktls.crypto_info(0x0304, AES128, bytes(16), bytes(12), -1)


# -- the socket (a host without kernel TLS) ------------------------------------------

@pytest.fixture
def tcp_pair():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    yield client, server
    client.close()
    server.close()


def aes128_info(seq: int) -> bytes:
    return ktls.crypto_info(0x0304, AES128, bytes(16), bytes(12), seq)


def test_install_failure_names_the_step_and_errno():
    a, b = socket.socketpair()  # no TCP: TCP_ULP is refused on any kernel
    with a, b, pytest.raises(KtlsUnavailable, match=r"setsockopt TCP_ULP tls refused: E[A-Z]+ \("):
        ktls.install(a, aes128_info(0), aes128_info(0))


def test_install_rejects_malformed_structs_before_touching_the_socket(tcp_pair):
    client, _ = tcp_pair
    with pytest.raises(ValueError, match="not a crypto_info"):
        ktls.install(client, aes128_info(0)[:-1], aes128_info(0))
    with pytest.raises(ValueError, match="not a crypto_info"):
        ktls.install(client, aes128_info(0), b"\x04\x03\x99\x00" + bytes(36))
    assert client.getsockopt(socket.IPPROTO_TCP, ktls.TCP_ULP, 16).rstrip(b"\0") == b""


def test_is_ktls_false_on_plain_sockets(tcp_pair):
    client, server = tcp_pair
    assert not ktls.is_ktls(client)
    assert not ktls.is_ktls(server)
    a, b = socket.socketpair()
    with a, b:
        assert not ktls.is_ktls(a)


def test_preload_never_raises(monkeypatch):
    ktls.preload()  # this host has no kernel TLS: fails quietly

    def broken() -> None:
        raise RuntimeError("unexpected")

    monkeypatch.setattr(ktls, "_preload", broken)
    assert ktls.preload() is None
