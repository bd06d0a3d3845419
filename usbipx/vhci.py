"""Application side: the ``vhci_hcd`` virtual host controllers.

vhci_hcd has ``nports`` ports over up to 8 controllers, each with a
high-speed and a super-speed root hub.  All its attributes live on
``vhci_hcd.0``: ``status`` (controller 0) and ``status.1`` ... for the
others, ``attach`` (``"<port> <sockfd> <devid> <speed>"``) and ``detach``
(``"<port>"``).  A super-speed device must go to a port of an ``ss`` hub,
everything else to an ``hs`` one.

Like the C tools, each attachment is recorded in
``/var/run/vhci_hcd/port<N>`` as ``"<host> <port> <busid>\\n"`` so that both
``usbipx port`` and Debian's ``usbip port`` can say where a port leads.
"""

from __future__ import annotations

import errno
import re
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from usbipx.errors import (
    DeviceNotFound,
    KernelError,
    ModuleNotLoaded,
    NoFreePort,
    UsbipError,
    ValidationError,
    with_context,
)
from usbipx.identity import is_identity
from usbipx.log import logger
from usbipx.names import validate_busid
from usbipx.sysfs import Sysfs
from usbipx.usbdevice import Speed, UsbDevice

VHCI0 = "/sys/devices/platform/vhci_hcd.0"
STATE_DIR = "/var/run/vhci_hcd"
_STATUS_LINE = re.compile(
    r"^(?:hs|ss)[ \t]+\d+[ \t]+\d+[ \t]+\d+[ \t]+[0-9a-fA-F]+[ \t]+\d+[ \t]+\S+[ \t]*$", re.M)
"""A port's line of ``status``: hub, port, sta, spd, dev, sockfd, local bus id."""
_PARSED: dict[str, VhciPort] = {}
"""Status lines already parsed.  A reading is 240 lines, nearly all of them the
same from one reading to the next, and usbipa reads them on every request."""
_PARSED_MAX = 4096
_RECORD_FIELD = re.compile(r"[A-Za-z0-9._:%\[\]-]{1,255}")


class PortStatus(IntEnum):
    """``vdev->ud.status`` of a vhci port (``VDEV_ST_*``)."""

    NULL = 4
    NOTASSIGNED = 5
    USED = 6
    ERROR = 7


class VhciPort(NamedTuple):
    """One line of vhci_hcd's ``status`` (a tuple: cheap to make, one per port)."""

    port: int
    hub: str
    status: PortStatus
    speed: Speed
    devid: int
    sockfd: int
    local_busid: str

    @property
    def free(self) -> bool:
        return self.status is PortStatus.NULL  # identity: IntEnum's == is slow


_PORT_STATUS = {int(s): s for s in PortStatus}
_SPEEDS = {int(s): s for s in Speed}


def _parse_port(line: str, where: str) -> VhciPort:
    """One line matching ``_STATUS_LINE`` of the file ``where``."""
    hub, port, sta, spd, dev, sockfd, busid = line.split()
    status = _PORT_STATUS.get(int(sta))
    speed = _SPEEDS.get(int(spd))
    if status is None or speed is None:
        raise UsbipError(f"{where}: port {int(port)} has unknown state {sta} or speed {spd}")
    return VhciPort(int(port), hub, status, speed, int(dev, 16), int(sockfd), busid)


@dataclass(frozen=True)
class PortRecord:
    """Where an attached port leads: ``/var/run/vhci_hcd/port<N>``.

    The first line is the C tools' ``"<host> <port> <busid>"`` (Debian's
    ``usbip port`` reads three words and no further).  For a TLS peer usbipx
    adds a second line with the transport carrying the data (``ktls``,
    ``tls-relay``) and the peer's certificate identity: who the attachment
    belongs to.  Plain TCP records are exactly the C tools' one line.
    """

    host: str
    service: str
    busid: str
    transport: str = "tcp"
    identity: str | None = None

    @property
    def owner(self) -> str:
        """Who the attachment belongs to: the certificate identity, else the address."""
        return self.identity if self.identity is not None else self.host


@dataclass(frozen=True)
class ImportedDevice:
    """A used vhci port with its record (None if no tool recorded it)."""

    port: VhciPort
    record: PortRecord | None


def hub_for(speed: Speed) -> str:
    """The root hub type a device of ``speed`` must be attached to."""
    return "ss" if speed >= Speed.SUPER else "hs"


