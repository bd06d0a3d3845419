"""Device names as the kernel spells them: one pattern for each, used everywhere.

A USB device is ``<bus>-<port>[.<port>...]`` (``1-1``, ``3-1.4.2``); a vUDC
instance is ``usbip-vudc.<N>``.  Both may appear as a bus id on the wire and
on the command line; nothing builds a sysfs path from a name these patterns
have not accepted.
"""

from __future__ import annotations

import re

from usbipx.errors import ValidationError

USB_BUSID = re.compile(r"[0-9]{1,3}-[0-9]{1,3}(?:\.[0-9]{1,3}){0,5}")
"""A USB device below a root hub (root hubs themselves are ``usbN``)."""

VUDC_PREFIX = "usbip-vudc."
VUDC_NAME = re.compile(r"usbip-vudc\.[0-9]{1,4}")
"""A usbip-vudc platform device and UDC (``usbip-vudc.0``)."""


GADGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
"""A configfs gadget (directory under ``usb_gadget/``), as gadget specs name it."""


def is_usb_busid(name: str) -> bool:
    """Whether ``name`` names a USB device (not a root hub, not an interface)."""
    return USB_BUSID.fullmatch(name) is not None


def is_vudc_busid(name: str) -> bool:
    """Whether ``name`` names a usbip-vudc instance rather than a USB device."""
    return VUDC_NAME.fullmatch(name) is not None


def validate_busid(busid: str) -> str:
    """Return ``busid`` if it names a USB device (``1-1.2``) or a vUDC (``usbip-vudc.0``)."""
    if not (is_usb_busid(busid) or is_vudc_busid(busid)):
        raise ValidationError(
            f"bad bus id {busid!r}: expected a USB bus id like 1-1 or 1-1.2, "
            "or a vUDC like usbip-vudc.0"
        )
    return busid


def vudc_name(index: int) -> str:
    """``usbip-vudc.<index>``."""
    return f"{VUDC_PREFIX}{index}"


def vudc_index(name: str) -> int:
    """The instance number of a vUDC name (``usbip-vudc.3`` -> 3)."""
    if not is_vudc_busid(name):
        raise ValidationError(f"{name!r} is not a vUDC name (usbip-vudc.N)")
    return int(name[len(VUDC_PREFIX):])

