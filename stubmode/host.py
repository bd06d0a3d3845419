"""Stub mode: real USB devices of this host through the ``usbip-host`` driver.

Binding and unbinding follow the kernel tools exactly (as strace of Debian's
``usbip`` shows): bind writes the bus id to the current driver's ``unbind``,
``add <busid>`` to ``usbip-host/match_busid`` and the bus id to
``usbip-host/bind``; unbind writes ``usbip-host/unbind``, ``del <busid>`` to
``match_busid`` and the bus id to ``usbip-host/rebind`` so the original driver
probes the device again.  A failed bind puts the device back on the driver
it had.

Who binds is recorded in a :class:`~usbipx.lease.Lease`: :meth:`HostDriver.claim`
says whether preparing a device means binding it (and which driver it had),
:meth:`HostDriver.acquire` binds, and :meth:`HostDriver.release` -- the only
code that unbinds -- gives back only a device its lease bound.
"""

from __future__ import annotations

import contextlib
import re

from usbipx.driver import LocalDevice
from usbipx.errors import (
    DeviceBusy,
    DeviceNotFound,
    ModuleNotLoaded,
    UsbipError,
    ValidationError,
    with_context,
)
from usbipx.hostcommon import ExportingDriver
from usbipx.lease import STUB, Lease
from usbipx.log import logger
from usbipx.names import is_usb_busid, is_vudc_busid, validate_busid
from usbipx.usbdevice import Speed, UsbDevice, UsbInterface

USB_DEVICES = "/sys/bus/usb/devices"
USB_DRIVERS = "/sys/bus/usb/drivers"
STUB_DRIVER = STUB
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


