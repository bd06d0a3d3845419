"""Client operations: what ``list -r``, ``attach``, ``connect`` and ``disconnect`` do.

Each function opens its own connection, speaks one request/reply with the
codec and, on success, hands the socket to the kernel.  On failure nothing
is left behind: the socket is closed, so the peer's kernel side (if it got
the socket) sees the connection end and frees the device.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from loguru import logger

from usbipx.errors import ProtocolError, RemoteError, UsbipError
from usbipx.net import DEFAULT_KEEPALIVE, USBIP_PORT, Keepalive, connect, request
from usbipx.protocol import (
    DevlistReply,
    DevlistRequest,
    ExportableDevice,
    ImportReply,
    ImportRequest,
    Status,
    validate_busid,
)
from usbipx.vhci import VhciDriver


@contextlib.contextmanager
def _connection(host: str, port: int, keepalive: Keepalive) -> Iterator[socket.socket]:
    sock = connect(host, port, keepalive=keepalive)
    try:
        yield sock
    finally:
        sock.close()


def list_remote(host: str, port: int = USBIP_PORT) -> list[ExportableDevice]:
    """The devices a usbipd at ``host:port`` offers (OP_REQ_DEVLIST)."""
    with _connection(host, port, DEFAULT_KEEPALIVE) as sock:
        rep = request(sock, DevlistRequest())
    assert isinstance(rep, DevlistReply)
    if rep.status != Status.ST_OK:
        raise RemoteError(rep.status, f"list devices of {host}")
    return list(rep.devices)


@dataclass(frozen=True)
class Attached:
    """Result of an import: the vhci port and the remote device record."""

    port: int
    host: str
    busid: str


def attach_remote(host: str, busid: str, vhci: VhciDriver, port: int = USBIP_PORT,
                  keepalive: Keepalive = DEFAULT_KEEPALIVE) -> Attached:
    """Import ``busid`` from the usbipd at ``host`` into vhci_hcd (OP_REQ_IMPORT).

    vhci_hcd is checked before the peer is asked, so a missing driver does
    not make the peer export its device for nothing.
    """
    validate_busid(busid)
    vhci.check_loaded()
    with _connection(host, port, keepalive) as sock:
        req = ImportRequest(busid)
        rep = request(sock, req)
        assert isinstance(rep, ImportReply)
        if rep.status != Status.ST_OK or rep.device is None:
            raise RemoteError(rep.status, f"import {busid} from {host}")
        if rep.device.busid != busid:
            raise ProtocolError(f"asked for {busid}, peer answered with {rep.device.busid}")
        vport = vhci.attach(sock.fileno(), rep.device, host, str(port))
        # vhci_hcd holds its own reference to the socket now; closing ours
        # (in _connection) does not end the connection.
    logger.debug("import of {} from {} on port {} complete", busid, host, vport)
    return Attached(vport, host, busid)


def detach_port(port: int, vhci: VhciDriver) -> None:
    """Detach a vhci port; the peer's device becomes available again."""
    if port < 0:
        raise UsbipError(f"bad port number {port}")
    vhci.detach(port)
