"""Client operations: what ``list -r``, ``attach``, ``connect`` and ``disconnect`` do.

Each function opens its own connection, speaks one request/reply with the
codec and, on success, hands the socket to the kernel.  On failure nothing
is left behind: the socket is closed, so the peer's kernel side (if it got
the socket) sees the connection end and frees the device.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from usbipx.driver import DeviceDriver, ExportStatus, LocalDevice
from usbipx.errors import DeviceBusy, DeviceNotFound, ProtocolError, RemoteError, UsbipError
from usbipx.lease import Lease
from usbipx.log import logger
from usbipx.names import validate_busid
from usbipx.ownership import Owned, OwnershipStore
from usbipx.protocol import (
    DevlistReply,
    DevlistRequest,
    ExportRequest,
    ImportReply,
    ImportRequest,
    Status,
    UnexportRequest,
)
from usbipx.remote import KernelPath, Remote
from usbipx.sysfs import Sysfs
from usbipx.transport import Link, open_link
from usbipx.usbdevice import ExportableDevice, Speed, UsbDevice

if TYPE_CHECKING:
    from usbipx.wslink import WsLink
from usbipx.vhci import VhciDriver


@contextlib.contextmanager
def _link(remote: Remote) -> Iterator[Link | WsLink]:
    link = open_link(remote)
    try:
        yield link
    finally:
        link.close()


def list_remote(remote: Remote) -> list[ExportableDevice]:
    """The devices a usbipd offers (OP_REQ_DEVLIST)."""
    with _link(remote) as link:
        rep = link.request(DevlistRequest())
    assert isinstance(rep, DevlistReply)
    if rep.status != Status.ST_OK:
        raise RemoteError(rep.status, f"list devices of {remote.label}")
    return list(rep.devices)


@dataclass(frozen=True)
class Attached:
    """Result of an import: the vhci port, the remote device, and what carries it."""

    port: int
    host: str
    busid: str
    path: KernelPath = field(default_factory=lambda: KernelPath("tcp"))


def attach_remote(remote: Remote, busid: str, vhci: VhciDriver) -> Attached:
    """Import ``busid`` from a usbipd into vhci_hcd (OP_REQ_IMPORT).

    vhci_hcd is checked before the peer is asked, so a missing driver does
    not make the peer export its device for nothing.  A relay in the result
    (``tls-relay``) must be run by the caller for as long as the port lives.
    """
    validate_busid(busid)
    vhci.check_loaded()
    with _link(remote) as link:
        req = ImportRequest(busid)
        rep = link.request(req)
        assert isinstance(rep, ImportReply)
        if rep.status != Status.ST_OK or rep.device is None:
            raise RemoteError(rep.status, f"import {busid} from {remote.label}")
        device = rep.device
        if device.busid != busid:
            raise ProtocolError(f"asked for {busid}, peer answered with {device.busid}")
        ports: list[int] = []

        def give(fd: int) -> None:
            ports.append(vhci.attach(fd, device, remote.host, str(remote.port)))

        # vhci_hcd holds its own reference to the socket now; closing ours
        # (leaving _link) does not end the connection.
        path = link.hand_to_kernel(give)
    logger.debug("import of {} from {} on port {} complete ({})", busid, remote, ports[0],
                 path.transport)
    return Attached(ports[0], remote.host, busid, path)


def detach_port(port: int, vhci: VhciDriver) -> bool:
    """Detach a vhci port; the peer's device becomes available again.

    Returns False if the port was free already: as Debian's ``usbip detach``
    ("Port N is already detached!", status 0), that is no error, so that
    clean-up scripts can detach whatever may still be attached.  A port
    vhci_hcd does not have is an error (:class:`DeviceNotFound`).
    """
    if port < 0:
        raise UsbipError(f"bad port number {port}")
    if vhci.port(port).free:
        vhci.remove_record(port)  # a stale record of a port the kernel freed
        return False
    try:
        vhci.detach(port)
    except UsbipError:
        # The link died just now (the kernel answers EINVAL for a free port): freed
        # all the same.
        if vhci.port(port).free:
            vhci.remove_record(port)
            return False
        raise
    return True


@dataclass(frozen=True)
class Exported:
    """Result of an export: what was exported, the lease preparing it took, and what
    carries the data."""

    host: str
    busid: str
    lease: Lease
    path: KernelPath = field(default_factory=lambda: KernelPath("tcp"))

    @property
    def bound_here(self) -> bool:
        """True if the export bound the device to usbip-host itself."""
        return self.lease.bound_here


def _local_export_record(driver: DeviceDriver, busid: str) -> LocalDevice:
    dev = driver.get(busid)
    if dev.status is None:
        raise UsbipError(f"{busid} is not ready for export on {driver.name}")
    if dev.status != ExportStatus.AVAILABLE:
        raise DeviceBusy(f"{busid} is already exported" if dev.status == ExportStatus.USED
                         else f"{busid} is in an error state")
    return dev


EXPORT_RECORDS = "/run/usbipx/exports"
"""Where ``connect`` records the leases that ``disconnect`` releases."""


def export_records(sysfs: Sysfs) -> OwnershipStore:
    """The one-shot exports' ownership records (under the kernel root, for tests)."""
    return OwnershipStore(sysfs.path(EXPORT_RECORDS))


