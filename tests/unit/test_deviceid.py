"""Devices by identity (``--id VID:PID[:SERIAL]``): parsing, matching, and the commands.

The host_unbound snapshot has two identical devices, 1-1 and 2-1, both
1d6b:0104 with serial ``0001``; tests give 2-1 another serial where they
need two that differ.  In vUDC mode the serial is the configfs gadget's
``strings/0x409/serialnumber``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fakekernel import PLATFORM, STUB_DIR, VHCI0, FakeKernel
from loguru import logger
from loopback import HOST, LoopbackServer
from typer.testing import CliRunner, Result

from usbipx import usbids  # imported before pyfakefs starts: it patches the module's os
from usbipx.cli.app import app
from usbipx.cli.common import State
from usbipx.daemon.usbipa import UsbipaHandler
from usbipx.daemon.usbipd import UsbipdHandler
from usbipx.deviceid import (
    MAX_SERIAL,
    AmbiguousDevice,
    DeviceId,
    busid_for,
    is_serial,
    parse_device_id,
    select_device,
    select_remote,
    shown_serial,
)
from usbipx.driver import LocalDevice
from usbipx.errors import DeviceNotFound, ValidationError
from usbipx.protocol import Speed, UsbDevice
from usbipx.stubmode.host import HostDriver
from usbipx.vhci import VhciDriver

GADGETS = "/sys/kernel/config/usb_gadget"
SERIAL_2_1 = "/sys/devices/platform/dummy_hcd.1/usb2/2-1/serial"


# -- parsing -----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "want"), [
    ("1d6b:0104", DeviceId(0x1D6B, 0x0104)),
    ("1D6B:0104", DeviceId(0x1D6B, 0x0104)),
    ("0000:ffff", DeviceId(0, 0xFFFF)),
    ("1d6b:0104:ABC123", DeviceId(0x1D6B, 0x0104, "ABC123")),
    ("1d6b:0104:a:b-c_d.e", DeviceId(0x1D6B, 0x0104, "a:b-c_d.e")),  # colons in a serial
    ("1d6b:0104:" + "x" * MAX_SERIAL, DeviceId(0x1D6B, 0x0104, "x" * MAX_SERIAL)),
    ("1d6b:0104:Zähler", DeviceId(0x1D6B, 0x0104, "Zähler")),
])
def test_parse_good_ids(text: str, want: DeviceId) -> None:
    assert parse_device_id(text) == want
    assert str(parse_device_id(text)).lower() == text.lower()


@pytest.mark.parametrize(("text", "what"), [
    ("", "bad device id"),
    ("1d6b", "bad device id"),
    ("1d6b:104", "bad device id"),
    ("1d6b:01045", "bad device id"),
    ("1d6b-0104", "bad device id"),
    ("xd6b:0104", "bad device id"),
    ("\uff11d6b:0104", "bad device id"),  # a full-width digit is no hex digit
    ("1d6b:0104\n", "bad device id"),
    ("1d6b:0104:", "bad serial number"),
    ("1d6b:0104:a b", "bad serial number"),
    ("1d6b:0104:ab\n", "bad serial number"),
    ("1d6b:0104:a\x00b", "bad serial number"),
    ("1d6b:0104:../../x/y z", "bad serial number"),
    ("1d6b:0104:" + "x" * (MAX_SERIAL + 1), "bad serial number"),
])
def test_parse_bad_ids(text: str, what: str) -> None:
    with pytest.raises(ValidationError, match=what) as exc:
        parse_device_id(text)
    assert "\n" not in str(exc.value).replace("\\n", "")  # one line, the input escaped


def test_is_serial_and_shown_serial() -> None:
    assert is_serial("0001") and is_serial("A-1:2")
    assert not is_serial("") and not is_serial("a b") and not is_serial("a\tb")
    assert not is_serial("x" * (MAX_SERIAL + 1))
    assert shown_serial(None) == "-"
    assert shown_serial("ok") == "ok"
    assert shown_serial("a\x1bb\n") == "a\\x1bb\\n"


# -- matching ----------------------------------------------------------------------------

def dev(busid: str, vendor: int = 0x1D6B, product: int = 0x0104,
        serial: str | None = None) -> LocalDevice:
    record = UsbDevice(path=f"/sys/x/{busid}", busid=busid, busnum=1, devnum=2,
                       speed=Speed.HIGH, id_vendor=vendor, id_product=product, bcd_device=0x100)
    return LocalDevice(record, serial=serial)


DEVICES = [dev("1-1", serial="A1"), dev("2-1", serial="B2"), dev("3-1", 0x0403, 0x6001),
           dev("4-1", serial=None)]


def test_match_one_by_serial() -> None:
    assert select_device(parse_device_id("1d6b:0104:B2"), DEVICES).busid == "2-1"
    assert select_device(parse_device_id("0403:6001"), DEVICES).busid == "3-1"


def test_match_none() -> None:
    with pytest.raises(DeviceNotFound, match=r"^no device matches --id 1234:5678$"):
        select_device(parse_device_id("1234:5678"), DEVICES)


def test_match_none_with_a_serial_lists_the_devices_of_that_product() -> None:
    with pytest.raises(DeviceNotFound) as exc:
        select_device(parse_device_id("1d6b:0104:C3"), DEVICES)
    assert str(exc.value) == ("no device matches --id 1d6b:0104:C3 (devices 1d6b:0104 here: "
                              "1-1 (serial A1), 2-1 (serial B2), 4-1 (serial -))")


def test_match_several_is_an_error_listing_the_candidates() -> None:
    with pytest.raises(AmbiguousDevice) as exc:
        select_device(parse_device_id("1d6b:0104"), DEVICES)
    assert str(exc.value) == (
        "--id 1d6b:0104 matches 3 devices: 1-1 (serial A1), 2-1 (serial B2), 4-1 (serial -); "
        "name one by serial (1d6b:0104:SERIAL) or by bus id (-b)")
    assert isinstance(exc.value, ValidationError)


def test_two_devices_with_the_same_serial_stay_ambiguous() -> None:
    with pytest.raises(AmbiguousDevice, match="matches 2 devices"):
        select_device(parse_device_id("1d6b:0104:A1"), [dev("1-1", serial="A1"),
                                                         dev("1-2", serial="A1")])


def test_select_remote() -> None:
    offered = [("1-1", 0x1D6B, 0x0104), ("1-2", 0x0403, 0x6001), ("1-3", 0x1D6B, 0x0104)]
    assert select_remote(parse_device_id("0403:6001"), offered) == "1-2"
    with pytest.raises(DeviceNotFound, match="the usbipd offers no device 1234:5678"):
        select_remote(parse_device_id("1234:5678"), offered)
    with pytest.raises(AmbiguousDevice, match="matches 2 devices of the usbipd: 1-1, 1-3"):
        select_remote(parse_device_id("1d6b:0104"), offered)
    with pytest.raises(ValidationError, match="carries no serial numbers"):
        select_remote(parse_device_id("0403:6001:X"), offered)


@pytest.mark.scenario("host_unbound", "vhci_attached")
def test_busid_for_leaves_out_imported_devices(kernel: FakeKernel, fs: Any) -> None:
    """3-1 is imported through vhci_hcd with the ids (and serial) of the device it
    mirrors: never a candidate, or --id would always be ambiguous on a host that is both
    sides."""
    fs.create_symlink("/sys/bus/usb/devices/3-1", "/sys/devices/platform/vhci_hcd.0/usb3/3-1")
    assert HostDriver(kernel.sysfs).get("3-1").serial == "0001"
    kernel.set_attr(SERIAL_2_1, "0002\n")
    assert busid_for(kernel.sysfs, None, "1d6b:0104:0001") == "1-1"
    assert busid_for(kernel.sysfs, "2-1", None) == "2-1"
    for busid, dev_id in [(None, None), ("1-1", "1d6b:0104")]:
        with pytest.raises(ValidationError, match=r"give exactly one of --busid BUSID or "
                                                  r"--id VID:PID\[:SERIAL\]"):
            busid_for(kernel.sysfs, busid, dev_id)


# -- the commands ------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def quiet_daemons() -> Iterator[None]:
    logger.disable("usbipx.daemon")
    yield
    logger.enable("usbipx.daemon")


@pytest.fixture(autouse=True)
def no_usb_ids(fs: Any) -> Iterator[None]:
    """usb.ids lookups are cached per path: start and end with empty caches."""
    usbids._load.cache_clear()
    usbids._load_classes.cache_clear()
    yield
    usbids._load.cache_clear()
    usbids._load_classes.cache_clear()


def run(kernel: FakeKernel, *args: str) -> Result:
    return CliRunner().invoke(app, list(args), obj=State(sysfs=kernel.sysfs))


def ok(res: Result) -> str:
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    return res.stdout


def error(res: Result, code: int) -> str:
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("usbipx: error: "), res.stderr
    return lines[0].removeprefix("usbipx: error: ")


@pytest.mark.scenario("host_unbound")
def test_bind_and_unbind_by_id(kernel: FakeKernel) -> None:
    kernel.set_attr(SERIAL_2_1, "0002\n")
    assert ok(run(kernel, "bind", "--id", "1d6b:0104:0002")) == \
        "bind device on busid 2-1: complete\n"
    assert kernel.writes[-1] == (f"{STUB_DIR}/bind", "2-1")
    assert kernel.driver_of("1-1") == "usb"
    assert json.loads(ok(run(kernel, "--json", "unbind", "--id", "1d6b:0104:0002"))) == {
        "busid": "2-1", "driver": "usb"}


@pytest.mark.scenario("host_unbound")
def test_bind_by_an_ambiguous_or_unknown_id_changes_nothing(kernel: FakeKernel) -> None:
    assert error(run(kernel, "bind", "--id", "1d6b:0104"), 2) == (
        "--id 1d6b:0104 matches 2 devices: 1-1 (serial 0001), 2-1 (serial 0001); "
        "name one by serial (1d6b:0104:SERIAL) or by bus id (-b)")
    assert error(run(kernel, "bind", "--id", "1d6b:0104:0009"), 1) == (
        "no device matches --id 1d6b:0104:0009 (devices 1d6b:0104 here: 1-1 (serial 0001), "
        "2-1 (serial 0001))")
    assert error(run(kernel, "bind", "--id", "1d6b"), 2).startswith("bad device id '1d6b'")
    assert error(run(kernel, "bind"), 2) == \
        "give exactly one of --busid BUSID or --id VID:PID[:SERIAL]"
    assert error(run(kernel, "unbind", "-b", "1-1", "--id", "1d6b:0104"), 2) == \
        "give exactly one of --busid BUSID or --id VID:PID[:SERIAL]"
    assert kernel.writes == []


@pytest.fixture
def usbipa(kernel: FakeKernel) -> Iterator[LoopbackServer]:
    with LoopbackServer(UsbipaHandler(VhciDriver(kernel.sysfs)), "usbipa") as srv:
        yield srv


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_connect_and_disconnect_by_id(kernel: FakeKernel, usbipa: LoopbackServer) -> None:
    kernel.set_attr(SERIAL_2_1, "0002\n")
    t = str(usbipa.port)
    assert ok(run(kernel, "-t", t, "connect", "-r", HOST, "--id", "1d6b:0104:0002")) == \
        f"exported 2-1 to 127.0.0.1:{t}\n"
    assert kernel.stub_status["2-1"] == 2
    assert kernel.driver_of("1-1") == "usb"
    assert ok(run(kernel, "-t", t, "disconnect", "-r", HOST, "--id", "1d6b:0104:0002")) == \
        "unexported 2-1 from 127.0.0.1\n"
    assert kernel.driver_of("2-1") == "usb"


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_connect_by_an_ambiguous_id_connects_nowhere(kernel: FakeKernel,
                                                     usbipa: LoopbackServer) -> None:
    reason = error(run(kernel, "-t", str(usbipa.port), "connect", "-r", HOST, "--id",
                       "1d6b:0104"), 2)
    assert reason.startswith("--id 1d6b:0104 matches 2 devices: 1-1 (serial 0001), 2-1")
    assert kernel.writes == []


def bind_gadget(kernel: FakeKernel, fs: Any, udc: str, gadget: str, serial: str | None) -> None:
    """Make ``gadget`` (ids 1d6b:0104, as v1's) bound to vUDC ``udc`` with ``serial``."""
    v = f"{PLATFORM}/{udc}"
    if udc != "usbip-vudc.0":
        kernel.read_errors.pop(f"{v}/dev_desc", None)
        kernel.set_attr(f"{v}/dev_desc",
                        kernel.sysfs.read_bytes(f"{PLATFORM}/usbip-vudc.0/dev_desc"))
        kernel.set_attr(f"{v}/udc/{udc}/function", f"{gadget}\n")
        kernel.set_attr(f"{v}/udc/{udc}/current_speed", "high-speed\n")
        kernel.vudc[udc].gadget = True
    fs.create_file(f"{GADGETS}/{gadget}/UDC", contents=f"{udc}\n")
    if serial is not None:
        fs.create_file(f"{GADGETS}/{gadget}/strings/0x409/serialnumber", contents=f"{serial}\n")


@pytest.mark.scenario("vudc", "vhci_free")
def test_vudc_serial_is_the_gadgets_serialnumber(kernel: FakeKernel, fs: Any) -> None:
    from usbipx.gadget.vudc import VudcDriver

    assert VudcDriver(kernel.sysfs).get("usbip-vudc.0").serial is None  # no configfs here
    bind_gadget(kernel, fs, "usbip-vudc.0", "v1", "SER-A")
    assert VudcDriver(kernel.sysfs).get("usbip-vudc.0").serial == "SER-A"
    rows = json.loads(ok(run(kernel, "list", "-d", "--json")))
    assert rows[0]["device"]["serial"] == "SER-A"


@pytest.mark.scenario("vudc", "vhci_free")
def test_vudc_serial_of_a_gadget_bound_elsewhere_is_not_taken(kernel: FakeKernel,
                                                              fs: Any) -> None:
    """The UDC's ``function`` names a legacy gadget driver that happens to share a
    configfs gadget's name; that gadget is bound to no UDC: not its serial."""
    fs.create_file(f"{GADGETS}/v1/UDC", contents="\n")
    fs.create_file(f"{GADGETS}/v1/strings/0x409/serialnumber", contents="NOT-IT\n")
    from usbipx.gadget.vudc import VudcDriver

    assert VudcDriver(kernel.sysfs).get("usbip-vudc.0").serial is None


@pytest.mark.scenario("vudc", "vhci_free")
def test_connect_vudc_by_id(kernel: FakeKernel, fs: Any, usbipa: LoopbackServer) -> None:
    bind_gadget(kernel, fs, "usbip-vudc.0", "v1", "SER-A")
    bind_gadget(kernel, fs, "usbip-vudc.1", "v2", "SER-B")
    t = str(usbipa.port)
    reason = error(run(kernel, "-t", t, "connect", "-d", "-r", HOST, "--id", "1d6b:0104"), 2)
    assert reason == ("--id 1d6b:0104 matches 2 devices: usbip-vudc.0 (serial SER-A), "
                      "usbip-vudc.1 (serial SER-B); name one by serial (1d6b:0104:SERIAL) "
                      "or by bus id (-b)")
    assert kernel.writes == []
    assert ok(run(kernel, "-t", t, "connect", "-d", "-r", HOST, "--id", "1d6b:0104:SER-B")) \
        == f"exported usbip-vudc.1 to 127.0.0.1:{t}\n"
    assert kernel.read(f"{PLATFORM}/usbip-vudc.1/usbip_status") == "2\n"
    assert kernel.read(f"{PLATFORM}/usbip-vudc.0/usbip_status") == "1\n"
    ok(run(kernel, "-t", t, "disconnect", "-d", "-r", HOST, "--id", "1d6b:0104:SER-B"))
    assert kernel.writes[-1] == (f"{VHCI0}/detach", "0")


@pytest.fixture
def usbipd(kernel: FakeKernel) -> Iterator[LoopbackServer]:
    with LoopbackServer(UsbipdHandler(HostDriver(kernel.sysfs)), "usbipd") as srv:
        yield srv


@pytest.mark.scenario("host_bound", "vhci_free")
def test_attach_by_id(kernel: FakeKernel, usbipd: LoopbackServer) -> None:
    t = str(usbipd.port)
    assert ok(run(kernel, "-t", t, "attach", "-r", HOST, "--id", "1d6b:0104")) == \
        "attached 1-1 from 127.0.0.1 to port 0\n"
    # Exported now, so no longer offered: nothing matches.
    assert error(run(kernel, "-t", t, "attach", "-r", HOST, "--id", "1d6b:0104"), 1) == \
        "the usbipd offers no device 1d6b:0104"


@pytest.mark.scenario("host_bound", "vhci_free")
def test_attach_by_id_with_a_serial_is_refused_before_asking(kernel: FakeKernel) -> None:
    # Port 1 on loopback: nothing listens; the error is about the serial, not the peer.
    assert error(run(kernel, "-t", "1", "attach", "-r", HOST, "--id", "1d6b:0104:0001"),
                 2).startswith("a usbipd's device list carries no serial numbers")
    assert kernel.writes == []
