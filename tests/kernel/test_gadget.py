"""Kernel tier: gadgets built by usbipx.gadget on the lab kernel's configfs.

Gadgets go on dummy_udc.0, so dummy_hcd's host side enumerates them and real
host drivers (usb-storage, cdc_acm, usbhid) talk to the gadget functions.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import json
import os
import select
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import time
import tty
from pathlib import Path

import pytest
from labkit import (
    GADGETS,
    assert_vhci_disk_matches,
    block_devices_under,
    make_disk,
    read_block,
    remove_all_gadgets,
    sh,
    usb_busid_on_udc,
    usbipx,
    vhci_used_ports,
    vudc_status,
    wait_for,
)
from loguru import logger

from usbipx.errors import DeviceBusy
from usbipx.gadget import hid
from usbipx.gadget.dump import dump_spec
from usbipx.gadget.live import list_gadgets, save_gadget
from usbipx.gadget.spec import loads_spec
from usbipx.gadget.transaction import GadgetApplyError, apply_spec, remove_gadget
from usbipx.gadget.udc import gadget_on_udc, list_udcs
from usbipx.sysfs import Sysfs

pytestmark = pytest.mark.kernel

UDC = "dummy_udc.0"
USB_DEVICES = Path("/sys/bus/usb/devices")
USBIPX = str(Path(sys.executable).with_name("usbipx"))

SPEC = """
name = "{name}"
udc = "{udc}"
id_vendor = 0x1d6b
id_product = 0x0104
bcd_device = 0x0100

[strings]
manufacturer = "usbipx lab"
product = "{product}"
serialnumber = "0001"

[[configs]]
number = 1
max_power = 250
configuration = "composite"
functions = ["mass_storage.disk", "acm.tty", "hid.kbd"]

[functions."mass_storage.disk".lun.0]
file = "{disk}"
removable = false

[functions."acm.tty"]

