"""Stub mode: real USB devices of this host through the ``usbip-host`` driver.

Binding and unbinding follow the kernel tools exactly (as strace of Debian's
``usbip`` shows): bind writes the bus id to the current driver's ``unbind``,
``add <busid>`` to ``usbip-host/match_busid`` and the bus id to
``usbip-host/bind``; unbind writes ``usbip-host/unbind``, ``del <busid>`` to
``match_busid`` and the bus id to ``usbip-host/rebind`` so the original driver
probes the device again.  A failed bind puts the device back on the driver
it had.
"""

from __future__ import annotations

import contextlib
import re

from loguru import logger

from usbipx.driver import ExportStatus, LocalDevice
from usbipx.errors import (
    DeviceBusy,
    DeviceNotFound,
    ModuleNotLoaded,
    UsbipError,
    ValidationError,
    with_context,
)
from usbipx.names import is_usb_busid, is_vudc_busid, validate_busid
from usbipx.protocol import Speed, UsbDevice, UsbInterface
from usbipx.sysfs import Sysfs

USB_DEVICES = "/sys/bus/usb/devices"
USB_DRIVERS = "/sys/bus/usb/drivers"
STUB_DRIVER = "usbip-host"
STUB_DIR = f"{USB_DRIVERS}/{STUB_DRIVER}"
USB_CLASS_HUB = 0x09

# sysfs "speed" (Mb/s) to enum usb_device_speed, as libusbip reads it.
_SPEEDS = {
    "1.5": Speed.LOW,
    "12": Speed.FULL,
    "480": Speed.HIGH,
    "53.3-480": Speed.WIRELESS,
    "5000": Speed.SUPER,
    "10000": Speed.SUPER_PLUS,
    "20000": Speed.SUPER_PLUS,
}


def speed_from_sysfs(text: str) -> Speed:
    """Map the ``speed`` attribute (Mb/s) to :class:`Speed`; UNKNOWN if unrecognised."""
    return _SPEEDS.get(text.strip(), Speed.UNKNOWN)


