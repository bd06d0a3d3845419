"""usbipd: the device-side daemon serving DEVLIST and IMPORT.

The handler is a plain function of (request, peer, socket) to an
:class:`~usbipx.daemon.server.Outcome`; sockets appear only in the server.
As Linux's usbipd, an import hands the socket to the kernel first and
replies after, so a failed handoff is reported to the client (under kernel
TLS the reply must go first: see :mod:`usbipx.daemon.serving`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from usbipx.daemon.serving import Outcome, Peer
from usbipx.driver import DeviceDriver, ExportStatus
from usbipx.errors import DeviceNotFound, UsbipError, ValidationError
from usbipx.log import logger
from usbipx.metrics import Holdings
from usbipx.protocol import (
    DevlistReply,
    DevlistRequest,
    ExportReply,
    ExportRequest,
    ImportReply,
    ImportRequest,
    Reply,
    Request,
    Status,
    UnexportReply,
    UnexportRequest,
)

if TYPE_CHECKING:
    from usbipx.metrics import Metrics

_STATUS_OF = {ExportStatus.USED: Status.ST_DEV_BUSY, ExportStatus.ERROR: Status.ST_DEV_ERR}


class UsbipdHandler:
    """Answers usbipd requests from the devices of one :class:`DeviceDriver`.

    ``held`` are the devices handed to the kernel for a peer, bus id -> owner, for
    ``usbipx_imports_active``: one the kernel no longer exports is forgotten.
    """

    def __init__(self, driver: DeviceDriver, metrics: Metrics | None = None) -> None:
        self.driver = driver
        self.metrics = metrics
        self.held = Holdings()
        if metrics is not None:
            metrics.live("usbipx_imports_active", "Devices each peer has imported (its "
                         "certificate identity, or its address over plain TCP).", "peer",
                         self.active)

    def _refused(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.refused(reason)

    def active(self) -> dict[str, float]:
        """Devices imported by each peer, as the kernel has them now."""
        for busid, _ in self.held.items():
            try:
                used = self.driver.status(busid) == ExportStatus.USED
            except UsbipError:
                used = False
            if not used:
                self.held.forget(busid)
        return self.held.by_owner()

    def devlist(self) -> DevlistReply:
        """Devices ready for export and not in use; in-use ones are hidden."""
        devs = [d.exportable for d in self.driver.ready_devices()
                if d.status == ExportStatus.AVAILABLE]
        return DevlistReply(tuple(devs))

    def import_device(self, req: ImportRequest, peer: Peer) -> Outcome:
        busid = req.busid
        try:
            dev = self.driver.get(busid)
        except (DeviceNotFound, ValidationError):
            logger.info("import of {} by {}: no such exportable device", busid, peer.name)
            self._refused("no_device")
            return Outcome(ImportReply(Status.ST_NODEV))
        if dev.status is None:
            logger.info("import of {} by {}: not bound to {}", busid, peer.name, self.driver.name)
            self._refused("no_device")
            return Outcome(ImportReply(Status.ST_NODEV))
        if dev.status != ExportStatus.AVAILABLE:
            logger.info("import of {} by {}: device is {}", busid, peer.name,
                        dev.status.name.lower())
            self._refused("busy" if dev.status == ExportStatus.USED else "error")
            return Outcome(ImportReply(_STATUS_OF[dev.status]))

        def handoff(fd: int, transport: str) -> Reply | None:
            try:
                self.driver.handoff(busid, fd)
            except UsbipError as exc:
                logger.warning("import of {} by {}: handoff failed: {}", busid, peer.name, exc)
                self._refused("error")
                return ImportReply(Status.ST_NA)
            self.held.add(busid, peer.owner)
            if self.metrics is not None:
                self.metrics.attaches.inc()
            logger.info("exported {} to {}:{} ({})", busid, peer.name, peer.port, transport)
            return None

        return Outcome(ImportReply(Status.ST_OK, dev.record), handoff)

    def __call__(self, req: Request, peer: Peer) -> Outcome:
        if isinstance(req, DevlistRequest):
            return Outcome(self.devlist())
        if isinstance(req, ImportRequest):
            return self.import_device(req, peer)
        # Exports go to usbipa, the application-side daemon.
        logger.info("{} from {} refused: this is usbipd", type(req).__name__, peer.name)
        self._refused("unsupported")
        if isinstance(req, ExportRequest):
            return Outcome(ExportReply(Status.ST_NA))
        assert isinstance(req, UnexportRequest)
        return Outcome(UnexportReply(Status.ST_NA))
