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

from usbipx.driver import DeviceDriver, ExportStatus, LocalDevice
from usbipx.errors import DeviceBusy, DeviceNotFound, ProtocolError, RemoteError, UsbipError
from usbipx.names import validate_busid
from usbipx.net import DEFAULT_KEEPALIVE, USBIP_PORT, Keepalive, connect, request
from usbipx.protocol import (
    DevlistReply,
    DevlistRequest,
    ExportableDevice,
    ExportRequest,
    ImportReply,
    ImportRequest,
    Speed,
    Status,
    UnexportRequest,
    UsbDevice,
)
from usbipx.stubmode.host import HostDriver
from usbipx.vhci import VhciDriver


@contextlib.contextmanager
def _connection(host: str, port: int, keepalive: Keepalive,
                timeout: float = 10.0) -> Iterator[socket.socket]:
    sock = connect(host, port, timeout=timeout, keepalive=keepalive)
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


@dataclass(frozen=True)
class Exported:
    """Result of an export: what was exported, and the driver the device had."""

    host: str
    busid: str
    bound_here: bool
    """True if ``connect`` bound the device to usbip-host itself."""


def _local_export_record(driver: DeviceDriver, busid: str) -> LocalDevice:
    dev = driver.get(busid)
    if dev.status is None:
        raise UsbipError(f"{busid} is not ready for export on {driver.name}")
    if dev.status != ExportStatus.AVAILABLE:
        raise DeviceBusy(f"{busid} is already exported" if dev.status == ExportStatus.USED
                         else f"{busid} is in an error state")
    return dev


def export_device(host: str, busid: str, driver: DeviceDriver, port: int = USBIP_PORT,
                  keepalive: Keepalive = DEFAULT_KEEPALIVE, timeout: float = 10.0) -> Exported:
    """Export ``busid`` to the usbipa at ``host`` (OP_REQ_EXPORT) and hand it to the kernel.

    Stub mode binds the device to usbip-host first if needed; vUDC mode needs
    a gadget bound to the vUDC.  Any failure puts a device this call bound
    back on its original driver.
    """
    validate_busid(busid)
    driver.check_loaded()
    bound_here = False
    if isinstance(driver, HostDriver) and driver.get(busid).driver != driver.name:
        driver.bind(busid)
        bound_here = True
    try:
        dev = _local_export_record(driver, busid)
        with _connection(host, port, keepalive, timeout) as sock:
            rep = request(sock, ExportRequest(dev.record), timeout)
            if rep.status != Status.ST_OK:
                raise RemoteError(rep.status, f"export of {busid} to {host} refused")
            # usbipa has attached the device; from here the connection is URB
            # traffic, read by the kernel.
            driver.handoff(busid, sock.fileno())
    except BaseException:
        if bound_here:
            assert isinstance(driver, HostDriver)
            with contextlib.suppress(UsbipError):
                driver.unbind(busid)
        raise
    logger.info("exported {} to {}:{}", busid, host, port)
    return Exported(host, busid, bound_here)


def unexport_device(host: str, busid: str, driver: DeviceDriver, port: int = USBIP_PORT,
                    force: bool = False, keepalive: Keepalive = DEFAULT_KEEPALIVE,
                    timeout: float = 10.0, release: bool = True) -> None:
    """Withdraw ``busid`` from the usbipa at ``host`` (OP_REQ_UNEXPORT).

    With ``release`` (the default) a stub device then goes back to its
    original driver.  With ``force`` the device is also withdrawn locally when
    the usbipa cannot be reached or refuses (the app side then sees the
    connection drop).  Without ``release`` the device may already be gone
    (unplugged): usbipa is still told, so it frees its port at once.
    """
    validate_busid(busid)
    driver.check_loaded()
    try:
        dev = driver.get(busid)
        record, status = dev.record, dev.status
    except DeviceNotFound:
        if release:
            raise
        # usbipa finds the attachment by (peer, bus id); the rest is not used.
        record, status = UsbDevice("", busid, 0, 0, Speed.UNKNOWN, 0, 0, 0), None
    if release and status is None:
        raise UsbipError(f"{busid} is not exported: not bound to {driver.name}")
    try:
        with _connection(host, port, keepalive, timeout) as sock:
            rep = request(sock, UnexportRequest(record), timeout)
        if rep.status != Status.ST_OK:
            raise RemoteError(rep.status, f"unexport of {busid} from {host} refused")
    except UsbipError:
        if not force:
            raise
        logger.warning("usbipa did not unexport {}; withdrawing it locally", busid)
        if status == ExportStatus.USED:
            with contextlib.suppress(UsbipError):
                driver.shutdown(busid)
    if release and isinstance(driver, HostDriver):
        driver.unbind(busid)
    logger.info("unexported {} from {}", busid, host)
