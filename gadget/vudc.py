"""vUDC mode: gadgets of this board exported through the ``usbip-vudc`` UDC.

There is no bind/unbind: a gadget (configfs) bound to ``usbip-vudc.N`` *is*
the exportable device.  Its record is built as libusbip does: the 18-byte
``dev_desc`` of the platform device (ENODEV while no gadget is bound), the
speed from the UDC's ``current_speed``, bus and device numbers 0 (so vhci
attaches it with devid 0) and no interface records.

A vUDC lease owns a gadget, not a binding: :meth:`VudcDriver.release` removes
the gadget only if the lease created it (the supervisor provisions gadgets
with :meth:`VudcDriver.claim_gadget` and :meth:`VudcDriver.provision`).
"""

from __future__ import annotations

import struct
from dataclasses import replace
from typing import TYPE_CHECKING

from usbipx.driver import LocalDevice
from usbipx.errors import (
    DeviceNotFound,
    KernelError,
    ModuleNotLoaded,
    UsbipError,
    ValidationError,
)
from usbipx.hostcommon import ExportingDriver
from usbipx.lease import VUDC, Lease
from usbipx.log import logger
from usbipx.names import VUDC_NAME, is_vudc_busid, validate_busid, vudc_index
from usbipx.usbdevice import Speed, UsbDevice

if TYPE_CHECKING:
    from usbipx.gadget.spec import GadgetSpec

PLATFORM = "/sys/devices/platform"
VUDC_DRIVER = VUDC
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


