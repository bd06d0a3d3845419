"""vUDC mode: gadgets of this board exported through the ``usbip-vudc`` UDC.

There is no bind/unbind: a gadget (configfs) bound to ``usbip-vudc.N`` *is*
the exportable device.  Its record is built as libusbip does: the 18-byte
``dev_desc`` of the platform device (ENODEV while no gadget is bound), the
speed from the UDC's ``current_speed``, bus and device numbers 0 (so vhci
attaches it with devid 0) and no interface records.
"""

from __future__ import annotations

import struct

from usbipx.driver import ExportStatus, LocalDevice
from usbipx.errors import (
    DeviceBusy,
    DeviceNotFound,
    KernelError,
    ModuleNotLoaded,
    UsbipError,
    ValidationError,
)
from usbipx.names import VUDC_NAME, is_vudc_busid, validate_busid, vudc_index
from usbipx.protocol import Speed, UsbDevice
from usbipx.sysfs import Sysfs

PLATFORM = "/sys/devices/platform"
UDC_CLASS = "/sys/class/udc"
VUDC_DRIVER = "usbip-vudc"
_DEV_DESC = struct.Struct("<BBHBBBBHHHBBBB")
USB_DT_DEVICE = 0x01

# The UDC core's names for enum usb_device_speed (usb_speed_string()).
_SPEEDS = {
    "UNKNOWN": Speed.UNKNOWN,
    "low-speed": Speed.LOW,
    "full-speed": Speed.FULL,
    "high-speed": Speed.HIGH,
    "wireless": Speed.WIRELESS,
    "super-speed": Speed.SUPER,
    "super-speed-plus": Speed.SUPER_PLUS,
}


class NoGadget(DeviceNotFound):
    """The vUDC exists but no gadget is bound to it."""


class VudcDriver:
    """The ``usbip-vudc`` driver over a :class:`Sysfs` root."""

    name = VUDC_DRIVER

    def __init__(self, sysfs: Sysfs | None = None) -> None:
        self.sysfs = sysfs or Sysfs()

    def check_loaded(self) -> None:
        if not self.instances() and not self.sysfs.is_dir("/sys/module/usbip_vudc"):
            raise ModuleNotLoaded("usbip-vudc", " (with num=N for N instances)")

    def instances(self) -> list[str]:
        """Names of the vUDC instances (``usbip-vudc.0`` ...), with or without a gadget."""
        names = [n for n in self.sysfs.listdir(PLATFORM) if VUDC_NAME.fullmatch(n)]
        return sorted(names, key=vudc_index)

    def _checked(self, busid: str) -> str:
        validate_busid(busid)
        if not is_vudc_busid(busid):
            raise ValidationError(
                f"{busid} is a USB bus id, not a vUDC (usbip-vudc.N); drop --device"
            )
        if not self.sysfs.is_dir(f"{PLATFORM}/{busid}"):
            self.check_loaded()
            raise DeviceNotFound(f"no vUDC named {busid}")
        return busid

    def gadget_of(self, busid: str) -> str | None:
        """Name of the gadget bound to the vUDC, or None."""
        self._checked(busid)
        name = self.sysfs.read_optional(f"{UDC_CLASS}/{busid}/function")
        return name or None

    def read_device(self, busid: str) -> LocalDevice:
        """The record of the gadget bound to ``busid``; :class:`NoGadget` if none is."""
        self._checked(busid)
        try:
            raw = self.sysfs.read_bytes(f"{PLATFORM}/{busid}/dev_desc")
        except KernelError as exc:
            raise NoGadget(f"no gadget is bound to {busid}") from exc
        if len(raw) < _DEV_DESC.size:
            raise NoGadget(f"no gadget is bound to {busid} (dev_desc is {len(raw)} bytes)")
        (_len, dtype, _bcd_usb, dclass, dsub, dproto, _mps0, vendor, product, bcd_device,
         _imf, _iprod, _iser, nconf) = _DEV_DESC.unpack(raw[: _DEV_DESC.size])
        if dtype != USB_DT_DEVICE:
            raise UsbipError(f"{busid}: dev_desc is not a device descriptor")
        speed = _SPEEDS.get(self.sysfs.read_optional(f"{UDC_CLASS}/{busid}/current_speed"),
                            Speed.UNKNOWN)
        record = UsbDevice(
            path=f"{PLATFORM}/{busid}", busid=busid, busnum=0, devnum=0, speed=speed,
            id_vendor=vendor, id_product=product, bcd_device=bcd_device,
            device_class=dclass, device_subclass=dsub, device_protocol=dproto,
            configuration_value=0, num_configurations=nconf, num_interfaces=0,
        )
        return LocalDevice(record, (), self.gadget_of(busid), self._status_or_none(busid))

    def _status_or_none(self, busid: str) -> ExportStatus | None:
        try:
            return ExportStatus(self.sysfs.read_int(f"{PLATFORM}/{busid}/usbip_status"))
        except (UsbipError, ValueError):
            return None

    def ready_devices(self) -> list[LocalDevice]:
        """vUDC instances with a gadget bound; instances without one are skipped."""
        out = []
        for name in self.instances():
            try:
                out.append(self.read_device(name))
            except DeviceNotFound:
                continue
        return out

    def get(self, busid: str) -> LocalDevice:
        return self.read_device(busid)

    def status(self, busid: str) -> ExportStatus:
        self._checked(busid)
        st = self._status_or_none(busid)
        if st is None:
            raise DeviceNotFound(f"{busid} has no usbip_status")
        return st

    def handoff(self, busid: str, sockfd: int) -> None:
        """Give the connected socket to the vUDC (``usbip_sockfd``)."""
        self.read_device(busid)  # a clear error if no gadget is bound
        st = self.status(busid)
        if st != ExportStatus.AVAILABLE:
            raise DeviceBusy(f"{busid} is {st.name.lower()}, not available for export")
        self.sysfs.write(f"{PLATFORM}/{busid}/usbip_sockfd", str(sockfd))

    def shutdown(self, busid: str) -> None:
        """Make the vUDC drop its connection."""
        self._checked(busid)
        self.sysfs.write(f"{PLATFORM}/{busid}/usbip_sockfd", "-1")
