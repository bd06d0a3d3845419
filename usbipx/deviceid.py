"""Devices by identity: ``--id VID:PID[:SERIAL]`` instead of a bus id.

A fleet of boards plugs the same device into different ports, and two
identical devices (same vendor and product) differ only by their serial
numbers.  :func:`parse_device_id` checks the option strictly (four hex digits
each, a serial of printable characters without spaces, at most 126 of them:
the longest USB string descriptor); :func:`select_device` picks the one
device that matches among candidates, or says clearly that none or several
do (listing them, with their serial numbers, so the user can be precise).

Nothing here builds a path: the chosen device's bus id comes from the
kernel's own listing, and a serial is only ever compared.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from usbipx.driver import LocalDevice
from usbipx.errors import DeviceNotFound, ValidationError
from usbipx.sysfs import Sysfs

MAX_SERIAL = 126
"""A USB string descriptor holds at most 126 UTF-16 characters."""

_VIDPID = re.compile(r"([0-9a-fA-F]{4}):([0-9a-fA-F]{4})")
ID_METAVAR = "VID:PID[:SERIAL]"


def is_serial(text: str) -> bool:
    """Whether ``text`` is a serial number usbipx can name: 1..126 printable
    characters, none of them white space."""
    return (0 < len(text) <= MAX_SERIAL and text.isprintable()
            and not any(c.isspace() for c in text))


def shown_serial(serial: str | None) -> str:
    """A serial as it can be printed on a terminal: escaped if it has control characters
    (it comes from the device), ``-`` if there is none."""
    if serial is None:
        return "-"
    return serial if serial.isprintable() else serial.encode("unicode_escape").decode()


@dataclass(frozen=True)
class DeviceId:
    """A device's identity: vendor and product ids, and optionally its serial number."""

    vendor: int
    product: int
    serial: str | None = None

    def __str__(self) -> str:
        ids = f"{self.vendor:04x}:{self.product:04x}"
        return ids if self.serial is None else f"{ids}:{self.serial}"

    def matches(self, vendor: int, product: int, serial: str | None = None) -> bool:
        """Whether a device with these ids (and serial) is the one named."""
        return (vendor == self.vendor and product == self.product
                and (self.serial is None or serial == self.serial))


def parse_device_id(text: str) -> DeviceId:
    """``VID:PID`` or ``VID:PID:SERIAL`` (``1d6b:0104:ABC123``); :class:`ValidationError`
    naming what is wrong otherwise."""
    head, sep, serial = text[:9], text[9:10], text[10:]
    m = _VIDPID.fullmatch(head)
    if m is None or (sep and sep != ":"):
        raise ValidationError(f"bad device id {text!r}: expected {ID_METAVAR} with four hex "
                              "digits each, e.g. 1d6b:0104 or 1d6b:0104:ABC123")
    if sep and not is_serial(serial):
        raise ValidationError(f"bad serial number in device id {text!r}: 1 to {MAX_SERIAL} "
                              "printable characters without spaces")
    return DeviceId(int(m[1], 16), int(m[2], 16), serial if sep else None)


class AmbiguousDevice(ValidationError):
    """A device id matches more than one device."""


def describe(devices: Iterable[LocalDevice]) -> str:
    """``1-1 (serial 0001), 2-1 (serial 0002)``: candidates as an error lists them."""
    return ", ".join(f"{d.busid} (serial {shown_serial(d.serial)})" for d in devices)


def select_device(want: DeviceId, devices: Sequence[LocalDevice]) -> LocalDevice:
    """The one device of ``devices`` that ``want`` names.

    :class:`DeviceNotFound` if none does; :class:`AmbiguousDevice` listing the
    candidates' bus ids and serial numbers if several do.
    """
    found = [d for d in devices
             if want.matches(d.record.id_vendor, d.record.id_product, d.serial)]
    if len(found) == 1:
        return found[0]
    if not found:
        # Named by serial: the devices of that product, so the user sees the serials.
        same = [d for d in devices if want.serial is not None
                and (d.record.id_vendor, d.record.id_product) == (want.vendor, want.product)]
        hint = f" (devices {want.vendor:04x}:{want.product:04x} here: {describe(same)})" \
            if same else ""
        raise DeviceNotFound(f"no device matches --id {want}{hint}")
    raise AmbiguousDevice(f"--id {want} matches {len(found)} devices: {describe(found)}; "
                          f"name one by serial ({want.vendor:04x}:{want.product:04x}:SERIAL) "
                          "or by bus id (-b)")


def select_remote(want: DeviceId, busids: Sequence[tuple[str, int, int]]) -> str:
    """The bus id of the one remote device (``(busid, vendor, product)`` from a usbipd's
    device list) that ``want`` names.  A device list carries no serial numbers, so a
    serial cannot be matched here."""
    if want.serial is not None:
        raise ValidationError(
            "a usbipd's device list carries no serial numbers: attach --id takes VID:PID "
            "only; find the bus id with `usbipx list -l` on the device side and use -b")
    found = [b for b, v, p in busids if want.matches(v, p)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise DeviceNotFound(f"the usbipd offers no device {want}")
    raise AmbiguousDevice(f"--id {want} matches {len(found)} devices of the usbipd: "
                          f"{', '.join(found)}; name one by bus id (-b)")


def one_of(busid: str | None, dev_id: str | None, busid_opt: str = "--busid BUSID") -> None:
    """Exactly one of ``-b`` and ``--id`` must be given."""
    if (busid is None) == (dev_id is None):
        raise ValidationError(f"give exactly one of {busid_opt} or --id {ID_METAVAR}")


def local_candidates(sysfs: Sysfs, vudc: bool) -> list[LocalDevice]:
    """The devices ``--id`` chooses from: this host's USB devices (stub mode) except
    those imported through vhci_hcd (they carry the ids of the device they mirror), or
    the vUDCs with a gadget bound (vUDC mode)."""
    if vudc:
        from usbipx.gadget.vudc import VudcDriver

        drv = VudcDriver(sysfs)
        drv.check_loaded()
        return drv.ready_devices()
    from usbipx.stubmode.host import HostDriver

    return [d for d in HostDriver(sysfs).list_devices() if "/vhci_hcd." not in d.record.path]


def busid_for(sysfs: Sysfs, busid: str | None, dev_id: str | None, vudc: bool = False) -> str:
    """The bus id a command acts on: ``-b`` as given, or the one device ``--id`` names."""
    one_of(busid, dev_id)
    if busid is not None:
        return busid
    assert dev_id is not None
    return select_device(parse_device_id(dev_id), local_candidates(sysfs, vudc)).busid
