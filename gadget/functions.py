"""Catalogue of configfs attributes: gadget, config and function attributes.

Each attribute knows how a spec value is checked (:func:`coerce`), how it is
written to configfs (:func:`encode`), how the kernel shows it (:func:`decode`)
and when two values mean the same kernel state (:func:`same`).  The kernel
formats many attributes differently from what it accepts (``idVendor``
``7531`` reads back ``0x1d6b``; rndis ``class`` is bare hex; ``inquiry_string``
is padded with spaces), so comparisons are done on decoded values: applying
a spec twice must see no difference.

Function types not in the catalogue (``uac2``, ``obex`` ...) are still
accepted: their attributes are written as given (:data:`GENERIC`).
"""

from __future__ import annotations

import enum
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from usbipx.errors import ConfigError

AttrValue = bool | int | str | bytes
"""A typed attribute value as a spec holds it."""

# The gadget core refuses longer strings with EOVERFLOW (USB_MAX_STRING_LEN).
MAX_STRING_BYTES = 126
# Attributes are stored through one page: longer writes are cut short.
MAX_ATTR_BYTES = 4095
# f_mass_storage: FSG_MAX_LUNS; INQUIRY: 8 vendor + 16 product + 4 revision.
MAX_LUNS = 16
INQUIRY_LEN = 28
# libcomposite refuses function directory names of 40 bytes or more.
MAX_FUNCTION_NAME = 39
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


# ---------------------------------------------------------------- gadget level

@dataclass(frozen=True)
class GadgetAttr:
    """A gadget (device descriptor) attribute: spec key and configfs attribute."""

    key: str
    attr: Attr


_SPEEDS = ("low-speed", "full-speed", "high-speed", "super-speed", "super-speed-plus")


def _check_mps0(value: AttrValue, key: str) -> None:
    if value not in (8, 16, 32, 64):
        raise _err(key, f"{value!r} is not 8, 16, 32 or 64")


GADGET_ATTRS: tuple[GadgetAttr, ...] = (
    GadgetAttr("id_vendor", Attr("idVendor", Kind.HEX16, required=True)),
    GadgetAttr("id_product", Attr("idProduct", Kind.HEX16, required=True)),
    GadgetAttr("bcd_device", Attr("bcdDevice", Kind.HEX16)),
    GadgetAttr("bcd_usb", Attr("bcdUSB", Kind.HEX16, kernel_managed=True)),
    GadgetAttr("device_class", Attr("bDeviceClass", Kind.HEX8, default=0)),
    GadgetAttr("device_subclass", Attr("bDeviceSubClass", Kind.HEX8, default=0)),
    GadgetAttr("device_protocol", Attr("bDeviceProtocol", Kind.HEX8, default=0)),
    GadgetAttr("max_packet_size0", Attr("bMaxPacketSize0", Kind.HEX8, kernel_managed=True,
                                        check=_check_mps0)),
    GadgetAttr("max_speed", Attr("max_speed", Kind.CHOICE, choices=_SPEEDS)),
)
GADGET_STRINGS = ("manufacturer", "product", "serialnumber")


# ---------------------------------------------------------------- config level

def _check_bm_attributes(value: AttrValue, key: str) -> None:
    assert isinstance(value, int)
    # USB 2.0 9.6.3: bit 7 must be one; only self-powered (6) and remote wakeup (5) may be set.
    if not value & 0x80 or value & ~0xE0:
        raise _err(key, f"0x{value:02x} must have bit 7 set and no bits but 7, 6 and 5")


CONFIG_ATTRS: tuple[GadgetAttr, ...] = (
    # 2 mA is CONFIG_USB_GADGET_VBUS_DRAW's default, what mkdir of a config gives.
    GadgetAttr("max_power", Attr("MaxPower", Kind.INT, default=2, minimum=0, maximum=1000)),
    GadgetAttr("bm_attributes", Attr("bmAttributes", Kind.HEX8, default=0x80,
                                     check=_check_bm_attributes)),
)
CONFIG_STRINGS = ("configuration",)


# ---------------------------------------------------------------- functions

@dataclass(frozen=True)
class FunctionType:
    """A gadget function type as configfs names it (``functions/<name>.<instance>``)."""

    name: str
    description: str
    attrs: tuple[Attr, ...] = ()
    # mass_storage: attributes of each lun.N sub-directory.
    lun_attrs: tuple[Attr, ...] = ()
    # Read-only attributes the kernel shows (port_num ...): named in errors.
    read_only: tuple[str, ...] = ()
    # Interfaces with Microsoft OS descriptors: os_desc/interface.<name>/ (rndis, ncm).
    os_desc_interfaces: tuple[str, ...] = ()
    extra_check: Callable[[Mapping[str, AttrValue], Mapping[int, Mapping[str, AttrValue]], str],
                          None] | None = None

    @property
    def module(self) -> str:
        """The kernel module configfs loads for this type."""
        return f"usb_f_{self.name}"

    def attr(self, name: str) -> Attr | None:
        return next((a for a in self.attrs if a.name == name), None)

    def lun_attr(self, name: str) -> Attr | None:
        return next((a for a in self.lun_attrs if a.name == name), None)


def _bool(name: str, default: bool | None = None, *, early: bool = False,
          live: bool = False) -> Attr:
    return Attr(name, Kind.BOOL, default=default, early=early, live=live)


def _int(name: str, default: int | None = None, lo: int | None = 1, hi: int | None = None) -> Attr:
    return Attr(name, Kind.INT, default=default, minimum=lo, maximum=hi)


