"""usbipa: the application-side daemon receiving exported devices.

A device side behind NAT or a firewall connects out to us with
OP_REQ_EXPORT; we attach its device to vhci_hcd over that very connection.
OP_REQ_UNEXPORT detaches it again, honoured only from the address that
exported it.  Attachments are keyed by (peer, bus id), where the peer is its
certificate identity over TLS and its address over plain TCP.

Two boards behind one NAT address share that address, and every Raspberry
Pi calls its first port ``1-1``: a second export of an (address, bus id)
that is attached and alive is therefore refused (ST_DEV_BUSY), never allowed
to kick the first.  Only a link vhci_hcd knows is dead -- its port freed, or
in VDEV_ST_ERROR -- is replaced.  After a link cut the device side's
re-export is refused until the keepalive has killed the old port (about
13 s), and then succeeds on retry.

Order matters on export.  vhci_hcd starts enumerating the moment it has the
socket, and its first URB must not reach the device side ahead of
OP_REP_EXPORT (under load it did: "unsupported USB/IP version 0x0000").  So
the reply goes first, over plain TCP as over kernel TLS, and everything that
can be refused (policy, limits, a free port) is checked before replying.  A
kernel refusal after the reply closes the connection, which tells the device
side.  Only a TLS relay attaches before replying: the relay holds the first
URB back until the reply is out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from usbipx.daemon.policy import Policy
from usbipx.daemon.serialcheck import SERIAL_WAIT, imported_serial
from usbipx.daemon.serving import Outcome, Peer
from usbipx.errors import ModuleNotLoaded, NoFreePort, UsbipError, ValidationError
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
from usbipx.usbdevice import Speed, UsbDevice
from usbipx.vhci import ImportedDevice, PortStatus, VhciDriver

if TYPE_CHECKING:
    from usbipx.metrics import Metrics

Background = Callable[[Callable[[], None]], None]
"""Runs a job away from the event loop (a thread; tests run it at once)."""


def _describe(dev: UsbDevice) -> str:
    return f"{dev.busid} ({dev.id_vendor:04x}:{dev.id_product:04x})"


def _in_thread(job: Callable[[], None]) -> None:
    threading.Thread(target=job, name="usbipa serial check", daemon=True).start()


class UsbipaHandler:
    """Answers export requests by attaching devices to vhci_hcd under a policy.

    ``held`` are the attachments this daemon made, (port, bus id) -> owner: what
    ``usbipx_exports_active`` shows, and how a link loss -- a port the kernel
    freed or gave up on, unasked -- is noticed.
    """

    def __init__(self, vhci: VhciDriver, policy: Policy | None = None,
                 metrics: Metrics | None = None, background: Background = _in_thread,
                 serial_wait: float = SERIAL_WAIT) -> None:
        self.vhci = vhci
        self.policy = policy or Policy()
        self.metrics = metrics
        self.background = background
        self.serial_wait = serial_wait
        self.held = Holdings()
        self.in_flight: set[tuple[str, str]] = set()
        """(owner, bus id) of exports decided and not yet carried out.  Over TLS and
        wss the reply is sent between the decision and the attach, and another
        connection's request can be decided meanwhile: without this, two
        connections of one board could both attach a bus id, or both pass a limit."""
        if metrics is not None:
            metrics.live("usbipx_exports_active", "Devices attached for each peer (its "
                         "certificate identity, or its address over plain TCP).", "peer",
                         self.active)

    def _refuse(self, peer: Peer, dev: UsbDevice, reason: str,
                status: Status = Status.ST_NA, kind: str = "policy") -> Outcome:
        logger.warning("refused export of {} from {}: {}", _describe(dev), peer.name, reason)
        if self.metrics is not None:
            self.metrics.refused(kind)
        return Outcome(ExportReply(status))

    # -- what this daemon holds ------------------------------------------------------

    def _reconcile(self, imported: list[ImportedDevice]) -> None:
        """Forget attachments vhci_hcd no longer has, or has given up on: link losses."""
        live = {i.port.port: i for i in imported}
        for (port, busid), owner in self.held.items():
            imp = live.get(port)
            gone = (imp is None or imp.record is None or imp.port.status == PortStatus.ERROR
                    or (imp.record.owner, imp.record.busid) != (owner, busid))
            if gone and self.held.forget((port, busid)) is not None and self.metrics:
                self.metrics.link_losses.inc()

    def active(self) -> dict[str, float]:
        """Devices attached for each peer, as vhci_hcd has them now."""
        try:
            self._reconcile(self.vhci.imported())
        except UsbipError as exc:
            logger.debug("cannot read vhci_hcd for the metrics: {}", exc)
        return self.held.by_owner()

    def _detach(self, port: int, busid: str) -> None:
        """Detach a port of ours: forgotten first, so that a scrape meanwhile does not
        take it for a link loss."""
        owner = self.held.forget((port, busid))
        try:
            self.vhci.detach(port)
        except UsbipError:
            if owner is not None and not self.vhci.port(port).free:
                self.held.add((port, busid), owner)
            raise

    # -- export ----------------------------------------------------------------------

    def export(self, req: ExportRequest, peer: Peer) -> Outcome:
        """Decide on an export; the attach itself is the outcome's handoff."""
        dev = req.device
        reason = self.policy.refuse_peer(peer.host)
        if reason:
            return self._refuse(peer, dev, reason, kind="network")
        reason = self.policy.refuse_identity(peer.identity) if peer.identity else None
        if reason:
            return self._refuse(peer, dev, reason, kind="identity")
        # A rule naming a serial number is checked on the device, once attached: refused
        # now only if no serial number could change the verdict.
        named = self.policy.serials_named(dev, peer.identity)
        reason = self.policy.refuse_device(dev, peer.identity)
        if reason and all(self.policy.refuse_device(dev, peer.identity, s) for s in named):
            return self._refuse(peer, dev, reason)
        if dev.speed in (Speed.UNKNOWN, Speed.WIRELESS):
            return self._refuse(peer, dev, f"cannot attach a device of {dev.speed.label}",
                                kind="unsupported")
        key = (peer.owner, dev.busid)
        if key in self.in_flight:
            return self._refuse(peer, dev, "an export of it from this peer is in progress",
                                Status.ST_DEV_BUSY, kind="busy")
        try:
            # One reading of vhci's state serves the whole decision.
            ports = self.vhci.ports()
            imported = self.vhci.prune_records(ports)
            self._reconcile(imported)
            old = self.vhci.find(peer.owner, dev.busid, imported)
            if old is not None and old.port.status != PortStatus.ERROR:
                # Alive as far as vhci_hcd knows: maybe another board behind
                # the same address, maybe a dead link the keepalive has not
                # caught yet.  Either way the first one keeps its device.
                return self._refuse(
                    peer, dev, f"already attached on vhci port {old.port.port} and alive "
                    "(another device side behind the same address?)", Status.ST_DEV_BUSY,
                    kind="busy")
            held = sum(1 for i in imported if i is not old
                       and i.record is not None and i.record.owner == peer.owner)
            held += sum(1 for owner, _ in self.in_flight if owner == peer.owner)
            reason = self.policy.refuse_count(held, peer.identity)
            if reason:
                return self._refuse(peer, dev, reason, kind="limit")
            if old is None:
                # Refused now, while the reply can still say so (kernel TLS
                # replies before it attaches).  A dead attachment's port is
                # freed for this one.
                self.vhci.free_port(dev.speed, ports)
        except NoFreePort as exc:
            return self._refuse(peer, dev, str(exc), Status.ST_DEV_BUSY, kind="no_port")
        except ModuleNotLoaded as exc:
            return self._refuse(peer, dev, str(exc), Status.ST_ERROR, kind="error")
        except UsbipError as exc:
            return self._refuse(peer, dev, f"cannot read vhci_hcd: {exc}", Status.ST_ERROR,
                                kind="error")
        attached: list[int] = []

        def handoff(fd: int, transport: str) -> Reply | None:
            try:
                return attach(fd, transport)
            finally:
                # Attached (vhci's state now shows it) or refused: no longer in flight.
                self.in_flight.discard(key)

        def attach(fd: int, transport: str) -> Reply | None:
            try:
                if old is not None:
                    logger.info("replacing dead attachment of {} from {} on port {}",
                                dev.busid, peer.name, old.port.port)
                    self._detach(old.port.port, dev.busid)
                # A detach above made the reading stale: its port is free again.
                port = self.vhci.attach(fd, dev, peer.host, str(peer.port),
                                        ports if old is None and transport == "tcp" else None,
                                        transport=transport, identity=peer.identity)
            except NoFreePort as exc:
                return self._refuse(peer, dev, str(exc), Status.ST_DEV_BUSY,
                                    kind="no_port").reply
            except ValidationError as exc:
                return self._refuse(peer, dev, str(exc), kind="error").reply
            except ModuleNotLoaded as exc:
                return self._refuse(peer, dev, str(exc), Status.ST_ERROR, kind="error").reply
            except UsbipError as exc:
                return self._refuse(peer, dev, f"attach failed: {exc}", Status.ST_DEV_ERR,
                                    kind="error").reply
            attached.append(port)
            self.held.add((port, dev.busid), peer.owner)
            if self.metrics is not None:
                self.metrics.attaches.inc()
            logger.info("attached {} exported by {}:{} on vhci port {} ({})", _describe(dev),
                        peer.name, peer.port, port, transport)
            if named:
                self.background(lambda: self.check_serial(port, dev, peer))
            return None

        def undo() -> None:
            for port in attached:
                logger.warning("reply to {} failed; detaching port {}", peer.name, port)
                try:
                    self._detach(port, dev.busid)
                except UsbipError as exc:
                    logger.error("could not detach port {}: {}", port, exc)

        self.in_flight.add(key)
        return Outcome(ExportReply(Status.ST_OK), handoff, undo, reply_first=True,
                       release=lambda: self.in_flight.discard(key))

    def check_serial(self, port: int, dev: UsbDevice, peer: Peer) -> None:
        """The policy's verdict on the serial number of the device attached on ``port``;
        detach it if that is a refusal, or if it does not enumerate in time."""
        try:
            serial = imported_serial(self.vhci, port, self.serial_wait)
        except UsbipError as exc:
            why = f"its serial number cannot be read: {exc}"
        else:
            refused = self.policy.refuse_device(dev, peer.identity, serial)
            if refused is None:
                logger.info("{} from {} on vhci port {}: serial number {!r} admitted",
                            _describe(dev), peer.name, port, serial)
                return
            why = f"serial number {serial!r}: {refused}"
        logger.warning("refused export of {} from {}: serial: {}; detaching vhci port {}",
                       _describe(dev), peer.name, why, port)
        if self.metrics is not None:
            self.metrics.refused("serial")
        try:
            mine = self.vhci.find(peer.owner, dev.busid)
            if mine is not None and mine.port.port == port:
                self._detach(port, dev.busid)
        except UsbipError as exc:
            logger.error("could not detach vhci port {}: {}", port, exc)

    def unexport(self, req: UnexportRequest, peer: Peer) -> Outcome:
        busid = req.device.busid
        reason = self.policy.refuse_peer(peer.host)
        if reason:
            # Before looking: the answer would tell which bus ids are attached.
            logger.warning("refused unexport of {} from {}: {}", busid, peer.name, reason)
            if self.metrics is not None:
                self.metrics.refused("network")
            return Outcome(UnexportReply(Status.ST_NA))
        try:
            imported = self.vhci.prune_records()
            self._reconcile(imported)
            mine = self.vhci.find(peer.owner, busid, imported)
            if mine is None:
                others = [i for i in imported
                          if i.record is not None and i.record.busid == busid]
                if others:
                    logger.warning("refused unexport of {} from {}: exported by another peer",
                                   busid, peer.name)
                    if self.metrics is not None:
                        self.metrics.refused("policy")
                    return Outcome(UnexportReply(Status.ST_NA))
                logger.info("unexport of {} from {}: not attached", busid, peer.name)
                return Outcome(UnexportReply(Status.ST_NODEV))
            self._detach(mine.port.port, busid)
        except UsbipError as exc:
            logger.error("unexport of {} from {} failed: {}", busid, peer.name, exc)
            return Outcome(UnexportReply(Status.ST_ERROR))
        logger.info("detached {} unexported by {} from port {}", busid, peer.name,
                    mine.port.port)
        return Outcome(UnexportReply(Status.ST_OK))

    def __call__(self, req: Request, peer: Peer) -> Outcome:
        if isinstance(req, ExportRequest):
            return self.export(req, peer)
        if isinstance(req, UnexportRequest):
            return self.unexport(req, peer)
        # Listing and importing are usbipd's business.
        logger.info("{} from {} refused: this is usbipa", type(req).__name__, peer.name)
        if self.metrics is not None:
            self.metrics.refused("unsupported")
        if isinstance(req, DevlistRequest):
            return Outcome(DevlistReply((), Status.ST_NA))
        assert isinstance(req, ImportRequest)
        return Outcome(ImportReply(Status.ST_NA))
