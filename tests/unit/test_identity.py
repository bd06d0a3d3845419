"""usbipx.identity: a peer's identity from getpeercert()'s dict, and policy patterns."""

from __future__ import annotations

import pytest

from usbipx.identity import identity_matches, is_identity, is_identity_pattern, peer_identity

# Real getpeercert() output from a handshake between certificates that
# `usbipx pki` issued (see test_pki.py::test_handshake_*): what the server saw
# of the board, and what the board saw of the server.
BOARD_AS_SEEN_BY_SERVER = {
    "issuer": ((("commonName", "usbipx CA"),),),
    "notAfter": "Mar  4 15:58:46 2029 GMT",
    "notBefore": "Nov 30 15:53:46 2026 GMT",
    "serialNumber": "56DC21E30D1274B236ACA76C4955AA7C",
    "subject": ((("commonName", "board-1"),),),
    "version": 3,
}
SERVER_AS_SEEN_BY_BOARD = {
    "issuer": ((("commonName", "usbipx CA"),),),
    "notAfter": "Mar  4 15:58:46 2029 GMT",
    "notBefore": "Nov 30 15:53:46 2026 GMT",
    "serialNumber": "A219502E83860B599C9A395EB2ABA767",
    "subject": ((("commonName", "appserver"),),),
    "subjectAltName": (
        ("DNS", "localhost"),
        ("IP Address", "127.0.0.1"),
        ("IP Address", "0:0:0:0:0:0:0:1"),
    ),
    "version": 3,
}


def without_cn(cert: dict[str, object], sans: tuple[tuple[str, str], ...]) -> dict[str, object]:
    """``cert`` with an organisation but no commonName in its subject, and ``sans``."""
    out = dict(cert)
    out["subject"] = ((("countryName", "DE"),), (("organizationName", "Lab"),))
    out["subjectAltName"] = sans
    return out


def test_real_getpeercert_output() -> None:
    assert peer_identity(BOARD_AS_SEEN_BY_SERVER) == "board-1"
    assert peer_identity(SERVER_AS_SEEN_BY_BOARD) == "appserver"


def test_common_name_wins_over_san() -> None:
    cert = dict(SERVER_AS_SEEN_BY_BOARD, subject=(
        (("countryName", "DE"),), (("organizationName", "Lab"),), (("commonName", "pi-7"),)))
    assert peer_identity(cert) == "pi-7"


@pytest.mark.parametrize(("sans", "expected"), [
    ((("DNS", "a.lab.example"), ("DNS", "b.lab.example")), "a.lab.example"),
    # DNS first, wherever it is in the list; then URI; then IP address
    ((("IP Address", "10.0.0.1"), ("URI", "spiffe://lab/board-3"), ("DNS", "b3.lab")), "b3.lab"),
    ((("IP Address", "10.0.0.1"), ("URI", "spiffe://lab/board-3")), "spiffe://lab/board-3"),
    ((("email", "x@lab.example"), ("IP Address", "0:0:0:0:0:0:0:1")), "0:0:0:0:0:0:0:1"),
    ((("email", "x@lab.example"), ("DirName", ((("commonName", "x"),),))), None),
    ((), None),
])
def test_no_common_name_falls_back_to_san(sans: tuple[tuple[str, str], ...],
                                          expected: str | None) -> None:
    assert peer_identity(without_cn(BOARD_AS_SEEN_BY_SERVER, sans)) == expected


def test_no_subject_no_san() -> None:
    cert = dict(BOARD_AS_SEEN_BY_SERVER)
    del cert["subject"]
    assert peer_identity(cert) is None
    # getpeercert() of an unverified peer is {}; of no certificate, None
    assert peer_identity({}) is None
    assert peer_identity(None) is None


