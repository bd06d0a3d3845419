"""Vendor and product names from the hwdata ``usb.ids`` database, when present."""

from __future__ import annotations

import functools
import os

USB_IDS_PATHS = ("/usr/share/hwdata/usb.ids", "/usr/share/misc/usb.ids", "/usr/share/usb.ids")


Classes = dict[int, tuple[str, dict[int, tuple[str, dict[int, str]]]]]


@functools.lru_cache(maxsize=4)
def _load_classes(path: str) -> Classes:
    """The ``C`` section: class -> (name, subclass -> (name, protocol -> name))."""
    classes: Classes = {}
    subs: dict[int, tuple[str, dict[int, str]]] | None = None
    protos: dict[int, str] | None = None
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("C "):
                ident, _, name = line[2:].partition("  ")
                subs = {}
                classes[int(ident, 16)] = (name.strip(), subs)
                continue
            if subs is None or not line.strip() or line.startswith("#"):
                continue
            if not line.startswith("\t"):
                if classes:
                    subs = None  # the next section started
                continue
            ident, _, name = line.strip().partition("  ")
            try:
                num = int(ident, 16)
            except ValueError:
                continue
            if line.startswith("\t\t"):
                if protos is not None:
                    protos[num] = name.strip()
            else:
                protos = {}
                subs[num] = (name.strip(), protos)
    return classes


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


def _find(path: str | None) -> str | None:
    for p in (path,) if path else USB_IDS_PATHS:
        if p and os.path.exists(p):
            return p
    return None


def _database(path: str | None) -> dict[int, tuple[str, dict[int, str]]]:
    found = _find(path)
    return _load(found) if found else {}


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


def describe_class(cls: int, subclass: int, protocol: int, path: str | None = None) -> str:
    """``Class / Subclass / Protocol (cc/ss/pp)`` as the kernel's ``usbip`` prints it."""
    code = f"({cls:02x}/{subclass:02x}/{protocol:02x})"
    if cls == subclass == protocol == 0:
        return f"(Defined at Interface level) {code}"
    found = _find(path)
    classes = _load_classes(found) if found else {}
    c_name, subs = classes.get(cls, ("unknown class", {}))
    s_name, protos = subs.get(subclass, ("unknown subclass", {}))
    p_name = protos.get(protocol, "unknown protocol")
    return f"{c_name} / {s_name} / {p_name} {code}"
