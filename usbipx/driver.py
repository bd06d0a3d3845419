"""The one device-side driver interface, as the kernel tools' ``usbip_host_driver_ops``.

Two implementations export devices to a peer:

* :class:`usbipx.stubmode.host.HostDriver` -- real USB devices bound to ``usbip-host``;
* :class:`usbipx.gadget.vudc.VudcDriver` -- gadgets bound to a ``usbip-vudc`` UDC.

Daemons and commands pick one with :func:`device_driver` (``--device`` selects
vUDC mode) and never care which it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from usbipx.lease import Lease
from usbipx.usbdevice import ExportableDevice, UsbDevice, UsbInterface


class ExportStatus(IntEnum):
    """``usbip_status`` of a device-side device (``SDEV_ST_*`` / ``VUDC`` states)."""

    AVAILABLE = 1
    USED = 2
    ERROR = 3


@dataclass(frozen=True)
class LocalDevice:
    """A device of this host as a device-side driver sees it.

    ``driver`` is the kernel driver bound to a USB device (``usb``,
    ``usbip-host`` ...) or, for a vUDC, the configfs gadget bound to it.
    ``status`` is ``usbip_status`` when the device is ready for USB/IP.
    ``serial`` is the device's serial number string (sysfs ``serial``; for a
    vUDC, the gadget's ``strings/0x409/serialnumber``), None if it has none.
    It is never on the wire: USB/IP's device record has no room for it.
    """

    record: UsbDevice
    interfaces: tuple[UsbInterface, ...] = ()
    driver: str | None = None
    status: ExportStatus | None = None
    serial: str | None = None

    @property
    def busid(self) -> str:
        return self.record.busid

    @property
    def exportable(self) -> ExportableDevice:
        """The DEVLIST entry for this device."""
        return ExportableDevice(self.record, self.interfaces)


class DeviceDriver(Protocol):
    """What usbipd, ``connect``, the supervisor and its clean-up need from a device-side driver.

    Ownership goes through leases (:mod:`usbipx.lease`): :meth:`claim` says
    what making a device ready would take, without changing anything, so
    that the caller can record it first; :meth:`acquire` takes it;
    :meth:`release` gives back exactly what the lease took, and is the only
    code that unbinds, rebinds or removes.
    """

    name: str
    """Kernel driver name: ``usbip-host`` or ``usbip-vudc``."""

    def check_loaded(self) -> None:
        """Raise :class:`~usbipx.errors.ModuleNotLoaded` unless the kernel driver is there."""

    def ready_devices(self) -> list[LocalDevice]:
        """Devices handed to this driver (bound stub / vUDC with a gadget), any status."""

    def get(self, busid: str) -> LocalDevice:
        """One device by bus id; :class:`~usbipx.errors.DeviceNotFound` if there is none."""

    def present(self, busid: str) -> bool:
        """Whether the device is here at all (plugged in; the vUDC exists)."""

    def claim(self, busid: str, held: Lease | None = None) -> Lease:
        """The lease preparing ``busid`` for export takes; changes nothing.

        ``held`` is a lease recorded earlier for the same device: if it still
        owns the device, it is the lease (a restarted worker keeps what its
        predecessor bound).
        """

    def acquire(self, lease: Lease) -> None:
        """Make the leased device ready for export (bind it, if the lease says we do)."""

    def release(self, lease: Lease) -> None:
        """Give back what ``lease`` took; nothing if it took nothing."""

    def handoff(self, busid: str, sockfd: int) -> None:
        """Give the connected socket ``sockfd`` to the kernel for ``busid``."""

    def shutdown(self, busid: str) -> None:
        """Make the kernel drop an exported device's connection (``usbip_sockfd`` -1)."""

    def status(self, busid: str) -> ExportStatus:
        """Current ``usbip_status`` of ``busid``."""
