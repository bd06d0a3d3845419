"""Catalogue of configfs attributes: gadget, config and function attributes.

What each level of a gadget has: the device descriptor's attributes and
strings, a configuration's, and per function type (``mass_storage``,
``acm``, ``ecm``...) its attributes, LUN attributes and read-only ones.  How a
value of each kind is checked, written and read back is in
:mod:`usbipx.gadget.attrs`.

Function types not in the catalogue (``uac2``, ``uvc`` ...) are still
accepted: their attributes are written as given
(:func:`~usbipx.gadget.attrs.generic`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from usbipx.errors import ConfigError
from usbipx.gadget.attrs import Attr, AttrValue, Kind

# The gadget core refuses longer strings with EOVERFLOW (USB_MAX_STRING_LEN).
MAX_STRING_BYTES = 126
# f_mass_storage: FSG_MAX_LUNS; INQUIRY: 8 vendor + 16 product + 4 revision.
MAX_LUNS = 16
INQUIRY_LEN = 28
# libcomposite refuses function directory names of 40 bytes or more.
MAX_FUNCTION_NAME = 39


def _err(key: str, msg: str) -> ConfigError:
    return ConfigError(f"{key}: {msg}")


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
