"""Which USB devices the supervisor may export: those present now, and those plugged in later.

Both sources accept exactly the same devices: a USB device below a root hub
(a name :func:`usbipx.names.is_usb_busid` accepts -- not a root hub ``usb3``,
not an interface ``1-1:1.0``) that is not itself imported through vhci_hcd.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from usbipx.daemon.supervisor import Device
from usbipx.errors import UsbipError
from usbipx.names import is_usb_busid
from usbipx.stubmode.host import HostDriver
from usbipx.sysfs import Sysfs


def present_devices(sysfs: Sysfs) -> list[Device]:
    """USB devices plugged in now, except those imported through vhci_hcd."""
    out = []
    for d in HostDriver(sysfs).list_devices():  # root hubs and interfaces left out
        if not is_imported(d.record.path):
            out.append(Device(d.busid, d.record.id_vendor, d.record.id_product, d.serial))
    return out


def is_imported(syspath: str) -> bool:
    """Whether a USB device sits on vhci_hcd: imported, never to be exported again
    (on a host that is both sides, it has the ids of the device it mirrors)."""
    return "/vhci_hcd." in syspath


class Hotplug:
    """Kernel uevents for USB devices, through pyudev's netlink monitor.

    ``monitor`` (tests) is anything with pyudev's ``Monitor`` interface used
    here: ``start()``, ``fileno()`` and ``poll(timeout=0)`` returning devices
    with ``action``, ``subsystem``, ``device_type``, ``sys_name`` and
    ``properties``.  By default a monitor on the kernel's uevents (no udevd
    needed).
    """

    def __init__(self, on_device: Callable[[str, Device], None], monitor: Any = None,
                 sysfs: Sysfs | None = None) -> None:
        if monitor is None:
            import pyudev

            monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
        self.on_device = on_device
        self.monitor = monitor
        self.sysfs = sysfs or Sysfs()
        """Where an added device's serial number is read: kernel uevents carry none."""
        self.monitor.start()

    def fileno(self) -> int:
        """The descriptor to wait on for :meth:`readable`."""
        return int(self.monitor.fileno())

    def readable(self) -> None:
        """Hand every pending event about an exportable USB device to ``on_device``."""
        while (dev := self.monitor.poll(timeout=0)) is not None:
            # Root hubs (usb3) are usb_devices too: a job for one would retry for ever.
            if (dev.subsystem != "usb" or dev.device_type != "usb_device"
                    or not is_usb_busid(str(dev.sys_name))
                    or is_imported(str(dev.properties.get("DEVPATH", "")))):
                continue
            product = str(dev.properties.get("PRODUCT", ""))
            try:
                vendor, prod = (int(x, 16) for x in product.split("/")[:2])
            except ValueError:
                continue
            if not (0 <= vendor <= 0xFFFF and 0 <= prod <= 0xFFFF):
                continue
            busid = str(dev.sys_name)
            serial = None
            if dev.action == "add":
                # The uevent comes after the device's attributes exist.
                with contextlib.suppress(UsbipError):
                    serial = HostDriver(self.sysfs).serial(busid)
            self.on_device(str(dev.action), Device(busid, vendor, prod, serial))
