"""configfs attribute values: how a spec value is checked, written, read and compared.

Each :class:`Attr` has a :class:`Kind` that decides how a spec value is
checked (:func:`coerce`), how it is written to configfs (:func:`encode`), how
the kernel shows it (:func:`decode`) and when two values mean the same
kernel state (:func:`same`).  The kernel formats many attributes
differently from what it accepts (``idVendor`` ``7531`` reads back
``0x1d6b``; rndis ``class`` is bare hex; ``inquiry_string`` is padded with
spaces), so comparisons are done on decoded values: applying a spec twice
must see no difference.  Which attributes exist is in the catalogue,
:mod:`usbipx.gadget.functions`.
"""

from __future__ import annotations

import enum
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass

from usbipx.errors import ConfigError

AttrValue = bool | int | str | bytes
"""A typed attribute value as a spec holds it."""

# Attributes are stored through one page: longer writes are cut short.
MAX_ATTR_BYTES = 4095
UNNAMED_NETDEV = "(unnamed net_device)"


class Kind(enum.Enum):
    """How an attribute's value is written and read."""

    BOOL = "bool"  # kstrtobool: written 1/0, read 1/0 (Y/N for some)
    INT = "int"  # decimal
    HEX16 = "hex16"  # written and read as 0x%04x (idVendor, bcdDevice ...)
    HEX8 = "hex8"  # written and read as 0x%02x (bDeviceClass, bmAttributes ...)
    # written as 0x%02x, read as the kernel prints a C char: 0xcd reads 0xffffffcd
    # (os_desc/b_vendor_code)
    CHAR8 = "char8"
    BAREHEX8 = "barehex8"  # %02x without 0x (rndis class/subclass/protocol)
    STR = "str"  # text; the kernel may append a newline or pad
    CHOICE = "choice"  # one of a fixed set of words (max_speed)
    MAC = "mac"  # xx:xx:xx:xx:xx:xx, read back with a NUL before the newline
    IFNAME = "ifname"  # network interface pattern with one %d
    PATH = "path"  # absolute path of a backing file; "" = none
    BYTES = "bytes"  # raw binary (hid report_desc); hex in specs
    # ASCII in a fixed-size field: written NUL-padded to max_len, since a shorter
    # write replaces only its own length (os_desc compatible_id)
    PADDED = "padded"
    GENERIC = "generic"  # any scalar, written as text (uncatalogued attributes)


@dataclass(frozen=True)
class Attr:
    """One configfs attribute: its name, kind, limits and kernel default.

    ``default`` is what the kernel sets on mkdir; an attribute omitted from a
    spec converges to it.  ``None`` means "no fixed default" (random MACs,
    kernel-version bcdDevice ...): an omitted attribute is left alone.
    """

    name: str
    kind: Kind
    default: AttrValue | None = None
    minimum: int | None = None
    maximum: int | None = None
    max_len: int | None = None
    choices: tuple[str, ...] = ()
    required: bool = False
    # Written before the others (mass_storage ro/cdrom: EBUSY once a file is open).
    early: bool = False
    # Rewritten by the UDC core at enumeration (bcdUSB, bMaxPacketSize0):
    # differences are ignored while the gadget is bound.
    kernel_managed: bool = False
    # Accepted while the function is linked into a config (mass_storage LUN
    # file/removable/nofua/inquiry_string); other function attributes are EBUSY then.
    live: bool = False
    check: Callable[[AttrValue, str], None] | None = None


def _err(key: str, msg: str) -> ConfigError:
    return ConfigError(f"{key}: {msg}")


