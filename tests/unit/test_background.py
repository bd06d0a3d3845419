"""One-shot commands in the background: the result reaches the command, a failure is its
error, and a relay keeps running after the command is gone."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from usbipx.background import in_background
from usbipx.errors import DeviceBusy, UsbipError


def test_a_result_without_a_relay() -> None:
    assert in_background(lambda: ({"transport": "ktls", "n": 3}, None, None)) == {
        "transport": "ktls", "n": 3}


def test_a_failure_is_the_commands_error_with_its_exit_code() -> None:
    def job() -> tuple[dict[str, object], None, None]:
        raise DeviceBusy("1-1 is already exported")

    with pytest.raises(UsbipError, match="1-1 is already exported") as info:
        in_background(job)
    assert info.value.exit_code == DeviceBusy.exit_code


def test_a_crash_is_one_line_too() -> None:
    def job() -> tuple[dict[str, object], None, None]:
        raise KeyError("x")

    with pytest.raises(UsbipError, match="KeyError"):
        in_background(job)


class EchoRelay:
    """A stand-in relay: echoes one socket until it closes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def run(self, stop: threading.Event | None = None) -> str:
        while data := self.sock.recv(4096):
            self.sock.sendall(data)
        return "closed"


def test_the_relay_outlives_the_command_in_its_own_session(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    marker = tmp_path / "pid"

    def job() -> tuple[dict[str, object], EchoRelay, object]:
        ours.close()
        return {"ok": True}, EchoRelay(theirs), lambda: marker.write_text(str(os.getpid()))

    assert in_background(job) == {"ok": True}  # type: ignore[arg-type]
    theirs.close()
    pid = int(marker.read_text())
    assert pid != os.getpid() and os.getsid(pid) != os.getsid(0)  # not our session
    ours.settimeout(5)
    ours.sendall(b"ping")
    assert ours.recv(4) == b"ping"  # the relay runs after in_background returned
    ours.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the relay did not end when its socket closed")