def export_device(remote: Remote, busid: str, driver: DeviceDriver,
                  store: OwnershipStore | None = None) -> Exported:
    """Prepare ``busid`` (stub mode: bind it to usbip-host if it is not) and export it.

    With ``store``, a lease that takes something is recorded there (key: the
    bus id) before anything changes, so that :func:`withdraw` gives back
    exactly that.  Any failure releases what this call took: a device it
    bound goes back to its original driver; one bound before stays bound.
    """
    validate_busid(busid)
    driver.check_loaded()
    lease = driver.claim(busid)
    if store is not None and lease.owns_something:
        store.write(Owned(busid, lease, str(remote)))
    try:
        driver.acquire(lease)
        path = export_prepared(remote, busid, driver)
    except BaseException:
        with contextlib.suppress(UsbipError):
            driver.release(lease)
        if store is not None:
            store.remove(busid)
        raise
    return Exported(remote.host, busid, lease, path)


def export_prepared(remote: Remote, busid: str, driver: DeviceDriver) -> KernelPath:
    """Export a device that is ready (bound, or a gadget on its vUDC) to a usbipa
    (OP_REQ_EXPORT) and hand the connection to the kernel.

    A relay in the result (``tls-relay``) must be run by the caller for as
    long as the export lives.
    """
    dev = _local_export_record(driver, busid)
    with _link(remote) as link:
        rep = link.request(ExportRequest(dev.record))
        if rep.status != Status.ST_OK:
            raise RemoteError(rep.status, f"export of {busid} to {remote.label} refused",
                              ExportRequest.CODE)
        # usbipa has attached the device; from here the connection is URB
        # traffic, read by the kernel.
        path = link.hand_to_kernel(lambda fd: driver.handoff(busid, fd))
    logger.info("exported {} to {} ({})", busid, remote, path.transport)
    return path


def unexport_device(remote: Remote, busid: str, driver: DeviceDriver,
                    force: bool = False) -> None:
    """Withdraw ``busid`` from the usbipa at ``host`` (OP_REQ_UNEXPORT).

    The device stays with its driver: giving it back is releasing its lease.
    With ``force`` the device is also withdrawn locally when the usbipa cannot
    be reached or refuses (the app side then sees the connection drop).  A
    device that is gone (unplugged) is still unexported, so usbipa frees its
    port at once.
    """
    validate_busid(busid)
    driver.check_loaded()
    try:
        dev = driver.get(busid)
        record, status = dev.record, dev.status
    except DeviceNotFound:
        # usbipa finds the attachment by (peer, bus id); the rest is not used.
        record, status = UsbDevice("", busid, 0, 0, Speed.UNKNOWN, 0, 0, 0), None
    else:
        if status is None:
            raise UsbipError(f"{busid} is not exported: not bound to {driver.name}")
    try:
        with _link(remote) as link:
            rep = link.request(UnexportRequest(record))
        if rep.status != Status.ST_OK:
            raise RemoteError(rep.status, f"unexport of {busid} from {remote.label} refused")
    except UsbipError:
        if not force:
            raise
        logger.warning("usbipa did not unexport {}; withdrawing it locally", busid)
        if status == ExportStatus.USED:
            with contextlib.suppress(UsbipError):
                driver.shutdown(busid)
    logger.info("unexported {} from {}", busid, remote)


def withdraw(remote: Remote, busid: str, driver: DeviceDriver, store: OwnershipStore,
             force: bool = False) -> Lease | None:
    """``disconnect``: unexport ``busid``, then release the lease ``connect`` recorded
    (a device it bound goes back to its driver).  Returns that lease, if any."""
    validate_busid(busid)
    rec = store.read(busid)
    unexport_device(remote, busid, driver, force)
    if rec is not None:
        # A background relay ends by itself once usbipa has let go; if not, now.
        store.end_writer(rec, 2.0, signal.SIGTERM)
    if rec is not None and rec.lease is not None:
        driver.release(rec.lease)
    store.remove(busid)
    return rec.lease if rec is not None else None
