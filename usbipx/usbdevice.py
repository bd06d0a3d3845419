"""The device and interface records of the USB/IP protocol.

``struct usbip_usb_device`` (312 bytes) describes one device: a DEVLIST reply
lists them, each followed by ``bNumInterfaces`` 4-byte
``struct usbip_usb_interface`` records, and IMPORT replies, EXPORT and
UNEXPORT requests carry one.  :mod:`usbipx.protocol` frames them into PDUs.

Every field is validated on construction and on decoding: NUL-terminated
strings of the expected characters, a valid bus id, a known speed and
integers that fit their fields.  Bad wire bytes raise :class:`ProtocolError`,
bad values :class:`ValidationError`.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from usbipx.errors import ProtocolError, ValidationError
from usbipx.names import validate_busid

SYSFS_PATH_MAX = 256
SYSFS_BUS_ID_SIZE = 32
DEVICE_SIZE = 312
INTERFACE_SIZE = 4
MAX_INTERFACES = 32

_DEVICE = struct.Struct(">256s32sIII3H6B")
_INTERFACE = struct.Struct(">BBBx")
assert _DEVICE.size == DEVICE_SIZE and _INTERFACE.size == INTERFACE_SIZE

_PATH_RE = re.compile(r"[A-Za-z0-9/._:+-]*")
BUSID_CHARS = re.compile(r"[A-Za-z0-9._:-]*")
"""What a bus id on the wire may be made of (:func:`validate_busid` says more)."""


class Speed(IntEnum):
    """``enum usb_device_speed`` of the kernel."""

    UNKNOWN = 0
    LOW = 1
    FULL = 2
    HIGH = 3
    WIRELESS = 4
    SUPER = 5
    SUPER_PLUS = 6

    @property
    def label(self) -> str:
        """Human name with the signalling rate, as ``usbip port`` prints it."""
        return _SPEED_LABEL[self]


_SPEED_LABEL = {
    Speed.UNKNOWN: "Unknown Speed",
    Speed.LOW: "Low Speed(1.5Mbps)",
    Speed.FULL: "Full Speed(12Mbps)",
    Speed.HIGH: "High Speed(480Mbps)",
    Speed.WIRELESS: "Wireless",
    Speed.SUPER: "Super Speed(5000Mbps)",
    Speed.SUPER_PLUS: "Super Speed Plus(10000Mbps)",
}


def _check_int(name: str, value: int, bits: int) -> None:
    if not 0 <= value < (1 << bits):
        raise ValidationError(f"{name} {value} does not fit in {bits} bits")


def decode_cstr(raw: bytes, what: str, pattern: re.Pattern[str]) -> str:
    """The text before the NUL of a fixed-size field, all of it matching ``pattern``;
    :class:`ProtocolError` (naming ``what``) otherwise."""
    nul = raw.find(b"\0")
    if nul < 0:
        raise ProtocolError(f"{what} is not NUL-terminated")
    try:
        text = raw[:nul].decode("ascii")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} has non-ASCII bytes") from exc
    if not pattern.fullmatch(text):
        raise ProtocolError(f"{what} {text!r} has unexpected characters")
    return text


@dataclass(frozen=True)
class UsbInterface:
    """``struct usbip_usb_interface``: class, subclass and protocol of an interface."""

    interface_class: int
    interface_subclass: int
    interface_protocol: int

    SIZE: ClassVar[int] = INTERFACE_SIZE

    def __post_init__(self) -> None:
        _check_int("bInterfaceClass", self.interface_class, 8)
        _check_int("bInterfaceSubClass", self.interface_subclass, 8)
        _check_int("bInterfaceProtocol", self.interface_protocol, 8)

    def pack(self) -> bytes:
        return _INTERFACE.pack(self.interface_class, self.interface_subclass,
                               self.interface_protocol)

    @classmethod
    def unpack(cls, data: bytes) -> UsbInterface:
        if len(data) != INTERFACE_SIZE:
            raise ProtocolError(f"interface record is {len(data)} bytes, not {INTERFACE_SIZE}")
        return cls(*_INTERFACE.unpack(data))


@dataclass(frozen=True)
class UsbDevice:
    """``struct usbip_usb_device``: the 312-byte record describing one device.

    ``busid`` must be a valid bus id (see :func:`validate_busid`); ``path`` is
    the device's sysfs path on its own host, informational only.
    """

    path: str
    busid: str
    busnum: int
    devnum: int
    speed: Speed
    id_vendor: int
    id_product: int
    bcd_device: int
    device_class: int = 0
    device_subclass: int = 0
    device_protocol: int = 0
    configuration_value: int = 0
    num_configurations: int = 1
    num_interfaces: int = 0

    SIZE: ClassVar[int] = DEVICE_SIZE

    def __post_init__(self) -> None:
        validate_busid(self.busid)
        if len(self.path) >= SYSFS_PATH_MAX or not _PATH_RE.fullmatch(self.path):
            raise ValidationError(f"bad device path {self.path!r}")
        try:
            Speed(self.speed)
        except ValueError:
            raise ValidationError(f"unknown USB speed {self.speed}") from None
        object.__setattr__(self, "speed", Speed(self.speed))
        for name, bits in (("busnum", 32), ("devnum", 32), ("idVendor", 16), ("idProduct", 16),
                           ("bcdDevice", 16), ("bDeviceClass", 8), ("bDeviceSubClass", 8),
                           ("bDeviceProtocol", 8), ("bConfigurationValue", 8),
                           ("bNumConfigurations", 8), ("bNumInterfaces", 8)):
            _check_int(name, getattr(self, _FIELD_OF[name]), bits)
        if self.num_interfaces > MAX_INTERFACES:
            raise ValidationError(f"bNumInterfaces {self.num_interfaces} exceeds {MAX_INTERFACES}")

    @property
    def devid(self) -> int:
        """``busnum << 16 | devnum``, the id vhci_hcd's ``attach`` takes."""
        return (self.busnum << 16) | self.devnum

    def pack(self) -> bytes:
        return _DEVICE.pack(
            self.path.encode(), self.busid.encode(), self.busnum, self.devnum, int(self.speed),
            self.id_vendor, self.id_product, self.bcd_device, self.device_class,
            self.device_subclass, self.device_protocol, self.configuration_value,
            self.num_configurations, self.num_interfaces,
        )

    @classmethod
    def unpack(cls, data: bytes) -> UsbDevice:
        """Decode and validate one record; raises :class:`ProtocolError`."""
        if len(data) != DEVICE_SIZE:
            raise ProtocolError(f"device record is {len(data)} bytes, not {DEVICE_SIZE}")
        (path, busid, busnum, devnum, speed, vendor, product, bcd, dclass, dsub, dproto,
         cfg, ncfg, nif) = _DEVICE.unpack(data)
        path_s = decode_cstr(path, "device path", _PATH_RE)
        busid_s = decode_cstr(busid, "bus id", BUSID_CHARS)
        try:
            return cls(path_s, busid_s, busnum, devnum, speed, vendor, product, bcd, dclass,
                       dsub, dproto, cfg, ncfg, nif)
        except ValidationError as exc:
            raise ProtocolError(f"bad device record: {exc}") from exc


_FIELD_OF = {
    "busnum": "busnum", "devnum": "devnum", "idVendor": "id_vendor", "idProduct": "id_product",
    "bcdDevice": "bcd_device", "bDeviceClass": "device_class",
    "bDeviceSubClass": "device_subclass", "bDeviceProtocol": "device_protocol",
    "bConfigurationValue": "configuration_value", "bNumConfigurations": "num_configurations",
    "bNumInterfaces": "num_interfaces",
}


@dataclass(frozen=True)
class ExportableDevice:
    """One entry of a DEVLIST reply: a device and its interface records."""

    device: UsbDevice
    interfaces: tuple[UsbInterface, ...] = ()

    def __post_init__(self) -> None:
        if len(self.interfaces) != self.device.num_interfaces:
            raise ValidationError(
                f"{self.device.busid}: {len(self.interfaces)} interface records for "
                f"bNumInterfaces {self.device.num_interfaces}"
            )
