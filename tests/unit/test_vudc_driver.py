"""VudcDriver on the fake kernel built from the lab's usbip-vudc snapshot.

usbip-vudc.0 has gadget "v1" bound (vendor 1d6b, product 0104, high speed);
usbip-vudc.1 has none (its dev_desc reads ENODEV).
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from fakekernel import PLATFORM, FakeKernel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usbipx import protocol as p
from usbipx.driver import ExportStatus
from usbipx.drivers import device_driver
from usbipx.errors import (
    DeviceBusy,
    DeviceNotFound,
    KernelError,
    ModuleNotLoaded,
    UsbipError,
    ValidationError,
)
from usbipx.gadget.vudc import NoGadget, VudcDriver
from usbipx.usbdevice import Speed

# Read before pyfakefs hides the real files: the C usbipd -e's DEVLIST reply for this tree.
DEVLIST_VUDC = (Path(__file__).parent.parent / "fixtures" / "golden" / "devlist-reply-vudc.bin"
                ).read_bytes()
V0 = "usbip-vudc.0"
V1 = "usbip-vudc.1"
SOCKFD0 = f"{PLATFORM}/{V0}/usbip_sockfd"

pytestmark = pytest.mark.scenario("vudc")


@pytest.fixture
def vudc(kernel: FakeKernel) -> VudcDriver:
    return VudcDriver(kernel.sysfs)


def test_instances_with_and_without_gadget(vudc: VudcDriver) -> None:
    assert vudc.instances() == [V0, V1]
    vudc.check_loaded()


def test_ready_devices_skips_the_instance_without_gadget(vudc: VudcDriver) -> None:
    assert [d.busid for d in vudc.ready_devices()] == [V0]


def test_record_from_dev_desc(vudc: VudcDriver) -> None:
    d = vudc.get(V0)
    assert d.record == p.UsbDevice(
        path=f"{PLATFORM}/{V0}", busid=V0, busnum=0, devnum=0, speed=Speed.HIGH,
        id_vendor=0x1D6B, id_product=0x0104, bcd_device=0x0100,
        device_class=0, device_subclass=0, device_protocol=0,
        configuration_value=0, num_configurations=1, num_interfaces=0,
    )
    assert d.record.devid == 0  # vhci attaches a vUDC's device with devid 0
    assert d.interfaces == ()
    assert d.driver == "v1"
    assert d.status is ExportStatus.AVAILABLE


def test_record_matches_c_usbipd_devlist(vudc: VudcDriver) -> None:
    """Debian's ``usbipd -e`` on this very tree sent exactly these bytes for DEVLIST."""
    reply = p.DevlistReply(tuple(d.exportable for d in vudc.ready_devices()))
    assert reply.pack() == DEVLIST_VUDC


def test_instance_without_gadget(vudc: VudcDriver) -> None:
    with pytest.raises(NoGadget, match=f"no gadget is bound to {V1}"):
        vudc.get(V1)
    assert issubclass(NoGadget, DeviceNotFound)


def test_gadget_of(vudc: VudcDriver) -> None:
    assert vudc.gadget_of(V0) == "v1"
    assert vudc.gadget_of(V1) is None


def test_speed_unknown_when_udc_says_so(kernel: FakeKernel, vudc: VudcDriver) -> None:
    kernel.set_attr(f"{PLATFORM}/{V0}/udc/{V0}/current_speed", "full-speed\n")
    assert vudc.get(V0).record.speed is Speed.FULL
    kernel.set_attr(f"{PLATFORM}/{V0}/udc/{V0}/current_speed", "UNKNOWN\n")
    assert vudc.get(V0).record.speed is Speed.UNKNOWN


def test_short_or_wrong_dev_desc(kernel: FakeKernel, vudc: VudcDriver) -> None:
    kernel.set_attr(f"{PLATFORM}/{V0}/dev_desc", b"\x12\x01\x00")
    with pytest.raises(NoGadget, match="3 bytes"):
        vudc.get(V0)
    kernel.set_attr(f"{PLATFORM}/{V0}/dev_desc", b"\x12\x02" + bytes(16))
    with pytest.raises(UsbipError, match="not a device descriptor"):
        vudc.get(V0)


def test_unbinding_the_gadget_leaves_nothing_ready(kernel: FakeKernel, vudc: VudcDriver) -> None:
    kernel.vudc_unbind_gadget(V0)
    assert vudc.ready_devices() == []
    assert vudc.gadget_of(V0) is None
    with pytest.raises(NoGadget):
        vudc.handoff(V0, 5)
    assert kernel.writes == []


def test_status(vudc: VudcDriver) -> None:
    assert vudc.status(V0) is ExportStatus.AVAILABLE
    assert vudc.status(V1) is ExportStatus.AVAILABLE  # the kernel shows 1 without gadget too


# -- handoff ------------------------------------------------------------------

def test_handoff_writes_the_socket_fd(kernel: FakeKernel, vudc: VudcDriver) -> None:
    vudc.handoff(V0, 5)
    assert kernel.writes == [(SOCKFD0, "5")]
    assert vudc.status(V0) is ExportStatus.USED
    assert vudc.get(V0).status is ExportStatus.USED


