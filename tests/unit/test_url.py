"""Peer and listening URLs: every accepted form, and the refusals."""

from __future__ import annotations

import pytest

from usbipx.errors import ValidationError
from usbipx.url import Endpoint, parse_endpoint


@pytest.mark.parametrize(("text", "expected"), [
    ("app.example.net", Endpoint("tcp", "app.example.net", 3240)),
    ("10.0.0.1", Endpoint("tcp", "10.0.0.1", 3240)),
    ("[fd00::1]", Endpoint("tcp", "fd00::1", 3240)),
    ("tcp://10.0.0.1:4000", Endpoint("tcp", "10.0.0.1", 4000)),
    ("tls://app.example.net", Endpoint("tls", "app.example.net", 3240)),
    ("tls://[::1]:3241", Endpoint("tls", "::1", 3241)),
    ("tls://app.example.net/", Endpoint("tls", "app.example.net", 3240)),
    ("wss://app.example.net", Endpoint("wss", "app.example.net", 443, "/")),
    ("wss://app.example.net:8443/usbip/v1", Endpoint("wss", "app.example.net", 8443,
                                                     "/usbip/v1")),
    ("0.0.0.0", Endpoint("tcp", "0.0.0.0", 3240)),
    ("::1", Endpoint("tcp", "::1", 3240)),  # the C tools' -r ::1
    ("fd00::1", Endpoint("tcp", "fd00::1", 3240)),
])
def test_accepted(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text) == expected


def test_the_default_port_is_the_global_one_except_for_wss() -> None:
    assert parse_endpoint("h", 4000).port == 4000
    assert parse_endpoint("tls://h", 4000).port == 4000
    assert parse_endpoint("wss://h", 4000).port == 443


@pytest.mark.parametrize(("text", "why"), [
    ("", "bad remote"),
    ("http://h", "unknown scheme http://"),
    ("TLS://h", "bad remote"),
    ("tls://h:0", "must be 1..65535"),
    ("tls://h:70000", "must be 1..65535"),
    ("h:12a", "bad remote"),
    ("tls://h/path", "only wss:// URLs have a path"),
    ("wss://h/a b", "bad path"),
    ("wss://h/a\n", "bad remote"),
    ("h\n", "bad host"),
    ("bad_host", "bad host"),
    ("-h", "bad host"),
    ("[not-v6]", "not an IPv6 address"),
    ("fd00::zz", "bad remote"),
    ("tls://user@h", "bad host"),
    ("a" * 64 + ".example", "bad host"),
])
def test_refused(text: str, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        parse_endpoint(text)


def test_printed_forms() -> None:
    assert str(parse_endpoint("tls://[::1]:3241")) == "tls://[::1]:3241"
    assert str(parse_endpoint("h")) == "tcp://h:3240"
    assert str(parse_endpoint("wss://h/x")) == "wss://h:443/x"
    assert parse_endpoint("[::1]").hostport == "[::1]:3240"
    assert parse_endpoint("tls://h").secure and not parse_endpoint("h").secure