def coerce(attr: Attr, value: object, key: str) -> AttrValue:
    """Check a spec value (from TOML) for ``attr``; ``key`` names it in errors."""
    kind = attr.kind
    if kind is Kind.BOOL:
        if isinstance(value, bool):
            out: AttrValue = value
        elif isinstance(value, int) and value in (0, 1):
            out = bool(value)
        else:
            raise _err(key, f"expected true or false, got {value!r}")
    elif kind in (Kind.INT, Kind.HEX16, Kind.HEX8, Kind.CHAR8, Kind.BAREHEX8):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _err(key, f"expected an integer, got {value!r}")
        lo, hi = attr.minimum, attr.maximum
        if kind is Kind.HEX16:
            lo, hi = (0 if lo is None else lo), (0xFFFF if hi is None else hi)
        elif kind in (Kind.HEX8, Kind.CHAR8, Kind.BAREHEX8):
            lo, hi = (0 if lo is None else lo), (0xFF if hi is None else hi)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise _err(key, f"{value} is out of range {_range(lo, hi)}")
        out = value
    elif kind in (Kind.STR, Kind.CHOICE, Kind.MAC, Kind.IFNAME, Kind.PATH, Kind.PADDED):
        if not isinstance(value, str):
            raise _err(key, f"expected a string, got {value!r}")
        if "\n" in value or "\0" in value:
            raise _err(key, "must not contain a newline or NUL")
        out = _check_text(attr, value, key)
    elif kind is Kind.BYTES:
        out = parse_hex(value, key)
        if not out:
            raise _err(key, "must not be empty")
        if len(out) > MAX_ATTR_BYTES:
            raise _err(key, f"{len(out)} bytes is longer than the kernel's {MAX_ATTR_BYTES}")
    elif isinstance(value, bool | int):  # GENERIC from here on
        out = value
    elif isinstance(value, str):
        if "\0" in value:
            raise _err(key, "must not contain NUL")
        if len(value.encode()) > MAX_ATTR_BYTES:
            raise _err(key, f"longer than the kernel's {MAX_ATTR_BYTES} bytes")
        out = value
    else:
        raise _err(key, f"expected a string, integer or boolean, got {value!r}")
    if attr.check is not None:
        attr.check(out, key)
    return out