[functions."hid.kbd"]
preset = "{preset}"
"""


def add_function(text: str, name: str, body: str = "") -> str:
    """``text`` with one more function, linked last into c.1."""
    return text.replace('"acm.tty", "hid.kbd"]', f'"acm.tty", "hid.kbd", "{name}"]') + (
        f'\n[functions."{name}"]\n{body}\n')


def spec_text(disk: Path, name: str = "labdemo", udc: str = UDC, product: str = "Composite",
              preset: str = "keyboard") -> str:
    return SPEC.format(name=name, udc=udc, product=product, disk=disk, preset=preset)


@pytest.fixture
def sysfs() -> Sysfs:
    return Sysfs()


@pytest.fixture(autouse=True)
def clean_gadgets(sysfs: Sysfs):
    """Every test starts and ends without gadgets, for the tests after it in this boot."""
    for m in ("cdc_acm", "usbhid", "hid_generic"):
        sh("modprobe", m, check=False)

    def clean() -> None:
        for name in list_gadgets(sysfs):
            try:
                remove_gadget(name, sysfs)
            except Exception:  # leave no residue even if our teardown is broken
                remove_all_gadgets()
        assert os.listdir(GADGETS) == []

    clean()
    yield
    clean()


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "disk.img"
    return path, make_disk(path, 4)


def host_device(udc: str = UDC, timeout: float = 30) -> Path:
    """The host-side USB device of the gadget on a dummy UDC, once it is configured."""
    busid = usb_busid_on_udc(udc)
    dev = USB_DEVICES / busid
    wait_for(lambda: read_attr(dev / "bConfigurationValue") == "1",
             timeout=timeout, what=f"{busid} configured")
    return dev


def read_attr(p: Path) -> str | None:
    """An attribute of a device that may be going away while the host re-enumerates."""
    try:
        return p.read_text().strip()
    except OSError:
        return None


def tree(name: str) -> dict[str, object]:
    """Dirs, links and the values of readable+writable attributes under a gadget."""
    base = Path(GADGETS) / name
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            key = str(p.relative_to(base))
            if p.is_symlink():
                out[key] = ("link", os.path.basename(os.readlink(p)))
            elif p.is_dir():
                out[key] = "dir"
            else:
                mode = p.stat().st_mode
                out[key] = p.read_bytes() if mode & 0o200 and mode & 0o400 else "attr"
    return out


def whole_configfs() -> dict[str, object]:
    return {g: tree(g) for g in sorted(os.listdir(GADGETS))}


def open_raw(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(fd)  # termios: no echo, no line discipline, 8-bit clean
    return fd


def read_exactly(fd: int, n: int, timeout: float = 10) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"read {len(buf)} of {n} bytes")
        if select.select([fd], [], [], left)[0]:
            with contextlib.suppress(BlockingIOError):
                buf += os.read(fd, n - len(buf))
    return buf


# ---------------------------------------------------------------- tests

def test_composite_gadget_works_from_the_host_side(sysfs, disk):
    path, data = disk
    result = apply_spec(loads_spec(spec_text(path)), sysfs)
    assert result.created and result.udc == UDC
    dev = host_device()
    busid = dev.name
    assert (dev / "idVendor").read_text().strip() == "1d6b"
    assert (dev / "product").read_text().strip() == "Composite"
    classes = {i: (USB_DEVICES / f"{busid}:1.{i}" / "bInterfaceClass").read_text().strip()
               for i in range(4)}
    # mass storage, CDC comm + data (acm), HID: in the order of the spec's links
    assert classes == {0: "08", 1: "02", 2: "0a", 3: "03"}
    assert (USB_DEVICES / f"{busid}:1.3" / "bInterfaceProtocol").read_text().strip() == "01"

    # the disk reads back identical to its file
    (sd,) = wait_for(lambda: block_devices_under(f"/{busid}:1.0/"), timeout=30, what="sdX")
    name = Path(sd).name
    wait_for(lambda: int(Path(f"/sys/block/{name}/size").read_text()) > 0, what="disk size")
    assert read_block(sd, len(data)) == data

    # serial: /dev/ttyGS<port_num> on the gadget, /dev/ttyACM* on the host, both ways
    port = Path(GADGETS, "labdemo/functions/acm.tty/port_num").read_text().strip()
    acm = wait_for(lambda: glob.glob(str(USB_DEVICES / f"{busid}:1.1" / "tty" / "ttyACM*")),
                   what="ttyACM")[0]
    host_fd = open_raw(f"/dev/{Path(acm).name}")
    gadget_fd = open_raw(f"/dev/ttyGS{port}")
    try:
        payload = bytes(range(256)) * 4
        os.write(gadget_fd, payload)
        assert read_exactly(host_fd, len(payload)) == payload
        os.write(host_fd, payload[::-1])
        assert read_exactly(gadget_fd, len(payload)) == payload[::-1]
    finally:
        os.close(host_fd)
        os.close(gadget_fd)

    # HID: a report written to /dev/hidg<minor> arrives on the host's hidraw node
    minor = Path(GADGETS, "labdemo/functions/hid.kbd/dev").read_text().strip().split(":")[1]
    hidraw = wait_for(lambda: glob.glob(str(USB_DEVICES / f"{busid}:1.3" / "*" / "hidraw"
                                            / "hidraw*")), what="hidraw")[0]
    raw_fd = os.open(f"/dev/{Path(hidraw).name}", os.O_RDONLY | os.O_NONBLOCK)
    hidg = wait_for(lambda: os.path.exists(f"/dev/hidg{minor}") and f"/dev/hidg{minor}",
                    what="hidg node")
    hidg_fd = os.open(hidg, os.O_RDWR)
    try:
        report = bytes([0x02, 0, 0x04, 0, 0, 0, 0, 0])  # left shift + 'a'
        os.write(hidg_fd, report)
        assert read_exactly(raw_fd, 8) == report
    finally:
        os.close(hidg_fd)
        os.close(raw_fd)


def test_apply_is_idempotent_and_converges_a_changed_spec(sysfs, disk):
    path, _ = disk
    apply_spec(loads_spec(spec_text(path)), sysfs)
    dev = host_device()
    devnum = (dev / "devnum").read_text()
    before = tree("labdemo")

    again = apply_spec(loads_spec(spec_text(path)), sysfs)
    assert not again.changed and again.steps == ()
    assert tree("labdemo") == before
    assert (dev / "devnum").read_text() == devnum  # not re-enumerated

    changed = apply_spec(loads_spec(spec_text(path, product="Mouse", preset="mouse")), sysfs)
    assert changed.changed and changed.steps[0] == f"unbind UDC {UDC}"
    assert changed.steps[-1] == f"bind UDC {UDC}"
    wait_for(lambda: read_attr(dev / "product") == "Mouse", timeout=30, what="re-enumeration")
    host_device()
    hid_if = USB_DEVICES / f"{dev.name}:1.3"
    assert (hid_if / "bInterfaceProtocol").read_text().strip() == "02"  # boot mouse
    assert Path(GADGETS, "labdemo/functions/hid.kbd/report_desc").read_bytes() == (
        hid.MOUSE_REPORT_DESC)
    # and converging to what is there is again a no-op
    assert not apply_spec(loads_spec(spec_text(path, product="Mouse", preset="mouse")),
                          sysfs).changed


def test_save_then_apply_reproduces_the_configfs_tree(sysfs, disk):
    path, _ = disk
    # ecm: the kernel shows the net device's real name (usb0) once bound; save
    # writes the pattern back (usb%d), which gives the same name again.
    text = add_function(spec_text(path), "ecm.net",
                        'host_addr = "02:11:22:33:44:55"\nifname = "usb%d"')
    apply_spec(loads_spec(text), sysfs)
    host_device()
    before = tree("labdemo")
    saved = dump_spec(save_gadget("labdemo", sysfs))
    assert 'preset = "keyboard"' in saved and f'udc = "{UDC}"' in saved
    remove_gadget("labdemo", sysfs)
    assert not os.path.exists(Path(GADGETS, "labdemo"))
    apply_spec(loads_spec(saved), sysfs)
    host_device()
    assert tree("labdemo") == before


def test_a_value_the_kernel_rejects_rolls_back_a_bound_gadget(sysfs, disk):
    path, _ = disk
    apply_spec(loads_spec(spec_text(path)), sysfs)
    host_device()
    before = whole_configfs()
    bad = add_function(spec_text(path, product="Changed", preset="mouse"), "uac2.mic",
                       'c_sync = "sometimes"')
    with pytest.raises(GadgetApplyError) as info:
        apply_spec(loads_spec(bad), sysfs)
    e = info.value
    assert e.step == "write functions/uac2.mic/c_sync" and e.errno == errno.EINVAL
    assert "EINVAL (Invalid argument)" in str(e) and e.rollback_errors == []
    assert gadget_on_udc(UDC, sysfs) == "labdemo"  # bound again
    dev = host_device()
    assert (dev / "product").read_text().strip() == "Composite"
    assert whole_configfs() == before


def test_a_missing_function_module_leaves_configfs_as_before(sysfs, disk):
    path, _ = disk
    apply_spec(loads_spec(spec_text(path, name="keep", udc="usbip-vudc.2")), sysfs)
    before = whole_configfs()
    bad = add_function(spec_text(path), "nosuchfn.x")
    with pytest.raises(GadgetApplyError) as info:
        apply_spec(loads_spec(bad), sysfs)
    assert info.value.step == "mkdir functions/nosuchfn.x"
    assert info.value.errno == errno.ENOENT and "usb_f_nosuchfn" in str(info.value)
    assert whole_configfs() == before


def test_a_busy_udc_is_refused_without_touching_configfs(sysfs, disk):
    path, _ = disk
    apply_spec(loads_spec(spec_text(path)), sysfs)
    host_device()  # enumerated: the UDC core has rewritten bcdUSB and bMaxPacketSize0
    before = whole_configfs()
    with pytest.raises(DeviceBusy, match="held by labdemo"):
        apply_spec(loads_spec(spec_text(path, name="second")), sysfs)
    assert whole_configfs() == before


def test_a_hundred_apply_remove_cycles_leave_no_residue(sysfs, disk):
    path, _ = disk
    spec = loads_spec(spec_text(path, name="cycle", udc="usbip-vudc.1"))
    start = time.monotonic()
    logger.disable("usbipx")  # ~4000 debug lines cost seconds under TCG
    try:
        for _ in range(100):
            assert apply_spec(spec, sysfs).created
            remove_gadget("cycle", sysfs)
    finally:
        logger.enable("usbipx")
    elapsed = time.monotonic() - start
    print(f"100 apply/remove cycles: {elapsed:.1f} s")
    assert os.listdir(GADGETS) == []
    assert {u.name: u.holder for u in list_udcs(sysfs)}["usbip-vudc.1"] is None
    assert glob.glob("/dev/hidg*") == []


def test_vudc_gadget_has_a_device_descriptor(sysfs, disk):
    path, _ = disk
    result = apply_spec(loads_spec(spec_text(path, udc="usbip-vudc.0")), sysfs)
    assert result.udc == "usbip-vudc.0"
    raw = Path("/sys/devices/platform/usbip-vudc.0/dev_desc").read_bytes()
    assert len(raw) == 18 and raw[1] == 0x01  # bDescriptorType DEVICE
    vendor, product, bcd_device = struct.unpack_from("<HHH", raw, 8)
    assert (vendor, product, bcd_device) == (0x1D6B, 0x0104, 0x0100)
    assert raw[17] == 1  # one configuration
    remove_gadget("labdemo", sysfs)
    # "auto" takes a free vUDC first
    assert apply_spec(loads_spec(spec_text(path, udc="auto")), sysfs).udc == "usbip-vudc.0"


def vhci_interface_classes() -> set[int]:
    """bInterfaceClass of every interface of the USB devices on vhci_hcd."""
    out = set()
    for intf in USB_DEVICES.glob("*:*"):
        if "vhci_hcd" in str(intf.resolve()):
            with contextlib.suppress(OSError, ValueError):
                out.add(int((intf / "bInterfaceClass").read_text(), 16))
    return out


def test_composite_gadget_on_vudc_exported_with_connect(tmp_path, disk, daemons):
    """`gadget apply` on usbip-vudc.0, then `connect -d`: the application side gets
    the whole composite device and its disk reads back identical to its file."""
    path, data = disk
    spec = tmp_path / "v.toml"
    spec.write_text(spec_text(path, name="vexport", udc="usbip-vudc.0"))
    a = daemons("usbipa")
    assert usbipx("gadget", "apply", str(spec)).stdout.startswith(
        "gadget vexport: created, bound to usbip-vudc.0")
    usbipx("-t", str(a.port), "connect", "-r", "127.0.0.1", "-b", "usbip-vudc.0", "-d")
    assert_vhci_disk_matches(data)
    # mass storage, CDC (ACM control + data) and HID all came across
    assert wait_for(lambda: {0x08, 0x02, 0x0A, 0x03} <= vhci_interface_classes(),
                    what="every interface on the vhci side")
    usbipx("-t", str(a.port), "disconnect", "-r", "127.0.0.1", "-b", "usbip-vudc.0", "-d")
    assert vhci_used_ports() == []
    wait_for(lambda: vudc_status("usbip-vudc.0") == "1", what="the vUDC to be available again")
    usbipx("gadget", "remove", "vexport")
    assert list_gadgets(Sysfs()) == []


def test_cli_end_to_end(tmp_path, disk):
    path, _ = disk
    spec = tmp_path / "g.toml"
    spec.write_text(spec_text(path, name="cli", udc="dummy_udc.1"))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([USBIPX, *args], capture_output=True, text=True, timeout=120)

    def cli_json(*args: str) -> object:
        r = cli(*args)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    r = cli("gadget", "apply", str(spec))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("gadget cli: created, bound to dummy_udc.1")
    assert cli("gadget", "apply", str(spec)).stdout == "gadget cli: unchanged, bound to dummy_udc.1\n"
    (g,) = cli_json("gadget", "list", "--json")
    assert g["udc"] == "dummy_udc.1" and g["configs"] == {
        "c.1": ["mass_storage.disk", "acm.tty", "hid.kbd"]}
    udcs = cli_json("--json", "gadget", "udc")
    assert {u["name"]: u["holder"] for u in udcs}["dummy_udc.1"] == "cli"
    assert len(udcs) == 16
    saved = tmp_path / "saved.toml"
    assert cli("gadget", "save", "cli", "-o", str(saved)).returncode == 0
    assert loads_spec(saved.read_text()).udc == "dummy_udc.1"
    assert cli("gadget", "remove", "cli").returncode == 0
    assert list_gadgets(Sysfs()) == []
    bad = tmp_path / "bad.toml"
    bad.write_text(add_function(spec_text(path, name="cli2", udc="dummy_udc.2"), "nosuchfn.x"))
    before = whole_configfs()
    r = cli("gadget", "apply", str(bad))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("usbipx: error: gadget cli2: step ") and r.stderr.count("\n") == 1
    assert "ENOENT (No such file or directory)" in r.stderr
    assert whole_configfs() == before


def test_a_path_given_as_gadget_name_is_refused():
    """`gadget remove /tmp/x` used to write /tmp/x/UDC and rmdir under /tmp/x;
    `gadget remove ../x` ended in a traceback."""
    target = Path("/tmp/x")
    shutil.rmtree(target, ignore_errors=True)
    (target / "strings" / "0x409").mkdir(parents=True)
    (target / "UDC").write_text("dummy_udc.0\n")
    before = whole_configfs()

    def stamps() -> list[int]:
        # A write undone, or a directory removed and made again, still moves these.
        return [os.stat(p).st_mtime_ns for p in (target, target / "UDC", target / "strings",
                                                 target / "strings" / "0x409")]

    untouched = stamps()
    try:
        for name in ("/tmp/x", "../x"):
            r = subprocess.run([USBIPX, "gadget", "remove", name], capture_output=True,
                               text=True, timeout=120)
            assert r.returncode != 0 and r.stdout == "", r
            assert r.stderr.startswith("usbipx: error: ") and r.stderr.count("\n") == 1, r.stderr
            assert f"{name!r} is not a gadget name" in r.stderr
            assert (target / "UDC").read_text() == "dummy_udc.0\n"
            assert sorted(os.listdir(target)) == ["UDC", "strings"]
            assert os.listdir(target / "strings") == ["0x409"]
            assert stamps() == untouched
        assert whole_configfs() == before
    finally:
        shutil.rmtree(target, ignore_errors=True)


# ---------------------------------------------------------------- Microsoft OS descriptors

WINDOWS = """
name = "labwin"
udc = "{udc}"
id_vendor = 0x1d6b
id_product = 0x0104

