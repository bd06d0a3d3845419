"""Vendor and product names from the hwdata ``usb.ids`` database, when present."""

from __future__ import annotations

import functools
import os

USB_IDS_PATHS = ("/usr/share/hwdata/usb.ids", "/usr/share/misc/usb.ids", "/usr/share/usb.ids")


@functools.lru_cache(maxsize=4)
def _load(path: str) -> dict[int, tuple[str, dict[int, str]]]:
    vendors: dict[int, tuple[str, dict[int, str]]] = {}
    products: dict[int, str] | None = None
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip() or line.startswith("#"):
                continue
            if line.startswith("C "):
                break  # the class section follows the vendor section
            if not line.startswith("\t"):
                ident, _, name = line.partition("  ")
                try:
                    vid = int(ident, 16)
                except ValueError:
                    products = None
                    continue
                products = {}
                vendors[vid] = (name.strip(), products)
            elif products is not None and not line.startswith("\t\t"):
                ident, _, name = line.strip().partition("  ")
                try:
                    products[int(ident, 16)] = name.strip()
                except ValueError:
                    continue
    return vendors


def _database(path: str | None) -> dict[int, tuple[str, dict[int, str]]]:
    for p in (path,) if path else USB_IDS_PATHS:
        if p and os.path.exists(p):
            return _load(p)
    return {}


def names(vendor: int, product: int, path: str | None = None) -> tuple[str, str]:
    """(vendor name, product name); ``unknown vendor``/``unknown product`` when not listed."""
    entry = _database(path).get(vendor)
    if entry is None:
        return "unknown vendor", "unknown product"
    return entry[0], entry[1].get(product, "unknown product")


def describe(vendor: int, product: int, path: str | None = None) -> str:
    """``Vendor : Product (vvvv:pppp)`` as the kernel's ``usbip`` prints it."""
    v, p = names(vendor, product, path)
    return f"{v} : {p} ({vendor:04x}:{product:04x})"
