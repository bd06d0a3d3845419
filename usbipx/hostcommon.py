"""What usbip-host and usbip-vudc have in common: a device directory with export attributes.

Both kernel drivers give an exportable device the same two attributes in its
sysfs directory, as the kernel's ``usbip_host_common.c`` serves both of its
drivers: ``usbip_status`` (1 available, 2 exported, 3 error) and
``usbip_sockfd`` (write a connected socket's descriptor to start the export,
``-1`` to end it).  :class:`ExportingDriver` implements status, handoff and
shutdown once over :meth:`ExportingDriver.device_dir`; the two drivers say
only where a device's directory is and what is missing when it is not ready.
"""

from __future__ import annotations

from usbipx.driver import ExportStatus
from usbipx.errors import DeviceBusy, DeviceNotFound, UsbipError
from usbipx.sysfs import Sysfs


class ExportingDriver:
    """Export attributes of a device-side driver's devices, keyed on their sysfs directory."""

    name = ""
    """Kernel driver name (``usbip-host``, ``usbip-vudc``)."""

    def __init__(self, sysfs: Sysfs | None = None) -> None:
        self.sysfs = sysfs or Sysfs()

    def device_dir(self, busid: str) -> str:
        """The sysfs directory of ``busid`` (validated); :class:`DeviceNotFound` if absent."""
        raise NotImplementedError

    def not_ready(self, busid: str) -> UsbipError:
        """The error for a device that has no ``usbip_status`` (not handed to this driver)."""
        return DeviceNotFound(f"{busid} is not ready for export on {self.name}")

    def ready(self, busid: str) -> None:
        """Raise a clear error unless ``busid`` can be handed a socket (a hook for vUDC)."""

    def present(self, busid: str) -> bool:
        """Whether the device is here (plugged in / the vUDC exists)."""
        try:
            self.device_dir(busid)
        except DeviceNotFound:
            return False
        return True

    def _read_status(self, devdir: str) -> ExportStatus | None:
        try:
            return ExportStatus(self.sysfs.read_int(f"{devdir}/usbip_status"))
        except (UsbipError, ValueError):
            return None

    def status_or_none(self, busid: str) -> ExportStatus | None:
        """``usbip_status`` of ``busid``, or None while the driver does not hold it."""
        try:
            return self._read_status(self.device_dir(busid))
        except UsbipError:
            return None

    def status(self, busid: str) -> ExportStatus:
        """Current ``usbip_status`` of ``busid``."""
        st = self._read_status(self.device_dir(busid))
        if st is None:
            raise self.not_ready(busid)
        return st

    def handoff(self, busid: str, sockfd: int) -> None:
        """Give the connected socket ``sockfd`` to the kernel: the export starts."""
        self.ready(busid)
        st = self.status(busid)
        if st != ExportStatus.AVAILABLE:
            raise DeviceBusy(f"{busid} is {st.name.lower()}, not available for export")
        self.sysfs.write(f"{self.device_dir(busid)}/usbip_sockfd", str(sockfd))

    def shutdown(self, busid: str) -> None:
        """Make the kernel drop an exported device's connection."""
        self.sysfs.write(f"{self.device_dir(busid)}/usbip_sockfd", "-1")
