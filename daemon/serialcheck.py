"""usbipa's serial-number check: read the serial of a device attached to vhci_hcd.

USB/IP's device record has no serial number, so a policy rule that names one
(:mod:`usbipx.daemon.policy`) can only be checked on the device itself, once
it has enumerated here: vhci_hcd's ``status`` shows the port's local bus id
(``3-1``) from the moment the hub driver addressed the device, and the
device's directory -- with its ``serial`` attribute, if it has one -- appears
in ``/sys/bus/usb/devices`` once its descriptors and strings have been read.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from usbipx.errors import DeviceNotFound
from usbipx.names import is_usb_busid
from usbipx.vhci import VhciDriver

SERIAL_WAIT = 5.0
"""Seconds an attached device gets to enumerate before it is refused."""
POLL = 0.05
USB_DEVICES = "/sys/bus/usb/devices"


def imported_serial(vhci: VhciDriver, port: int, timeout: float = SERIAL_WAIT,
                    clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep) -> str | None:
    """The serial number of the device vhci_hcd enumerated on ``port`` (None: it has
    none), polling until it has enumerated.

    :class:`DeviceNotFound` if the port is freed first, or nothing has enumerated
    within ``timeout`` seconds.
    """
    deadline = clock() + timeout
    while True:
        here = vhci.port(port)
        if here.free:
            raise DeviceNotFound(f"vhci port {port} was freed before its device enumerated")
        local = here.local_busid
        # The bus id comes from the kernel's status line: checked before it names a path.
        if is_usb_busid(local) and vhci.sysfs.is_dir(f"{USB_DEVICES}/{local}"):
            return vhci.sysfs.read_optional(f"{USB_DEVICES}/{local}/serial") or None
        if clock() >= deadline:
            raise DeviceNotFound(f"no device enumerated on vhci port {port} within "
                                 f"{timeout:g} s")
        sleep(POLL)
