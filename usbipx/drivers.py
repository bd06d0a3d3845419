"""Which :class:`~usbipx.driver.DeviceDriver` serves a command: usbip-host (stub
mode) or usbip-vudc (``--device``).  Kept apart from :mod:`usbipx.driver`, the
contract both implement, so that neither implementation imports its chooser."""

from __future__ import annotations

from usbipx.driver import DeviceDriver
from usbipx.lease import VUDC, Lease
from usbipx.sysfs import Sysfs


def device_driver(sysfs: Sysfs, vudc: bool) -> DeviceDriver:
    """The stub-mode driver, or the vUDC driver when ``vudc`` (``--device``)."""
    # Only the chosen one is imported: a stub-mode command on a slow board
    # does not pay for the gadget package, nor a vUDC one for usbip-host's.
    if vudc:
        from usbipx.gadget.vudc import VudcDriver

        return VudcDriver(sysfs)
    from usbipx.stubmode.host import HostDriver

    return HostDriver(sysfs)


def driver_of_lease(sysfs: Sysfs, lease: Lease) -> DeviceDriver:
    """The driver that can release ``lease``."""
    return device_driver(sysfs, vudc=lease.driver == VUDC)