class VhciDriver:
    """vhci_hcd over a :class:`Sysfs` root."""

    def __init__(self, sysfs: Sysfs | None = None) -> None:
        self.sysfs = sysfs or Sysfs()
        self._used_at: dict[int, float] = {}
        """Port -> when (wall clock) it was last known in use (see :meth:`free_port`)."""

    def check_loaded(self) -> None:
        if not self.sysfs.is_dir(VHCI0):
            raise ModuleNotLoaded("vhci-hcd")

    def nports(self) -> int:
        self.check_loaded()
        return self.sysfs.read_int(f"{VHCI0}/nports")

    def _status_files(self) -> list[str]:
        """``status``, ``status.1``, ... in controller order (one listing, no stat each)."""
        extra = sorted(int(name[7:]) for name in self.sysfs.listdir(VHCI0)
                       if name.startswith("status.") and name[7:].isdigit())
        return [f"{VHCI0}/status", *(f"{VHCI0}/status.{n}" for n in extra)]

    def ports(self) -> list[VhciPort]:
        """Every port of every controller, in port order."""
        self.check_loaded()
        out = []
        for f in self._status_files():
            for line in _STATUS_LINE.findall(self.sysfs.read(f)):
                port = _PARSED.get(line)
                if port is None:
                    port = _parse_port(line, f)
                    if len(_PARSED) >= _PARSED_MAX:
                        _PARSED.clear()
                    _PARSED[line] = port
                out.append(port)
        out.sort()  # by port number: no two lines share one
        return out

    def port(self, port: int) -> VhciPort:
        for p in self.ports():
            if p.port == port:
                return p
        raise DeviceNotFound(f"vhci_hcd has no port {port}")

    def free_port(self, speed: Speed, ports: list[VhciPort] | None = None,
                  exclude: set[int] | None = None) -> int:
        """A free port of the hub type ``speed`` needs (in ``ports`` if given), other
        than those in ``exclude``: the lowest one not known to have been used, else
        the one used longest ago.

        Why not simply the lowest: a link that dies while the hub enumerates its
        device leaves a control URB on that port.  A new connection attached there
        within seconds gets that URB's unlink, its peer knows nothing of it, and the
        hub waits for ever (seen in the lab: a board failing over between two usbipa
        on one host).  A port left alone gives the URB back within seconds.  A port
        was in use when this driver attached to it, or when a record of it was
        written (by any process: a record outlives the link that freed its port).
        """
        hub = hub_for(speed)
        free = [p.port for p in (self.ports() if ports is None else ports)
                if p.hub == hub and p.free and p.port not in (exclude or ())]
        if not free:
            raise NoFreePort(f"no free {hub} port on vhci_hcd for a {speed.label} device")
        recorded = set(self._recorded_ports())
        for n in free:  # in port order: the lowest never used, without a stat each
            if n not in recorded and n not in self._used_at:
                return n
        return min(free, key=lambda n: (self._last_use(n, n in recorded), n))

    def _last_use(self, port: int, recorded: bool) -> float:
        written = self.sysfs.mtime(self._record_path(port)) if recorded else None
        return max(self._used_at.get(port, -1.0), -1.0 if written is None else written)

    def attach(self, sockfd: int, device: UsbDevice, host: str, service: str,
               ports: list[VhciPort] | None = None, transport: str = "tcp",
               identity: str | None = None) -> int:
        """Attach the device behind connected socket ``sockfd``; return the port.

        ``ports`` is a fresh :meth:`ports` reading the caller already has.
        Another process may take the port we picked between reading
        ``status`` and writing ``attach`` (the kernel then answers EBUSY):
        pick again rather than report a false "no free port".  The port is
        recorded for ``usbip port``; if recording fails, the port is detached.
        """
        if device.speed in (Speed.UNKNOWN, Speed.WIRELESS):
            raise ValidationError(f"{device.busid}: cannot attach a device of {device.speed.label}")
        tried: set[int] = set()
        while True:
            # Only a real "no free port" ends this: a port lost to another
            # process is excluded, and the kernel's state read again.
            port = self.free_port(device.speed, ports, exclude=tried)
            ports = None
            tried.add(port)
            try:
                self.sysfs.write(f"{VHCI0}/attach",
                                 f"{port} {sockfd} {device.devid} {int(device.speed)}")
            except KernelError as exc:
                if exc.errno == errno.EBUSY:
                    logger.debug("vhci port {} taken concurrently; picking another", port)
                    continue
                raise with_context(exc, f"attach {device.busid} to vhci port {port}") from exc
            break
        self._used_at[port] = time.time()
        try:
            self.write_record(port, PortRecord(host, service, device.busid, transport, identity))
        except (UsbipError, OSError) as exc:
            self.detach(port)
            raise UsbipError(f"attached to port {port} but could not record it: {exc}") from exc
        logger.info("attached {} from {} to vhci port {}", device.busid, host, port)
        return port

    def detach(self, port: int) -> None:
        """Detach ``port`` and forget its record; error if it is not in use."""
        p = self.port(port)
        if p.free:
            self.remove_record(port)
            raise DeviceNotFound(f"vhci port {port} is not in use")
        self.sysfs.write(f"{VHCI0}/detach", str(port))
        self.remove_record(port)
        logger.info("detached vhci port {}", port)

    # -- records -----------------------------------------------------------

    def _record_path(self, port: int) -> str:
        return f"{STATE_DIR}/port{int(port)}"

    def write_record(self, port: int, record: PortRecord) -> None:
        for value in (record.host, record.service, record.transport):
            if not _RECORD_FIELD.fullmatch(value):
                raise ValidationError(f"bad port record field {value!r}")
        if record.identity is not None and not is_identity(record.identity):
            raise ValidationError(f"bad identity {record.identity!r}")
        validate_busid(record.busid)
        self.sysfs.makedirs(STATE_DIR, mode=0o700)
        text = f"{record.host} {record.service} {record.busid}\n"
        if record.transport != "tcp" or record.identity is not None:
            text += record.transport + (f" {record.identity}\n" if record.identity else "\n")
        # Whole or not at all: no half-written record in /var/run.
        self.sysfs.replace_text(self._record_path(port), text)

    def read_record(self, port: int) -> PortRecord | None:
        # Unreadable, missing or malformed all mean "no record".
        lines = self.sysfs.read_optional(self._record_path(port)).splitlines()
        parts = lines[0].split() if lines else []
        if len(parts) != 3:
            return None
        extra = lines[1].split() if len(lines) > 1 else []
        if (not all(_RECORD_FIELD.fullmatch(x) for x in [*parts, *extra[:1]]) or len(extra) > 2
                or (len(extra) == 2 and not is_identity(extra[1]))):
            return None
        transport = extra[0] if extra else "tcp"
        identity = extra[1] if len(extra) == 2 else None
        host, service, busid = parts
        return PortRecord(host, service, busid, transport, identity)

    def remove_record(self, port: int) -> None:
        # A missing record, or a state directory that is not one, means "no record".
        self.sysfs.unlink(self._record_path(port), missing_ok=True)

    def prune_records(self, ports: list[VhciPort] | None = None) -> list[ImportedDevice]:
        """Forget records of ports the kernel has freed by itself (dead
        connections); return the ports in use with their records."""
        ports = self.ports() if ports is None else ports
        used = {p.port for p in ports if not p.free}
        for port in self._recorded_ports():
            if port not in used:
                self._used_at[port] = self._last_use(port, recorded=True)
                self.remove_record(port)
        return self.imported(ports)

    def _recorded_ports(self) -> list[int]:
        """The ports with a record, in use or not (one listing, no file read)."""
        try:
            names = self.sysfs.listdir(STATE_DIR)
        except KernelError as exc:
            if exc.errno != errno.ENOTDIR:
                raise
            # Like an unreadable record: none.  Writing one will say what is wrong.
            names = []
        return [int(name[4:]) for name in names if name.startswith("port") and name[4:].isdigit()]

    def imported(self, ports: list[VhciPort] | None = None) -> list[ImportedDevice]:
        """Ports in use, with their records."""
        ports = self.ports() if ports is None else ports
        return [ImportedDevice(p, self.read_record(p.port)) for p in ports if not p.free]

    def find(self, owner: str, busid: str,
             imported: list[ImportedDevice] | None = None) -> ImportedDevice | None:
        """The used port whose record says it leads to ``busid`` of ``owner`` (a TLS
        peer's identity, or a plain peer's address: :attr:`PortRecord.owner`)."""
        for imp in self.imported() if imported is None else imported:
            if imp.record and imp.record.owner == owner and imp.record.busid == busid:
                return imp
        return None
