"""Driving a :class:`~usbipx.tlsengine.TlsEngine` over a socket.

The engine moves no bytes itself; these drivers do, one TLS record at a
time (``sock.recv(engine.needed())``), so that nothing past the last record
user space needs is ever read: after a kernel TLS handoff the rest of the
stream is the kernel's.  Blocking drivers take a deadline (clients); the
asyncio ones want a non-blocking socket and :func:`asyncio.wait_for` for a
deadline (servers).  Failures are :class:`~usbipx.tlsengine.TlsError`; when
the engine has an alert to send, it goes out on a best-effort basis first.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator

from usbipx.errors import describe_errno
from usbipx.tlsengine import TlsEngine, TlsError

# -- blocking drivers (clients) -----------------------------------------------------


class _Deadline:
    def __init__(self, deadline: float, what: str) -> None:
        self.deadline = deadline
        self.budget = max(0.0, deadline - time.monotonic())
        self.what = what

    def expired(self) -> TlsError:
        return TlsError(f"{self.what} within {round(self.budget, 1):g} s")

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.expired()
        return left


def _network_error(exc: OSError, during: str) -> TlsError:
    what = describe_errno(exc.errno) if exc.errno else str(exc)
    return TlsError(f"network error {during}: {what}")


def _send_alert(sock: socket.socket, data: bytes) -> None:
    """Best effort, never blocking: the peer may like to know why."""
    if not data:
        return
    with contextlib.suppress(OSError):
        sock.send(data, socket.MSG_DONTWAIT)


def _recv_record(sock: socket.socket, engine: TlsEngine, clock: _Deadline, eof: str) -> None:
    target = engine.records_received + 1
    while engine.records_received < target:
        sock.settimeout(clock.remaining())
        try:
            chunk = sock.recv(engine.needed())
        except TimeoutError:
            raise clock.expired() from None
        except OSError as exc:
            raise _network_error(exc, "during TLS") from None
        if not chunk:
            raise TlsError(eof)
        engine.receive(chunk)


def _send(sock: socket.socket, data: bytes, clock: _Deadline) -> None:
    if not data:
        return
    sock.settimeout(clock.remaining())
    try:
        sock.sendall(data)
    except TimeoutError:
        raise clock.expired() from None
    except OSError as exc:
        raise _network_error(exc, "during TLS") from None


@contextlib.contextmanager
def _keeping_timeout(sock: socket.socket) -> Iterator[None]:
    before = sock.gettimeout()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(before)


def handshake_blocking(sock: socket.socket, engine: TlsEngine, deadline: float) -> None:
    """Run the handshake over ``sock`` by ``deadline`` (a :func:`time.monotonic`
    value), reading one record at a time.  TlsError on failure or timeout.

    In TLS 1.3 a client's handshake completes before the server has checked
    its certificate: a refusal shows as a TlsError at the first receive.
    """
    clock = _Deadline(deadline, "no TLS handshake")
    with _keeping_timeout(sock):
        while True:
            try:
                done = engine.handshake()
            except TlsError:
                _send_alert(sock, engine.outgoing())
                raise
            _send(sock, engine.outgoing(), clock)
            if done:
                return
            _recv_record(sock, engine, clock, "peer closed the connection during the TLS handshake")


def send_blocking(sock: socket.socket, engine: TlsEngine, data: bytes, deadline: float) -> None:
    """Encrypt ``data`` and send it all by ``deadline``."""
    clock = _Deadline(deadline, "could not send to the TLS peer")
    with _keeping_timeout(sock):
        engine.write(data)
        _send(sock, engine.outgoing(), clock)


def recv_blocking(sock: socket.socket, engine: TlsEngine, deadline: float) -> bytes:
    """Read exactly one record by ``deadline``; its plaintext (b"" for a record
    that carried none, e.g. a session ticket)."""
    clock = _Deadline(deadline, "no TLS record")
    with _keeping_timeout(sock):
        _recv_record(sock, engine, clock, "peer closed the connection")
        try:
            data = engine.read()
        except TlsError:
            _send_alert(sock, engine.outgoing())
            raise
        _send(sock, engine.outgoing(), clock)  # e.g. an answer to a KeyUpdate
        return data


# -- asyncio drivers (servers; ``sock`` must be non-blocking) ------------------------


async def _recv_record_async(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                             engine: TlsEngine, eof: str) -> None:
    target = engine.records_received + 1
    while engine.records_received < target:
        try:
            chunk = await loop.sock_recv(sock, engine.needed())
        except OSError as exc:
            raise _network_error(exc, "during TLS") from None
        if not chunk:
            raise TlsError(eof)
        engine.receive(chunk)


async def _send_async(loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes) -> None:
    if not data:
        return
    try:
        await loop.sock_sendall(sock, data)
    except OSError as exc:
        raise _network_error(exc, "during TLS") from None


async def handshake_async(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                          engine: TlsEngine) -> None:
    """Run the handshake over the non-blocking ``sock``, one record at a time;
    wrap in :func:`asyncio.wait_for` for a deadline."""
    while True:
        try:
            done = engine.handshake()
        except TlsError:
            _send_alert(sock, engine.outgoing())
            raise
        await _send_async(loop, sock, engine.outgoing())
        if done:
            return
        await _recv_record_async(loop, sock, engine,
                                 "peer closed the connection during the TLS handshake")


async def recv_async(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                     engine: TlsEngine) -> bytes:
    """Read exactly one record; its plaintext (may be b"")."""
    await _recv_record_async(loop, sock, engine, "peer closed the connection")
    try:
        data = engine.read()
    except TlsError:
        _send_alert(sock, engine.outgoing())
        raise
    await _send_async(loop, sock, engine.outgoing())
    return data


async def send_async(loop: asyncio.AbstractEventLoop, sock: socket.socket, engine: TlsEngine,
                     data: bytes) -> None:
    """Encrypt ``data`` and send it all."""
    engine.write(data)
    await _send_async(loop, sock, engine.outgoing())