class HostDriver:
    """The ``usbip-host`` (stub) driver over a :class:`Sysfs` root."""

    name = STUB_DRIVER

    def __init__(self, sysfs: Sysfs | None = None) -> None:
        self.sysfs = sysfs or Sysfs()

    # -- reading -----------------------------------------------------------

    def check_loaded(self) -> None:
        if not self.sysfs.is_dir(STUB_DIR):
            raise ModuleNotLoaded("usbip-host")

    def _dev(self, busid: str, attr: str = "") -> str:
        base = f"{USB_DEVICES}/{busid}"
        return f"{base}/{attr}" if attr else base

    def _checked(self, busid: str) -> str:
        validate_busid(busid)
        if is_vudc_busid(busid):
            raise ValidationError(
                f"{busid} is a vUDC, not a USB device; use --device (vUDC mode)"
            )
        if not self.sysfs.is_dir(self._dev(busid)):
            raise DeviceNotFound(f"no USB device with bus id {busid}")
        return busid

    def read_device(self, busid: str) -> LocalDevice:
        """The device record, interfaces, bound driver and status of ``busid``."""
        self._checked(busid)
        s = self.sysfs
        d = self._dev

        def hex_attr(name: str) -> int:
            return s.read_int(d(busid, name), 16, default=0)

        def dec_attr(name: str) -> int:
            # bConfigurationValue and bNumInterfaces read empty on an
            # unconfigured device (e.g. one just bound to usbip-host).
            return s.read_int(d(busid, name), 10, default=0)

        try:
            record = UsbDevice(
                path=s.realpath(d(busid)),
                busid=busid,
                busnum=dec_attr("busnum"),
                devnum=dec_attr("devnum"),
                speed=speed_from_sysfs(s.read_optional(d(busid, "speed"))),
                id_vendor=hex_attr("idVendor"),
                id_product=hex_attr("idProduct"),
                bcd_device=hex_attr("bcdDevice"),
                device_class=hex_attr("bDeviceClass"),
                device_subclass=hex_attr("bDeviceSubClass"),
                device_protocol=hex_attr("bDeviceProtocol"),
                configuration_value=dec_attr("bConfigurationValue"),
                num_configurations=dec_attr("bNumConfigurations"),
                num_interfaces=dec_attr("bNumInterfaces"),
            )
        except ValidationError as exc:
            raise UsbipError(f"{busid}: unexpected sysfs values: {exc}") from exc
        interfaces = []
        for i in range(record.num_interfaces):
            idir = f"{busid}:{record.configuration_value}.{i}"
            interfaces.append(UsbInterface(
                hex_attr(f"{idir}/bInterfaceClass"),
                hex_attr(f"{idir}/bInterfaceSubClass"),
                hex_attr(f"{idir}/bInterfaceProtocol"),
            ))
        driver = s.readlink_name(d(busid, "driver"))
        status = None
        if driver == STUB_DRIVER:
            status = self._status_or_none(busid)
        return LocalDevice(record, tuple(interfaces), driver, status)

    def _status_or_none(self, busid: str) -> ExportStatus | None:
        try:
            return ExportStatus(self.sysfs.read_int(self._dev(busid, "usbip_status")))
        except (UsbipError, ValueError):
            return None

    def list_devices(self) -> list[LocalDevice]:
        """Every USB device of this host except root hubs, ordered by bus id."""
        out = []
        for name in self.sysfs.listdir(USB_DEVICES):
            if not is_usb_busid(name):
                continue
            try:
                out.append(self.read_device(name))
            except (DeviceNotFound, ValidationError):
                continue  # unplugged while listing, or an id we do not handle
        return sorted(out, key=lambda d: [int(x) for x in re.split(r"[-.]", d.busid)])

    def ready_devices(self) -> list[LocalDevice]:
        """Devices bound to usbip-host (the driver's directory lists them)."""
        out = []
        for name in self.sysfs.listdir(STUB_DIR):
            if not is_usb_busid(name):
                continue
            try:
                dev = self.read_device(name)
            except (DeviceNotFound, ValidationError):
                continue
            if dev.driver == STUB_DRIVER:
                out.append(dev)
        return out

    def get(self, busid: str) -> LocalDevice:
        return self.read_device(busid)

    def status(self, busid: str) -> ExportStatus:
        self._checked(busid)
        st = self._status_or_none(busid)
        if st is None:
            raise DeviceNotFound(f"{busid} is not bound to {STUB_DRIVER}")
        return st

    # -- binding -----------------------------------------------------------

    def bind(self, busid: str) -> str | None:
        """Hand ``busid`` to usbip-host; return the driver it had (to restore later).

        On failure the device is put back on its original driver.
        """
        self._checked(busid)
        self.check_loaded()
        dev = self.read_device(busid)
        if dev.record.device_class == USB_CLASS_HUB:
            raise ValidationError(f"{busid} is a USB hub; hubs cannot be exported")
        if "/vhci_hcd." in dev.record.path:
            raise ValidationError(f"{busid} is imported through vhci_hcd; it cannot be exported")
        if dev.driver == STUB_DRIVER:
            raise DeviceBusy(f"{busid} is already bound to {STUB_DRIVER}")
        original = dev.driver
        s = self.sysfs
        step = "unbind from its driver"
        try:
            if original:
                s.write(f"{USB_DRIVERS}/{original}/unbind", busid)
            step = "add to usbip-host/match_busid"
            s.write(f"{STUB_DIR}/match_busid", f"add {busid}")
            step = "bind to usbip-host"
            s.write(f"{STUB_DIR}/bind", busid)
            if s.readlink_name(self._dev(busid, "driver")) != STUB_DRIVER:
                # The write can succeed while usbip-host's probe declines.
                raise DeviceBusy(f"usbip-host did not take {busid}")
        except UsbipError as exc:
            self._restore(busid, original)
            raise with_context(exc, f"bind {busid}: cannot {step}") from exc
        logger.info("bound {} to {} (was {})", busid, STUB_DRIVER, original or "no driver")
        return original

    def _restore(self, busid: str, original: str | None) -> None:
        """Best-effort undo of a partial bind: back to the original driver."""
        with contextlib.suppress(UsbipError):
            self.sysfs.write(f"{STUB_DIR}/match_busid", f"del {busid}")
        if original and self.sysfs.readlink_name(self._dev(busid, "driver")) != original:
            try:
                self.sysfs.write(f"{USB_DRIVERS}/{original}/bind", busid)
            except UsbipError as exc:
                logger.error("could not give {} back to {}: {}", busid, original, exc)

    def unbind(self, busid: str) -> str | None:
        """Take ``busid`` from usbip-host and let the kernel re-probe its driver.

        Returns the driver the device has afterwards.  Ends any export of it.
        """
        self._checked(busid)
        self.check_loaded()
        driver = self.sysfs.readlink_name(self._dev(busid, "driver"))
        if driver != STUB_DRIVER:
            raise ValidationError(f"{busid} is not bound to {STUB_DRIVER}")
        s = self.sysfs
        s.write(f"{STUB_DIR}/unbind", busid)
        s.write(f"{STUB_DIR}/match_busid", f"del {busid}")
        s.write(f"{STUB_DIR}/rebind", busid)
        now = s.readlink_name(self._dev(busid, "driver"))
        logger.info("unbound {} from {} (now {})", busid, STUB_DRIVER, now or "no driver")
        return now

    # -- export ------------------------------------------------------------

    def handoff(self, busid: str, sockfd: int) -> None:
        """Give the connected socket to usbip-host (``usbip_sockfd``)."""
        st = self.status(busid)
        if st != ExportStatus.AVAILABLE:
            raise DeviceBusy(f"{busid} is {st.name.lower()}, not available for export")
        self.sysfs.write(self._dev(busid, "usbip_sockfd"), str(sockfd))

    def shutdown(self, busid: str) -> None:
        """Make usbip-host drop the connection of an exported device."""
        self._checked(busid)
        self.sysfs.write(self._dev(busid, "usbip_sockfd"), "-1")