def _range(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"{lo}..{hi}"
    return f">= {lo}" if lo is not None else f"<= {hi}"


_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_IFNAME = re.compile(r"[A-Za-z0-9_.-]*%d[A-Za-z0-9_.-]*")


def _check_text(attr: Attr, value: str, key: str) -> str:
    if attr.max_len is not None and len(value.encode()) > attr.max_len:
        raise _err(key, f"longer than {attr.max_len} bytes")
    if attr.kind is Kind.CHOICE and value not in attr.choices:
        raise _err(key, f"{value!r} is not one of {', '.join(attr.choices)}")
    if attr.kind is Kind.MAC:
        if not _MAC.fullmatch(value):
            raise _err(key, f"{value!r} is not a MAC address like 02:00:00:00:00:01")
        if int(value[:2], 16) & 1:
            raise _err(key, f"{value} is a multicast address; the kernel wants a unicast one")
        return value.lower()
    if attr.kind is Kind.IFNAME and (not _IFNAME.fullmatch(value) or len(value) > 15):
        raise _err(key, f"{value!r} must be an interface name pattern with one %d, "
                        "at most 15 characters (e.g. usb%d)")
    if attr.kind is Kind.PATH and value:
        if not os.path.isabs(value):
            raise _err(key, f"{value!r} is not an absolute path")
        try:
            st = os.stat(value)
        except OSError as exc:
            raise _err(key, f"{value}: {exc.strerror}") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise _err(key, f"{value} is not a regular file or block device")
    return value


def parse_hex(value: object, key: str) -> bytes:
    """Bytes from hex text; spaces, colons and commas between bytes are allowed."""
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise _err(key, f"expected a hex string, got {value!r}")
    text = re.sub(r"[\s:,]", "", value)
    if text[:2].lower() == "0x":
        text = text[2:]
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise _err(key, "is not hex (pairs of hex digits, e.g. \"05 01 09 06\")") from None


def encode(attr: Attr, value: AttrValue) -> bytes:
    """The bytes to write for ``value``.

    configfs refuses an empty write with EFAULT, so "empty" is written as a
    lone newline, which the kernel strips.
    """
    kind = attr.kind
    if kind is Kind.BYTES:
        assert isinstance(value, bytes)
        return value
    if kind is Kind.PADDED:
        assert isinstance(value, str) and attr.max_len is not None
        return value.encode("ascii").ljust(attr.max_len, b"\0")
    if isinstance(value, bool):
        text = "1" if value else "0"
    elif isinstance(value, int):
        if kind is Kind.HEX16:
            text = f"0x{value:04x}"
        elif kind in (Kind.HEX8, Kind.CHAR8):
            text = f"0x{value:02x}"
        elif kind is Kind.BAREHEX8:
            text = f"{value:02x}"
        else:
            text = str(value)
    elif isinstance(value, bytes):
        text = value.decode()
    else:
        text = value
    return text.encode() if text else b"\n"


def decode(attr: Attr, raw: bytes) -> AttrValue | None:
    """The value the kernel shows in ``raw``; None if it cannot be written back."""
    kind = attr.kind
    if kind is Kind.BYTES:
        return raw
    if kind is Kind.PADDED:
        # The whole field, NUL-padded, no newline: the value ends at the first NUL.
        return raw.split(b"\0", 1)[0].decode("ascii", "replace")
    text = raw.decode("utf-8", "replace").replace("\0", "")
    text = text[:-1] if text.endswith("\n") else text
    try:
        if kind is Kind.BOOL:
            return text.strip() in ("1", "Y", "y")
        if kind is Kind.INT:
            return int(text.strip())
        if kind in (Kind.HEX16, Kind.HEX8, Kind.BAREHEX8):
            return int(text.strip(), 16)
        if kind is Kind.CHAR8:
            return int(text.strip(), 16) & 0xFF  # sign-extended by the kernel's %02x
    except ValueError:
        return None
    if kind is Kind.MAC:
        return text.strip().lower()
    if kind is Kind.IFNAME:
        return ifname_pattern(text.strip())
    if kind is Kind.STR:
        # inquiry_string is padded with spaces to 28 bytes: trailing blanks carry nothing.
        return text.rstrip()
    if kind is Kind.GENERIC:
        t = text.strip()
        return int(t) if re.fullmatch(r"-?[0-9]+", t) and str(int(t)) == t else t
    return text.strip()


def ifname_pattern(shown: str) -> str:
    """The ``%d`` pattern behind an interface name the kernel shows.

    Before the net device is registered the kernel shows the pattern
    (``usb%d``) or ``(unnamed net_device)``; afterwards the real name
    (``usb0``), which cannot be written back.  "" means "not set".
    """
    if shown == UNNAMED_NETDEV or not shown:
        return ""
    if "%d" in shown:
        return shown
    m = re.fullmatch(r"(.*?)[0-9]+", shown)
    return f"{m.group(1)}%d" if m else ""


def same(attr: Attr, desired: AttrValue, actual: AttrValue | None) -> bool:
    """Whether the kernel state ``actual`` already is ``desired``."""
    if actual is None:
        return False
    kind = attr.kind
    if kind is Kind.IFNAME:
        # An unset or unreadable name cannot be compared; leave it be.
        return actual in ("", desired)
    if kind is Kind.PATH:
        if not desired or not actual:
            return desired == actual
        # The kernel shows the path of the opened file, symlinks resolved.
        return os.path.realpath(str(desired)) == os.path.realpath(str(actual))
    if kind is Kind.STR:
        return str(desired).rstrip() == str(actual).rstrip()
    if kind is Kind.GENERIC:
        d = encode(attr, desired).decode().strip()
        a = str(actual).strip() if not isinstance(actual, bool) else ("1" if actual else "0")
        if d == a:
            return True
        try:
            return int(d, 0) == int(a, 0)
        except ValueError:
            return False
    return desired == actual


def generic(name: str) -> Attr:
    """Attribute of an uncatalogued function type: any scalar, written as text."""
    return Attr(name, Kind.GENERIC)
