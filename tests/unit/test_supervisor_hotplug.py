"""Kernel uevents through :class:`Hotplug` (a fake pyudev monitor fed by the test) and the
start-up scan: both accept exactly the USB devices that can be exported."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from fakekernel import FakeKernel

from usbipx.daemon.hotplug import Hotplug, present_devices
from usbipx.daemon.supervisor import Device

ROOT_HUB_PATH = "/devices/pci0000:00/0000:00:01.2/usb3"


@dataclass
class FakeUdevDevice:
    """What pyudev's ``Device`` shows of a kernel uevent."""

    action: str
    sys_name: str
    product: str = "403/6001/600"
    subsystem: str = "usb"
    device_type: str = "usb_device"
    devpath: str = ""
    properties: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.properties = {"PRODUCT": self.product,
                           "DEVPATH": self.devpath or f"{ROOT_HUB_PATH}/{self.sys_name}"}


class FakeMonitor:
    """pyudev's ``Monitor`` as Hotplug uses it: events queued by the test."""

    def __init__(self) -> None:
        self.started = False
        self.queue: list[FakeUdevDevice] = []

    def start(self) -> None:
        self.started = True

    def fileno(self) -> int:
        return 42

    def poll(self, timeout: float | None = None) -> FakeUdevDevice | None:
        assert timeout == 0, "the event loop must never block in poll()"
        return self.queue.pop(0) if self.queue else None


def feed(*events: FakeUdevDevice) -> list[tuple[str, Device]]:
    seen: list[tuple[str, Device]] = []
    monitor = FakeMonitor()
    hotplug = Hotplug(lambda action, dev: seen.append((action, dev)), monitor=monitor)
    assert monitor.started and hotplug.fileno() == 42
    monitor.queue.extend(events)
    hotplug.readable()
    assert monitor.queue == []  # every pending event read in one go
    return seen


def test_usb_devices_are_passed_on() -> None:
    assert feed(FakeUdevDevice("add", "1-1"), FakeUdevDevice("remove", "3-1.4.2", "781/5567/100"),
                FakeUdevDevice("bind", "2-1")) == [
        ("add", Device("1-1", 0x0403, 0x6001)),
        ("remove", Device("3-1.4.2", 0x0781, 0x5567)),
        ("bind", Device("2-1", 0x0403, 0x6001)),
    ]


@pytest.mark.parametrize("event", [
    # Root hubs are usb_device too; a job for one would retry for ever.
    pytest.param(FakeUdevDevice("add", "usb3", "1d6b/3/601", devpath=ROOT_HUB_PATH), id="root-hub"),
    pytest.param(FakeUdevDevice("add", "usb12", "1d6b/2/601"), id="root-hub-2"),
    # An interface, even if it claimed to be a device.
    pytest.param(FakeUdevDevice("add", "1-1:1.0"), id="interface-as-device"),
    pytest.param(FakeUdevDevice("add", "1-1:1.0", device_type="usb_interface"), id="interface"),
    pytest.param(FakeUdevDevice("add", "1-1", subsystem="block"), id="other-subsystem"),
    pytest.param(FakeUdevDevice("add", "../1-1"), id="path-as-name"),
    pytest.param(FakeUdevDevice("add", "1-1\n"), id="trailing-newline"),
    pytest.param(FakeUdevDevice("add", "1-1", devpath="/devices/platform/vhci_hcd.0/usb5/5-1"),
                 id="imported-through-vhci"),
    pytest.param(FakeUdevDevice("add", "1-1", "403"), id="product-without-ids"),
    pytest.param(FakeUdevDevice("add", "1-1", "x/6001/600"), id="product-not-hex"),
    pytest.param(FakeUdevDevice("add", "1-1", "10000/6001/600"), id="vendor-over-16-bits"),
])
def test_what_is_not_an_exportable_device_is_left_out(event: FakeUdevDevice) -> None:
    assert feed(event, FakeUdevDevice("add", "1-2")) == [("add", Device("1-2", 0x0403, 0x6001))]


def test_the_start_up_scan_takes_the_same_devices(tmp_path: Any) -> None:
    """The lab-captured tree has root hubs (usb1...) and interfaces (1-1:1.0...) next to
    its devices: only the devices are candidates, exactly as hotplug passes them."""
    kernel = FakeKernel(None, "host_unbound", root=tmp_path)
    names = kernel.sysfs.listdir("/sys/bus/usb/devices")
    assert "usb1" in names and "1-1:1.0" in names
    busids = [d.busid for d in present_devices(kernel.sysfs)]
    assert busids and all(b[0].isdigit() and ":" not in b for b in busids)
    events = [FakeUdevDevice("add", n) for n in names]
    assert sorted(d.busid for _, d in feed(*events)) == sorted(busids)