def _check_lun_set(attrs: Mapping[str, AttrValue],
                   luns: Mapping[int, Mapping[str, AttrValue]], key: str) -> None:
    for n, lun in luns.items():
        # Without a medium only a removable LUN makes sense; the kernel refuses to bind otherwise.
        if not lun.get("file") and lun.get("removable") is False:
            raise _err(f"{key}.lun.{n}", "a non-removable LUN needs a backing file")


def _check_hid(attrs: Mapping[str, AttrValue],
               luns: Mapping[int, Mapping[str, AttrValue]], key: str) -> None:
    if "report_desc" not in attrs:
        raise _err(key, "a hid function needs preset = \"keyboard\"|\"mouse\" or report_desc (hex)")
    if "report_length" not in attrs:
        raise _err(key, "a hid function needs report_length (bytes per report)")


_ETHER = (
    Attr("dev_addr", Kind.MAC),
    Attr("host_addr", Kind.MAC),
    Attr("ifname", Kind.IFNAME),
    _int("qmult", default=5, lo=0, hi=1000),
)

CATALOGUE: dict[str, FunctionType] = {
    t.name: t
    for t in (
        FunctionType(
            "mass_storage", "USB mass storage (bulk-only SCSI), LUNs lun.0..lun.15",
            attrs=(_bool("stall", default=False),),  # configfs starts with can_stall = 0
            lun_attrs=(
                _bool("ro", default=False, early=True),
                _bool("cdrom", default=False, early=True),
                _bool("removable", default=True, live=True),
                _bool("nofua", default=False, live=True),
                Attr("inquiry_string", Kind.STR, default="", max_len=INQUIRY_LEN, live=True),
                Attr("file", Kind.PATH, default="", live=True),
            ),
            extra_check=_check_lun_set,
        ),
        FunctionType("acm", "CDC ACM serial port (/dev/ttyGS<port_num>)", read_only=("port_num",)),
        FunctionType("gser", "generic serial port (/dev/ttyGS<port_num>)",
                     read_only=("port_num",)),
        FunctionType("obex", "OBEX serial port", read_only=("port_num",)),
        FunctionType("ecm", "CDC Ethernet (ECM)", attrs=_ETHER),
        FunctionType("ncm", "CDC Network Control Model", attrs=_ETHER,
                     os_desc_interfaces=("ncm",)),
        FunctionType("eem", "CDC Ethernet Emulation Model", attrs=_ETHER),
        FunctionType("geth", "CDC subset Ethernet", attrs=_ETHER),
        FunctionType(
            "rndis", "RNDIS Ethernet",
            attrs=(*_ETHER,
                   Attr("class", Kind.BAREHEX8, default=0x02),
                   Attr("subclass", Kind.BAREHEX8, default=0x06),
                   Attr("protocol", Kind.BAREHEX8, default=0x00)),
            os_desc_interfaces=("rndis",),
        ),
        FunctionType(
            "hid", "HID device (/dev/hidg<minor>); preset keyboard or mouse",
            attrs=(
                _int("subclass", default=0, lo=0, hi=255),
                _int("protocol", default=0, lo=0, hi=255),
                _int("report_length", lo=1, hi=65535),
                _bool("no_out_endpoint", default=False),
                Attr("report_desc", Kind.BYTES),
            ),
            read_only=("dev",),
            extra_check=_check_hid,
        ),
        FunctionType(
            "midi", "USB MIDI (ALSA card)",
            attrs=(
                _int("index", default=-1, lo=-1, hi=31),
                Attr("id", Kind.STR, default="", max_len=64),
                _int("in_ports", default=1, lo=0, hi=16),
                _int("out_ports", default=1, lo=0, hi=16),
                _int("buflen", default=512),
                _int("qlen", default=32),
            ),
        ),
        FunctionType(
            "printer", "USB printer (/dev/g_printer<n>)",
            attrs=(Attr("pnp_string", Kind.STR, default="", max_len=1023),
                   _int("q_len", default=10, hi=255)),
        ),
        FunctionType(
            "Loopback", "loopback test function (usbtest)",
            attrs=(_int("bulk_buflen", default=4096), _int("qlen", default=32)),
        ),
        FunctionType(
            "SourceSink", "source/sink test function (usbtest)",
            attrs=(
                _int("pattern", default=0, lo=0, hi=2),
                _int("isoc_interval", default=4, lo=1, hi=16),
                _int("isoc_maxpacket", default=1024, lo=0, hi=1024),
                _int("isoc_mult", default=0, lo=0, hi=2),
                _int("isoc_maxburst", default=0, lo=0, hi=15),
                _int("bulk_buflen", default=4096),
                _int("bulk_qlen", default=1),
                _int("iso_qlen", default=8, lo=0),
            ),
        ),
    )
}


def function_type(name: str) -> FunctionType | None:
    """The catalogue entry of a function type, or None for an uncatalogued one."""
    return CATALOGUE.get(name)


def ordered(attrs: Mapping[str, AttrValue], catalogue: tuple[Attr, ...]) -> list[str]:
    """Attribute names in the order they must be written.

    ``early`` attributes first (mass_storage ro/cdrom are EBUSY once a file is
    open), the backing ``file`` last, the rest in catalogue then spec order.
    """
    known = [a.name for a in catalogue]

    def rank(name: str) -> tuple[int, int]:
        a = next((x for x in catalogue if x.name == name), None)
        if a is not None and a.early:
            group = 0
        elif a is not None and a.kind is Kind.PATH:
            group = 2
        else:
            group = 1
        return (group, known.index(name) if name in known else len(known))

    return sorted(attrs, key=rank)