class VudcDriver(ExportingDriver):
    """The ``usbip-vudc`` driver over a :class:`Sysfs` root."""

    name = VUDC_DRIVER

    def check_loaded(self) -> None:
        if not self.instances() and not self.sysfs.is_dir("/sys/module/usbip_vudc"):
            raise ModuleNotLoaded("usbip-vudc", " (with num=N for N instances)")

    def instances(self) -> list[str]:
        """Names of the vUDC instances (``usbip-vudc.0`` ...), with or without a gadget."""
        names = [n for n in self.sysfs.listdir(PLATFORM) if VUDC_NAME.fullmatch(n)]
        return sorted(names, key=vudc_index)

    def device_dir(self, busid: str) -> str:
        validate_busid(busid)
        if not is_vudc_busid(busid):
            raise ValidationError(
                f"{busid} is a USB bus id, not a vUDC (usbip-vudc.N); drop --device"
            )
        if not self.sysfs.is_dir(f"{PLATFORM}/{busid}"):
            self.check_loaded()
            raise DeviceNotFound(f"no vUDC named {busid}")
        return f"{PLATFORM}/{busid}"

    def not_ready(self, busid: str) -> UsbipError:
        return DeviceNotFound(f"{busid} has no usbip_status")

    def ready(self, busid: str) -> None:
        self.read_device(busid)  # a clear error if no gadget is bound

    def gadget_of(self, busid: str) -> str | None:
        """Name of the gadget bound to the vUDC, or None."""
        from usbipx.gadget.udc import gadget_on_udc

        self.device_dir(busid)
        return gadget_on_udc(busid, self.sysfs)

    def read_device(self, busid: str) -> LocalDevice:
        """The record of the gadget bound to ``busid``; :class:`NoGadget` if none is."""
        devdir = self.device_dir(busid)
        try:
            raw = self.sysfs.read_bytes(f"{devdir}/dev_desc")
        except KernelError as exc:
            raise NoGadget(f"no gadget is bound to {busid}") from exc
        if len(raw) < _DEV_DESC.size:
            raise NoGadget(f"no gadget is bound to {busid} (dev_desc is {len(raw)} bytes)")
        (_len, dtype, _bcd_usb, dclass, dsub, dproto, _mps0, vendor, product, bcd_device,
         _imf, _iprod, _iser, nconf) = _DEV_DESC.unpack(raw[: _DEV_DESC.size])
        if dtype != USB_DT_DEVICE:
            raise UsbipError(f"{busid}: dev_desc is not a device descriptor")
        speed = _SPEEDS.get(self.sysfs.read_optional(f"/sys/class/udc/{busid}/current_speed"),
                            Speed.UNKNOWN)
        record = UsbDevice(
            path=devdir, busid=busid, busnum=0, devnum=0, speed=speed,
            id_vendor=vendor, id_product=product, bcd_device=bcd_device,
            device_class=dclass, device_subclass=dsub, device_protocol=dproto,
            configuration_value=0, num_configurations=nconf, num_interfaces=0,
        )
        gadget = self.gadget_of(busid)
        return LocalDevice(record, (), gadget, self.status_or_none(busid),
                           self._serial(busid, gadget))

    def _serial(self, busid: str, gadget: str | None) -> str | None:
        """The serial number string of configfs gadget ``gadget`` bound to ``busid`` (None
        for a legacy gadget module, or a gadget without one)."""
        from usbipx.gadget.configfs import Configfs
        from usbipx.gadget.spec import is_gadget_name

        if gadget is None or not is_gadget_name(gadget):
            return None
        cf = Configfs(self.sysfs)
        # A legacy gadget module's function name may also be a configfs gadget's name.
        if not cf.exists(gadget) or cf.udc_of(gadget) != busid:
            return None
        return self.sysfs.read_optional(cf.gadget(gadget, "strings", "0x409",
                                                  "serialnumber")) or None

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

    # -- ownership: the gadget, not a driver binding ---------------------------

    def claim(self, busid: str, held: Lease | None = None) -> Lease:
        """A lease on the gadget bound to ``busid``: ours only if ``held`` created it."""
        gadget = self.read_device(busid).driver
        if held is not None and held.busid == busid and held.gadget == gadget:
            return held
        return Lease(VUDC, busid, gadget=gadget)

    def acquire(self, lease: Lease) -> None:
        """Nothing to bind: a gadget bound to the vUDC is the exportable device."""
        if lease.busid is None:
            raise NoGadget(f"gadget {lease.gadget} is not bound to a vUDC")
        self.read_device(lease.busid)

    def claim_gadget(self, name: str, held: Lease | None = None) -> Lease:
        """A lease on gadget ``name`` before it is provisioned: ``created_here``
        if it does not exist yet.  Changes nothing, so it can be recorded first."""
        from usbipx.gadget.configfs import Configfs
        from usbipx.gadget.spec import validate_gadget_name

        validate_gadget_name(name)
        if held is not None and held.gadget == name:
            return held

        return Lease(VUDC, None, gadget=name, created_here=not Configfs(self.sysfs).exists(name))

    def provision(self, lease: Lease, spec: GadgetSpec, udc: str | None) -> Lease:
        """Build or converge the leased gadget from ``spec`` and bind it to ``udc``
        (a vUDC name, or a free one); the lease with the vUDC it got."""
        from usbipx.gadget.spec import UDC_AUTO
        from usbipx.gadget.transaction import apply_spec

        if spec.name != lease.gadget:
            raise ValidationError(f"lease is for gadget {lease.gadget}, not {spec.name}")
        applied = apply_spec(spec, self.sysfs, udc=udc or UDC_AUTO)
        if applied.udc is None or not is_vudc_busid(applied.udc):
            raise UsbipError(f"gadget {spec.name} is not bound to a vUDC")
        return replace(lease, busid=applied.udc)

    def release(self, lease: Lease) -> None:
        """Remove a gadget the lease created (which ends its export); nothing otherwise."""
        if lease.driver != VUDC:
            raise ValidationError(f"not a {VUDC_DRIVER} lease: {lease}")
        if not lease.created_here or lease.gadget is None:
            return
        from usbipx.gadget.configfs import Configfs
        from usbipx.gadget.transaction import remove_gadget

        if Configfs(self.sysfs).exists(lease.gadget):
            remove_gadget(lease.gadget, self.sysfs)
            logger.info("removed gadget {}", lease.gadget)