class HostDriver(ExportingDriver):
    """The ``usbip-host`` (stub) driver over a :class:`Sysfs` root."""

    name = STUB_DRIVER

    # -- reading -----------------------------------------------------------

    def check_loaded(self) -> None:
        if not self.sysfs.is_dir(STUB_DIR):
            raise ModuleNotLoaded("usbip-host")

    def _dev(self, busid: str, attr: str = "") -> str:
        base = f"{USB_DEVICES}/{busid}"
        return f"{base}/{attr}" if attr else base

    def device_dir(self, busid: str) -> str:
        validate_busid(busid)
        if is_vudc_busid(busid):
            raise ValidationError(
                f"{busid} is a vUDC, not a USB device; use --device (vUDC mode)"
            )
        if not self.sysfs.is_dir(self._dev(busid)):
            raise DeviceNotFound(f"no USB device with bus id {busid}")
        return self._dev(busid)

    def not_ready(self, busid: str) -> UsbipError:
        return DeviceNotFound(f"{busid} is not bound to {STUB_DRIVER}")

    def driver_of(self, busid: str) -> str | None:
        """The kernel driver bound to ``busid`` now, or None."""
        return self.sysfs.readlink_name(self._dev(busid, "driver"))

    def read_device(self, busid: str) -> LocalDevice:
        """The device record, interfaces, bound driver and status of ``busid``."""
        self.device_dir(busid)
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
        driver = self.driver_of(busid)
        status = self.status_or_none(busid) if driver == STUB_DRIVER else None
        return LocalDevice(record, tuple(interfaces), driver, status, self.serial(busid))

    def serial(self, busid: str) -> str | None:
        """The serial number string of ``busid`` (sysfs ``serial``), None if it has none."""
        validate_busid(busid)
        return self.sysfs.read_optional(self._dev(busid, "serial")) or None

    def ids(self, busid: str) -> tuple[int, int] | None:
        """idVendor and idProduct of ``busid``, or None if it has not enumerated."""
        try:
            base = self.device_dir(busid)
            return (self.sysfs.read_int(f"{base}/idVendor", 16),
                    self.sysfs.read_int(f"{base}/idProduct", 16))
        except UsbipError:
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

    # -- ownership -----------------------------------------------------------

    def claim(self, busid: str, held: Lease | None = None) -> Lease:
        """A lease on ``busid``: ``bound_here`` unless it is on usbip-host already.

        A ``held`` lease that bound the device stays the lease, whether or
        not the device is still on usbip-host (someone may have unbound it:
        :meth:`acquire` binds it again).  A device on usbip-host that no
        lease of ours bound belongs to whoever bound it.
        """
        dev = self.read_device(busid)
        if held is not None and held.busid == busid and held.bound_here:
            return held
        if dev.driver == STUB_DRIVER:
            return Lease(STUB, busid)
        if dev.record.device_class == USB_CLASS_HUB:
            raise ValidationError(f"{busid} is a USB hub; hubs cannot be exported")
        if "/vhci_hcd." in dev.record.path:
            raise ValidationError(f"{busid} is imported through vhci_hcd; it cannot be exported")
        return Lease(STUB, busid, bound_here=True, original_driver=dev.driver)

    def acquire(self, lease: Lease) -> None:
        """Bind the leased device to usbip-host if the lease says we do and it is not yet.

        On failure the device is put back on the driver it had.
        """
        busid = self._leased(lease)
        self.check_loaded()
        current = self.driver_of(busid)
        if current == STUB_DRIVER:
            return
        if not lease.bound_here:
            raise DeviceBusy(f"{busid} is no longer bound to {STUB_DRIVER}")
        s = self.sysfs
        step = "unbind from its driver"
        try:
            if current:
                s.write(f"{USB_DRIVERS}/{current}/unbind", busid)
            step = "add to usbip-host/match_busid"
            s.write(f"{STUB_DIR}/match_busid", f"add {busid}")
            step = "bind to usbip-host"
            s.write(f"{STUB_DIR}/bind", busid)
            if self.driver_of(busid) != STUB_DRIVER:
                # The write can succeed while usbip-host's probe declines.
                raise DeviceBusy(f"usbip-host did not take {busid}")
        except UsbipError as exc:
            self._restore(busid, current)
            raise with_context(exc, f"bind {busid}: cannot {step}") from exc
        logger.info("bound {} to {} (was {})", busid, STUB_DRIVER, current or "no driver")

    def release(self, lease: Lease) -> None:
        """Give a device this lease bound back to its driver; nothing otherwise.

        The kernel re-probes the device (``rebind``), so its original driver
        takes it back.  An unplugged device has nothing to give back.
        """
        busid = self._leased(lease)
        if not lease.bound_here or not self.present(busid):
            return
        self.check_loaded()
        current = self.driver_of(busid)
        if current != STUB_DRIVER:
            # A bind that stopped half way: forget the match, give it back.
            self._restore(busid, lease.original_driver)
            return
        s = self.sysfs
        s.write(f"{STUB_DIR}/unbind", busid)
        s.write(f"{STUB_DIR}/match_busid", f"del {busid}")
        s.write(f"{STUB_DIR}/rebind", busid)
        now = self.driver_of(busid)
        logger.info("unbound {} from {} (now {})", busid, STUB_DRIVER, now or "no driver")
        if lease.original_driver and now != lease.original_driver:
            logger.warning("{} went to {} rather than back to {}", busid, now or "no driver",
                           lease.original_driver)

    def _leased(self, lease: Lease) -> str:
        if lease.driver != STUB or lease.busid is None:
            raise ValidationError(f"not a {STUB_DRIVER} lease: {lease}")
        return lease.busid

    def _restore(self, busid: str, original: str | None) -> None:
        """Best-effort undo of a partial bind: back to the original driver."""
        with contextlib.suppress(UsbipError):
            self.sysfs.write(f"{STUB_DIR}/match_busid", f"del {busid}")
        if original and self.driver_of(busid) != original:
            try:
                self.sysfs.write(f"{USB_DRIVERS}/{original}/bind", busid)
            except UsbipError as exc:
                logger.error("could not give {} back to {}: {}", busid, original, exc)

    # -- the bind and unbind commands -----------------------------------------

    def bind(self, busid: str) -> Lease:
        """Hand ``busid`` to usbip-host (``usbipx bind``); the lease says what it had."""
        lease = self.claim(busid)
        if not lease.bound_here:
            raise DeviceBusy(f"{busid} is already bound to {STUB_DRIVER}")
        self.acquire(lease)
        return lease

    def unbind(self, busid: str) -> str | None:
        """Give ``busid`` back from usbip-host whoever bound it (``usbipx unbind``).

        Ends any export of it.  Returns the driver the device has afterwards.
        """
        self.device_dir(busid)
        self.check_loaded()
        if self.driver_of(busid) != STUB_DRIVER:
            raise ValidationError(f"{busid} is not bound to {STUB_DRIVER}")
        # Asked by the user: release it as if we had bound it.
        self.release(Lease(STUB, busid, bound_here=True))
        return self.driver_of(busid)