[strings]
product = "RNDIS for Windows"

[os_desc]
b_vendor_code = {code}
qw_sign = "MSFT100"

[[configs]]
number = 1
functions = ["rndis.usb0", "acm.tty"]

[functions."rndis.usb0"]
[functions."rndis.usb0".os_desc.interface.rndis]
compatible_id = "RNDIS"
sub_compatible_id = "5162001"

[functions."acm.tty"]
"""


class CtrlTransfer(ctypes.Structure):
    """struct usbdevfs_ctrltransfer (linux/usbdevice_fs.h), x86_64 layout."""

    _fields_ = [("bRequestType", ctypes.c_uint8), ("bRequest", ctypes.c_uint8),
                ("wValue", ctypes.c_uint16), ("wIndex", ctypes.c_uint16),
                ("wLength", ctypes.c_uint16), ("timeout", ctypes.c_uint32),
                ("data", ctypes.c_void_p)]


# _IOWR('U', 0, struct usbdevfs_ctrltransfer)
USBDEVFS_CONTROL = (3 << 30) | (ctypes.sizeof(CtrlTransfer) << 16) | (ord("U") << 8) | 0


def usbfs_node(dev: Path, tmp: Path) -> str:
    """/dev/bus/usb/BBB/DDD of a host-side device; made from its dev attribute if missing."""
    bus, num = int((dev / "busnum").read_text()), int((dev / "devnum").read_text())
    node = f"/dev/bus/usb/{bus:03d}/{num:03d}"
    if os.path.exists(node):
        return node
    major, minor = map(int, (dev / "dev").read_text().split(":"))
    assert major == 189, major  # usb_device
    made = tmp / f"usb-{bus:03d}-{num:03d}"
    os.mknod(made, 0o600 | stat.S_IFCHR, os.makedev(major, minor))
    return str(made)


def control_in(node: str, request_type: int, request: int, value: int, index: int,
               length: int) -> bytes:
    """A control IN transfer through usbfs; the bytes the device answered."""
    buf = ctypes.create_string_buffer(length)
    ctrl = CtrlTransfer(request_type, request, value, index, length, 5000,
                        ctypes.cast(buf, ctypes.c_void_p))
    fd = os.open(node, os.O_RDWR)
    try:
        n = fcntl.ioctl(fd, USBDEVFS_CONTROL, ctrl)
    finally:
        os.close(fd)
    return buf.raw[:n]


def ms_os_string(node: str) -> bytes:
    # GET_DESCRIPTOR(STRING, 0xEE), language 0: Microsoft's OS string descriptor.
    return control_in(node, 0x80, 0x06, 0x0300 | 0xEE, 0, 0x12)


def test_os_descriptors_reach_the_host(sysfs, tmp_path):
    result = apply_spec(loads_spec(WINDOWS.format(udc=UDC, code="0xcd")), sysfs)
    assert result.udc == UDC
    g = Path(GADGETS, "labwin")
    assert (g / "os_desc/use").read_text() == "1\n"
    assert (g / "os_desc/qw_sign").read_text() == "MSFT100\n"
    assert os.readlink(g / "os_desc/c.1").endswith("/configs/c.1")
    ids = g / "functions/rndis.usb0/os_desc/interface.rndis"
    assert (ids / "compatible_id").read_bytes() == b"RNDIS\0\0\0"
    assert (ids / "sub_compatible_id").read_bytes() == b"5162001\0"

    node = usbfs_node(host_device(), tmp_path)
    desc = ms_os_string(node)
    # bLength, bDescriptorType STRING, qwSignature "MSFT100" in UTF-16LE, bMS_VendorCode, bPad
    assert desc == bytes([0x12, 0x03]) + "MSFT100".encode("utf-16-le") + bytes([0xCD, 0x00])
    # asked with that vendor code: the extended compat id feature descriptor (wIndex 4)
    compat = control_in(node, 0xC0, 0xCD, 0, 4, 0x28)
    length, version, index, count = struct.unpack_from("<IHHB", compat)
    assert (length, version, index, count) == (0x28, 0x0100, 4, 1)
    first, _, cid, sub = struct.unpack_from("<BB8s8s", compat, 16)
    assert (first, cid, sub) == (0, b"RNDIS\0\0\0", b"5162001\0")

    # libcomposite takes os_desc/ when it binds: a new vendor code reaches the host
    # because the plan unbinds, writes and binds again
    changed = apply_spec(loads_spec(WINDOWS.format(udc=UDC, code="0x21")), sysfs)
    assert changed.steps == (f"unbind UDC {UDC}", "write os_desc/b_vendor_code", f"bind UDC {UDC}")
    node = usbfs_node(host_device(), tmp_path)
    assert ms_os_string(node)[-2:] == bytes([0x21, 0x00])
    assert (g / "os_desc/b_vendor_code").read_text() == "0x21\n"

    # saved, removed (os_desc/ unlinked before its config goes) and applied again
    before = tree("labwin")
    saved = dump_spec(save_gadget("labwin", sysfs))
    assert "[os_desc]\nuse = true\nb_vendor_code = 0x21\n" in saved
    remove_gadget("labwin", sysfs)
    assert not g.exists()
    apply_spec(loads_spec(saved), sysfs)
    host_device()
    assert tree("labwin") == before


# ---------------------------------------------------------------- gadgets at boot

UNIT = Path(__file__).resolve().parents[2] / "daemon" / "systemd" / "usbipx-gadget@.service"
BOOT_SPECS = Path("/etc/usbipx/gadgets")  # the lab's root is a tmpfs overlay


def unit_commands(instance: str) -> dict[str, list[list[str]]]:
    """ExecStartPre/ExecStart/ExecStop of usbipx-gadget@<instance>, as argv lists."""
    out: dict[str, list[list[str]]] = {}
    for raw in UNIT.read_text().splitlines():
        key, _, value = raw.partition("=")
        if key in ("ExecStartPre", "ExecStart", "ExecStop"):
            argv = [w.replace("%i", instance) for w in shlex.split(value)]
            if argv[0] == "/usr/local/bin/usbipx":
                argv[0] = USBIPX
            out.setdefault(key, []).append(argv)
    return out


def boot_spec(name: str, udc: str | None) -> str:
    text = f'name = "{name}"\nid_vendor = 0x1d6b\nid_product = 0x0104\n'
    if udc:
        text += f'udc = "{udc}"\n'
    return text + '[[configs]]\nnumber = 1\nfunctions = ["acm.a"]\n[functions."acm.a"]\n'


@pytest.fixture
def boot_specs():
    made = [d for d in (BOOT_SPECS.parent, BOOT_SPECS) if not d.exists()]
    BOOT_SPECS.mkdir(parents=True, exist_ok=True)
    before = set(BOOT_SPECS.iterdir())
    yield BOOT_SPECS
    for p in set(BOOT_SPECS.iterdir()) - before:
        p.unlink()
    for d in reversed(made):
        d.rmdir()


def run_unit(instance: str, which: str) -> subprocess.CompletedProcess[str]:
    res = None
    for argv in unit_commands(instance)[which]:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            break
    assert res is not None
    return res


def test_the_boot_units_commands_build_and_remove_several_gadgets(sysfs, boot_specs):
    (boot_specs / "labdisk.toml").write_text(boot_spec("labdisk", UDC))
    (boot_specs / "labany.toml").write_text(boot_spec("labany", None))
    (boot_specs / "labwrong.toml").write_text(boot_spec("other", None))
    for instance in ("labdisk", "labany"):
        for which in ("ExecStartPre", "ExecStart"):
            r = run_unit(instance, which)
            assert r.returncode == 0, (which, r.stderr)
    # the UDC the spec names, and a free one (a vUDC first) for the spec naming none
    assert gadget_on_udc(UDC, sysfs) == "labdisk"
    assert gadget_on_udc("usbip-vudc.0", sysfs) == "labany"
    host_device()
    r = run_unit("labwrong", "ExecStart")
    assert r.returncode == 2 and "the gadget is named 'other', not 'labwrong'" in r.stderr
    assert sorted(list_gadgets(sysfs)) == ["labany", "labdisk"]
    for instance in ("labdisk", "labany"):
        r = run_unit(instance, "ExecStop")
        assert r.returncode == 0, r.stderr
    assert list_gadgets(sysfs) == []
    assert gadget_on_udc(UDC, sysfs) is None


def test_the_boot_unit_waits_for_its_udc_to_be_free(sysfs, boot_specs, disk):
    path, _ = disk
    apply_spec(loads_spec(spec_text(path, name="holder", udc="dummy_udc.1")), sysfs)
    (boot_specs / "labwait.toml").write_text(boot_spec("labwait", "dummy_udc.1"))
    (start,) = unit_commands("labwait")["ExecStart"]
    proc = subprocess.Popen(start, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        assert proc.poll() is None, proc.communicate()  # still waiting
        assert list_gadgets(sysfs) == ["holder"]  # nothing built while it waits
        remove_gadget("holder", sysfs)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out.startswith("gadget labwait: created, bound to dummy_udc.1")
    assert gadget_on_udc("dummy_udc.1", sysfs) == "labwait"