@pytest.mark.parametrize("cn", [
    "board 1", "board-1\n", "board-1\x00", "../../etc/passwd\n", "a;b", "a,b", "a\"b", "a'b",
    "böard", "board\u200b1", "x" * 256, "", "a*b", "a{b}", "%s", "$(id)",
])
def test_weird_common_name_is_no_identity(cn: str) -> None:
    cert = dict(BOARD_AS_SEEN_BY_SERVER, subject=((("commonName", cn),),))
    assert peer_identity(cert) is None


def test_weird_common_name_does_not_fall_back_to_san() -> None:
    """A bad CN means a bad certificate, not 'use the next name'."""
    cert = dict(SERVER_AS_SEEN_BY_BOARD, subject=((("commonName", "bad name"),),))
    assert peer_identity(cert) is None


def test_weird_san_is_no_identity() -> None:
    cert = without_cn(BOARD_AS_SEEN_BY_SERVER, (("DNS", "a b.example"), ("DNS", "ok.example")))
    assert peer_identity(cert) is None


@pytest.mark.parametrize("ok", ["x", "board-1", "spiffe://lab/board-3", "user@lab", "a+b=c",
                                "0:0:0:0:0:0:0:1", "x" * 255])
def test_acceptable_identities(ok: str) -> None:
    cert = dict(BOARD_AS_SEEN_BY_SERVER, subject=((("commonName", ok),),))
    assert peer_identity(cert) == ok


def test_two_common_names_are_ambiguous() -> None:
    cert = dict(BOARD_AS_SEEN_BY_SERVER,
                subject=((("commonName", "board-1"),), (("commonName", "admin"),)))
    assert peer_identity(cert) is None
    # and in one multi-valued RDN
    cert["subject"] = ((("commonName", "board-1"), ("commonName", "admin")),)
    assert peer_identity(cert) is None


@pytest.mark.parametrize("subject", [
    "CN=board-1", (("commonName", "board-1"),), ((("commonName",),),), 42,
    ((("commonName", b"board-1"),),),
])
def test_malformed_shapes_are_no_identity(subject: object) -> None:
    cert = dict(BOARD_AS_SEEN_BY_SERVER, subject=subject)
    assert peer_identity(cert) is None
    cert = without_cn(BOARD_AS_SEEN_BY_SERVER, ())
    cert["subjectAltName"] = "DNS:board-1"
    assert peer_identity(cert) is None


@pytest.mark.parametrize(("pattern", "identity", "expected"), [
    ("board-17", "board-17", True),
    ("board-17", "board-1", False),
    ("board-1", "board-17", False),
    ("Board-17", "board-17", False),  # case-sensitive, like the identities themselves
    ("board-*", "board-17", True),
    ("board-*", "board-", True),
    ("board-*", "board", False),
    ("board-*", "board-17.evil.example", False),
    ("board-*", "board-1/x", False),
    ("board-*", "board-1:443", False),
    ("board-*", "board-1@lab", False),
    ("board-*", "xboard-17", False),
    ("*.lab.example", "pi.lab.example", True),
    ("*.lab.example", "a.b.lab.example", False),
    ("*.lab.example", "lab.example", False),
    ("b*-*", "board-17", True),
    ("spiffe://lab/board-*", "spiffe://lab/board-3", True),
    ("spiffe://lab/board-*", "spiffe://lab/board-3/../admin", False),
    ("*", "board-17", True),
    ("*", "spiffe://lab/board-3", True),
    ("*", "a.b.c", True),
    ("*", "bad name", False),  # not an identity: matches nothing
    ("*", "", False),
    ("board-?", "board-1", False),  # only * is special
    ("board-[0-9]", "board-1", False),
    ("board.1", "boardx1", False),  # . is literal
    ("", "", False),
    ("bad pattern*", "bad patternx", False),
])
def test_identity_matches(pattern: str, identity: str, expected: bool) -> None:
    assert identity_matches(pattern, identity) is expected


def test_validators() -> None:
    assert is_identity("board-1") and not is_identity("board 1") and not is_identity("")
    assert is_identity_pattern("board-*") and is_identity_pattern("*")
    assert not is_identity_pattern("board-?") and not is_identity_pattern("")
