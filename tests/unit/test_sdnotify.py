"""systemd's notify protocol against real AF_UNIX datagram sockets (path and abstract)."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator

import pytest

from usbipx.daemon import sdnotify


@pytest.fixture
def listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """What systemd listens on: a datagram socket named by NOTIFY_SOCKET (a short path:
    sun_path holds 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="sdn") as d:
        path = os.path.join(d, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind(path)
            s.settimeout(2)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            yield s


def test_ready_arrives(listener: socket.socket) -> None:
    assert sdnotify.notify("READY=1") is True
    assert listener.recv(4096) == b"READY=1"


def test_several_assignments_arrive_as_one_datagram(listener: socket.socket) -> None:
    assert sdnotify.notify("WATCHDOG=1\nSTATUS=2 exported, 1 backoff")
    assert sdnotify.notify("STOPPING=1")
    assert listener.recv(4096) == b"WATCHDOG=1\nSTATUS=2 exported, 1 backoff"
    assert listener.recv(4096) == b"STOPPING=1"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"usbipx-test-{os.getpid()}-{os.urandom(4).hex()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1") is True
        assert s.recv(4096) == b"READY=1"


@pytest.mark.parametrize("value", [None, ""])
def test_outside_systemd_it_is_a_no_op(monkeypatch: pytest.MonkeyPatch, value: str | None,
                                       ) -> None:
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.notify("READY=1") is False


def test_a_socket_that_is_gone_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryDirectory(prefix="sdn") as d:
        monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(d, "nobody"))
        assert sdnotify.notify("READY=1") is False
        monkeypatch.setenv("NOTIFY_SOCKET", "@usbipx-test-nobody-listens-here")
        assert sdnotify.notify("READY=1") is False


@pytest.mark.parametrize(("usec", "pid", "expected"), [
    ("2000000", None, 1.0),          # ping at half the timeout
    ("30000000", "self", 15.0),
    ("30000000", "other", None),     # meant for another process (our parent, say)
    ("100", None, 0.1),              # never busier than every 0.1 s
    (None, None, None),
    ("", None, None),
    ("soon", None, None),
    ("0", None, None),               # 0: no watchdog (sd_watchdog_enabled says so too)
    ("-5000000", None, None),
])
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None,
                           expected: float | None) -> None:
    for var, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, {"self": str(os.getpid()),
                                     "other": str(os.getpid() + 1)}.get(value, value))
    assert sdnotify.watchdog_interval() == expected


def test_a_full_notify_socket_never_blocks(tmp_path, monkeypatch) -> None:
    """Nobody reads: after the queue fills, notify() drops messages instead of blocking."""
    import socket as _socket
    import time

    from usbipx.daemon import sdnotify

    path = str(tmp_path / "notify")
    with _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM) as server:
        server.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        t0 = time.monotonic()
        results = [sdnotify.notify(f"STATUS={i}") for i in range(2000)]
        assert time.monotonic() - t0 < 5
        assert results[0] is True and results[-1] is False