def test_handoff_when_exported_is_busy(kernel: FakeKernel, vudc: VudcDriver) -> None:
    vudc.handoff(V0, 5)
    kernel.clear_log()
    with pytest.raises(DeviceBusy, match="used"):
        vudc.handoff(V0, 6)
    assert kernel.writes == []


def test_handoff_without_gadget_writes_nothing(kernel: FakeKernel, vudc: VudcDriver) -> None:
    with pytest.raises(NoGadget):
        vudc.handoff(V1, 5)
    assert kernel.writes == []


def test_handoff_of_a_bad_socket_is_the_kernels_einval(kernel: FakeKernel,
                                                       vudc: VudcDriver) -> None:
    kernel.bad_sockfds.add(5)
    with pytest.raises(KernelError) as exc:
        vudc.handoff(V0, 5)
    assert exc.value.errno == errno.EINVAL
    assert vudc.status(V0) is ExportStatus.AVAILABLE


def test_shutdown(kernel: FakeKernel, vudc: VudcDriver) -> None:
    vudc.handoff(V0, 5)
    vudc.shutdown(V0)
    assert kernel.writes == [(SOCKFD0, "5"), (SOCKFD0, "-1")]
    assert vudc.status(V0) is ExportStatus.AVAILABLE


def test_shutdown_not_connected_is_the_kernels_einval(vudc: VudcDriver) -> None:
    with pytest.raises(KernelError) as exc:
        vudc.shutdown(V0)
    assert exc.value.errno == errno.EINVAL


def test_shutdown_without_gadget_is_the_kernels_enodev(vudc: VudcDriver) -> None:
    with pytest.raises(KernelError) as exc:
        vudc.shutdown(V1)
    assert exc.value.errno == errno.ENODEV


def test_kernel_answers_like_the_lab_kernel(kernel: FakeKernel) -> None:
    s = kernel.sysfs

    def answer(name: str, value: str) -> int | None:
        try:
            s.write(f"{PLATFORM}/{name}/usbip_sockfd", value)
        except KernelError as exc:
            return exc.errno
        return None

    with pytest.raises(KernelError) as exc:
        s.read_bytes(f"{PLATFORM}/{V1}/dev_desc")
    assert exc.value.errno == errno.ENODEV
    assert answer(V1, "-1") == errno.ENODEV
    assert answer(V1, "7") == errno.ENODEV
    assert answer(V0, "-1") == errno.EINVAL
    assert answer(V0, "abc") == errno.EINVAL
    assert answer(V0, "16") is None
    assert kernel.read(f"{PLATFORM}/{V0}/usbip_status") == "2\n"
    assert answer(V0, "16") == errno.EBUSY
    assert answer(V0, "-1") is None
    assert kernel.read(f"{PLATFORM}/{V0}/usbip_status") == "1\n"


# -- names ----------------------------------------------------------------------

@pytest.mark.parametrize("busid", ["1-1", "2-1", "3-1.4"])
def test_usb_busid_is_refused(kernel: FakeKernel, vudc: VudcDriver, busid: str) -> None:
    for op in (vudc.get, vudc.gadget_of, vudc.status, lambda b: vudc.handoff(b, 5),
               vudc.shutdown):
        with pytest.raises(ValidationError, match="drop --device"):
            op(busid)
    assert kernel.writes == []


@pytest.mark.parametrize("busid", ["usbip-vudc", "usbip-vudc.", "usbip-vudc.0/..",
                                   "../usbip-vudc.0", "usbip-vudc.0/dev_desc", "vhci_hcd.0"])
def test_malformed_busid(kernel: FakeKernel, vudc: VudcDriver, busid: str) -> None:
    with pytest.raises(ValidationError, match="bad bus id"):
        vudc.get(busid)
    with pytest.raises(ValidationError):
        vudc.handoff(busid, 5)
    assert kernel.writes == []


def test_missing_instance(kernel: FakeKernel, vudc: VudcDriver) -> None:
    with pytest.raises(DeviceNotFound, match=r"no vUDC named usbip-vudc\.7"):
        vudc.get("usbip-vudc.7")
    with pytest.raises(DeviceNotFound):
        vudc.handoff("usbip-vudc.7", 5)
    assert kernel.writes == []


def test_module_not_loaded(kernel: FakeKernel, vudc: VudcDriver) -> None:
    kernel.unload("usbip-vudc")
    assert vudc.instances() == []
    assert vudc.ready_devices() == []
    with pytest.raises(ModuleNotLoaded, match="usbip-vudc"):
        vudc.check_loaded()
    with pytest.raises(ModuleNotLoaded):
        vudc.get(V0)


def test_device_driver_picks_vudc(kernel: FakeKernel) -> None:
    drv = device_driver(kernel.sysfs, vudc=True)
    assert isinstance(drv, VudcDriver)
    assert drv.name == "usbip-vudc"
    assert [d.busid for d in drv.ready_devices()] == [V0]


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=30), st.from_regex(r"\Ausbip-vudc\.[0-9]{1,6}\Z")))
def test_any_name_is_refused_precisely(kernel: FakeKernel, name: str) -> None:
    vudc = VudcDriver(kernel.sysfs)
    if name == V0:
        return
    with pytest.raises((ValidationError, DeviceNotFound)):
        vudc.get(name)
    with pytest.raises((ValidationError, DeviceNotFound)):
        vudc.handoff(name, 5)
    assert kernel.writes == []
