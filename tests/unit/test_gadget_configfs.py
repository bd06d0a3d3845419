"""Gadget provisioning against a fake configfs that enforces the kernel's ordering rules."""

from __future__ import annotations

import errno
import itertools
import os
from dataclasses import replace
from pathlib import Path

import pytest
from fakeconfigfs import GADGETS, UDC_CLASS, FakeConfigfs, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usbipx.errors import (
    DeviceBusy,
    DeviceNotFound,
    KernelError,
    ModuleNotLoaded,
    UsbipError,
    ValidationError,
)
from usbipx.gadget import hid
from usbipx.gadget.dump import dump_spec
from usbipx.gadget.live import list_gadgets, read_gadget, save_gadget
from usbipx.gadget.osdesc import InterfaceOsDesc
from usbipx.gadget.spec import load_spec, loads_spec
from usbipx.gadget.transaction import GadgetApplyError, apply_spec, remove_gadget
from usbipx.gadget.udc import choose_udc, gadget_on_udc, list_udcs

ROOT = "/fake"
G = f"{GADGETS}/demo"

DEMO = """
name = "demo"
udc = "dummy_udc.0"
id_vendor = 0x1d6b
id_product = 0x0104
bcd_device = 0x0100

[strings]
manufacturer = "Example"
product = "Demo gadget"
serialnumber = "0001"

[[configs]]
number = 1
max_power = 250
configuration = "Composite"
functions = ["mass_storage.disk", "acm.tty", "hid.kbd"]

[functions."mass_storage.disk".lun.0]
file = "/img/disk.img"
ro = true
removable = false

[functions."mass_storage.disk".lun.1]
cdrom = true

[functions."acm.tty"]

[functions."hid.kbd"]
preset = "keyboard"
"""


@pytest.fixture
def disks(fs) -> None:
    fs.create_file("/img/disk.img", contents=b"\0" * 8192)
    fs.create_file("/img/other.img", contents=b"\1" * 8192)


@pytest.fixture
def k(fs, disks) -> FakeConfigfs:
    return FakeConfigfs.build(fs, ROOT)


def demo(**changes: str) -> str:
    text = DEMO
    for old, new in changes.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def read(k: FakeConfigfs, rel: str) -> bytes:
    return k.path(f"{G}/{rel}").read_bytes()


def fresh_tree(fs, spec_text: str, root: str) -> dict[str, object]:
    """The tree a fresh apply of ``spec_text`` builds on an empty kernel at ``root``."""
    k2 = FakeConfigfs.build(fs, root)
    apply_spec(loads_spec(spec_text), k2)
    return snapshot(k2)


# ---------------------------------------------------------------- the fake itself

def test_the_fake_enforces_the_kernel_ordering_rules(k):
    """So that a wrong order in the code under test fails a test."""
    def err(fn, *args) -> int:
        with pytest.raises(UsbipError) as info:  # KernelError, PermissionDenied for EPERM
            fn(*args)
        if isinstance(info.value, KernelError):
            return info.value.errno
        return next(n for n, name in errno.errorcode.items() if f"{name} (" in str(info.value))

    k.mkdir(G)
    assert err(k.mkdir, f"{G}/functions/nosuch.x") == errno.ENOENT  # no usb_f_nosuch
    assert err(k.mkdir, f"{G}/functions/acm") == errno.EINVAL
    assert err(k.mkdir, f"{G}/configs/c.0") == errno.EINVAL
    k.mkdir(f"{G}/functions/mass_storage.m")
    assert sorted(os.listdir(k.path(f"{G}/functions/mass_storage.m/lun.0"))) == [
        "cdrom", "file", "forced_eject", "inquiry_string", "nofua", "removable", "ro"]
    k.mkdir(f"{G}/functions/mass_storage.m/lun.1")
    assert err(k.mkdir, f"{G}/functions/mass_storage.m/lun.16") == errno.ERANGE
    k.write(f"{G}/functions/mass_storage.m/lun.0/file", "/img/disk.img")
    assert err(k.write, f"{G}/functions/mass_storage.m/lun.0/ro", "1") == errno.EBUSY
    assert err(k.write, f"{G}/functions/mass_storage.m/lun.0/file", "") == errno.EFAULT
    k.mkdir(f"{G}/functions/hid.h")
    k.mkdir(f"{G}/configs/c.1")
    k.symlink(f"{G}/functions/hid.h", f"{G}/configs/c.1/hid.h")
    k.symlink(f"{G}/functions/mass_storage.m", f"{G}/configs/c.1/ms")
    assert err(k.write, f"{G}/functions/hid.h/protocol", "1") == errno.EBUSY  # linked
    assert err(k.write, f"{G}/functions/mass_storage.m/stall", "1") == errno.EBUSY
    k.write(f"{G}/functions/mass_storage.m/lun.0/removable", "0")  # LUN attrs stay writable
    assert err(k.mkdir, f"{G}/functions/mass_storage.m/lun.2") == errno.EBUSY
    assert err(k.rmdir, f"{G}/functions/hid.h") == errno.EBUSY
    assert err(k.rmdir, f"{G}/configs/c.1") == errno.ENOTEMPTY
    assert err(k.rmdir, G) == errno.ENOTEMPTY
    assert err(k.write, f"{G}/UDC", "\n") == errno.ENODEV
    assert err(k.write, f"{G}/UDC", "no_such_udc") == errno.EBUSY
    k.write(f"{G}/UDC", "dummy_udc.0")
    assert err(k.write, f"{G}/UDC", "dummy_udc.1") == errno.EBUSY
    k.mkdir(f"{G}/functions/acm.a")
    assert err(k.symlink, f"{G}/functions/acm.a", f"{G}/configs/c.1/acm.a") == errno.EINVAL
    k.mkdir(f"{G}/strings/0x409")
    assert err(k.write, f"{G}/strings/0x409/product", "x" * 127) == errno.EOVERFLOW
    k.unlink(f"{G}/configs/c.1/hid.h")  # unbinds, as libcomposite does
    assert read(k, "UDC") == b"\n"
    assert err(k.rmdir, f"{G}/functions/mass_storage.m/lun.0") == errno.EPERM
    k.unlink(f"{G}/configs/c.1/ms")
    assert err(k.rmdir, f"{G}/functions/mass_storage.m") == errno.ENOTEMPTY  # lun.1
    # configfs lists the newest entry first
    assert os.listdir(k.path(f"{G}/functions"))[:2] == ["acm.a", "hid.h"]


WINDOWS = """
name = "demo"
udc = "dummy_udc.0"
id_vendor = 0x1d6b
id_product = 0x0104

[os_desc]
b_vendor_code = 0xcd
qw_sign = "MSFT100"
config = 1

[[configs]]
number = 1
functions = ["rndis.usb0", "mass_storage.disk"]

[[configs]]
number = 2
functions = ["mass_storage.disk"]

[functions."rndis.usb0".os_desc.interface.rndis]
compatible_id = "RNDIS"
sub_compatible_id = "5162001"

[functions."mass_storage.disk".lun.0]
file = "/img/disk.img"
"""
RNDIS_IF = "functions/rndis.usb0/os_desc/interface.rndis"


def test_the_fake_models_os_desc_as_the_lab_kernel_does(k):
    """What Linux 6.1 does with os_desc/ (seen on the lab kernel), so plans are held to it."""
    def err(fn, *args) -> int:
        with pytest.raises(KernelError) as info:
            fn(*args)
        return info.value.errno

    k.mkdir(G)
    assert sorted(os.listdir(k.path(f"{G}/os_desc"))) == ["b_vendor_code", "qw_sign", "use"]
    k.write(f"{G}/os_desc/b_vendor_code", "0xcd")
    assert read(k, "os_desc/b_vendor_code") == b"0xffffffcd\n"  # a C char, sign-extended
    k.write(f"{G}/os_desc/b_vendor_code", "0x21")
    assert read(k, "os_desc/b_vendor_code") == b"0x21\n"
    assert err(k.write, f"{G}/os_desc/b_vendor_code", "256") == errno.ERANGE
    k.write(f"{G}/os_desc/qw_sign", "MSFT100")
    k.write(f"{G}/os_desc/qw_sign", "AB")  # the rest of the old value stays
    assert read(k, "os_desc/qw_sign") == b"ABFT100\n"
    k.write(f"{G}/os_desc/qw_sign", "MSFT1000")  # 7 bytes taken
    assert read(k, "os_desc/qw_sign") == b"MSFT100\n"
    assert err(k.write, f"{G}/os_desc/qw_sign", "\n") == errno.EIO  # a 0-byte store
    k.mkdir(f"{G}/functions/rndis.r")
    k.mkdir(f"{G}/functions/ncm.n")
    k.mkdir(f"{G}/functions/ecm.e")
    assert os.listdir(k.path(f"{G}/functions/ncm.n/os_desc")) == ["interface.ncm"]
    assert not k.path(f"{G}/functions/ecm.e/os_desc").exists()
    cid = f"{G}/functions/rndis.r/os_desc/interface.rndis/compatible_id"
    assert k.path(cid).read_bytes() == b"\0" * 8
    k.write(cid, "ABCDEFGH")
    k.write(cid, "RNDIS")  # replaces 5 of the 8 bytes
    assert k.path(cid).read_bytes() == b"RNDISFGH"
    k.write(cid, b"RNDIS\0\0\0")
    assert k.path(cid).read_bytes() == b"RNDIS\0\0\0"
    k.mkdir(f"{G}/configs/c.1")
    k.mkdir(f"{G}/configs/c.2")
    k.symlink(f"{G}/functions/rndis.r", f"{G}/configs/c.1/rndis.r")
    k.write(cid, b"WINUSB\0\0")  # not refused while linked
    assert err(k.symlink, f"{G}/functions/rndis.r", f"{G}/os_desc/rndis.r") == errno.EINVAL
    k.symlink(f"{G}/configs/c.1", f"{G}/os_desc/c.1")
    assert err(k.symlink, f"{G}/configs/c.2", f"{G}/os_desc/c.2") == errno.EBUSY  # one only
    k.unlink(f"{G}/configs/c.1/rndis.r")
    assert err(k.rmdir, f"{G}/configs/c.1") == errno.EBUSY  # os_desc/ links it
    k.rmdir(f"{G}/configs/c.2")
    k.symlink(f"{G}/functions/rndis.r", f"{G}/configs/c.1/rndis.r")
    k.write(f"{G}/UDC", "dummy_udc.0")
    k.unlink(f"{G}/os_desc/c.1")  # unbinds, as libcomposite does
    assert read(k, "UDC") == b"\n"
    k.write(f"{G}/UDC", "dummy_udc.0")
    k.symlink(f"{G}/configs/c.1", f"{G}/os_desc/c.1")  # allowed while bound
    assert read(k, "UDC") == b"dummy_udc.0\n"


def test_os_desc_is_built_converged_and_removed_in_the_kernel_order(k, fs):
    result = apply_spec(loads_spec(WINDOWS), k)
    assert result.udc == "dummy_udc.0"
    assert read(k, "os_desc/use") == b"1\n"
    assert read(k, "os_desc/b_vendor_code") == b"0xffffffcd\n"
    assert read(k, "os_desc/qw_sign") == b"MSFT100\n"
    assert os.path.basename(os.readlink(k.path(f"{G}/os_desc/c.1"))) == "c.1"
    assert read(k, f"{RNDIS_IF}/compatible_id") == b"RNDIS\0\0\0"
    assert read(k, f"{RNDIS_IF}/sub_compatible_id") == b"5162001\0"
    # read back as it was given: applying again is not a single write
    n_ops = len(k.ops)
    assert not apply_spec(loads_spec(WINDOWS), k).changed
    assert not apply_spec(read_gadget("demo", k), k).changed
    assert len(k.ops) == n_ops
    # another config, a shorter id: as a fresh build of the new spec
    new = WINDOWS.replace("config = 1", "config = 2").replace('"5162001"', '"51"')
    result = apply_spec(loads_spec(new), k)
    assert "unlink os_desc/c.1" in result.steps and result.steps[-1] == "bind UDC dummy_udc.0"
    assert read(k, f"{RNDIS_IF}/sub_compatible_id") == b"51\0\0\0\0\0\0"
    assert snapshot(k) == fresh_tree(fs, new, "/fresh")
    # without [os_desc]: off and unlinked, and a config os_desc/ linked can go
    off = new.replace("[os_desc]\nb_vendor_code = 0xcd\nqw_sign = \"MSFT100\"\nconfig = 2\n", "")
    off = off.replace('[[configs]]\nnumber = 2\nfunctions = ["mass_storage.disk"]\n', "")
    apply_spec(loads_spec(off), k)
    assert read(k, "os_desc/use") == b"0\n" and not k.path(f"{G}/configs/c.2").exists()
    assert [n for n in os.listdir(k.path(f"{G}/os_desc")) if "." in n] == []
    apply_spec(loads_spec(new), k)
    start = len(k.ops)
    remove_gadget("demo", k)
    ops = [op.split("=")[0].replace(G, "") for op in k.ops[start:]]
    assert ops[:2] == ["write /UDC", "unlink /os_desc/c.2"]  # before its config goes
    assert ops.index("rmdir /configs/c.2") > 1
    assert snapshot(k) == {f"udc:{u}": b"" for u in os.listdir(k.path(UDC_CLASS))}


def test_save_and_show_os_desc_then_apply_reproduces_the_tree(k):
    apply_spec(loads_spec(WINDOWS), k)
    before = snapshot(k)
    spec = save_gadget("demo", k)
    assert spec.os_desc is not None and spec.os_desc.config == 1
    assert spec.os_desc.b_vendor_code == 0xCD  # not 0xffffffcd
    text = dump_spec(spec)
    assert "[os_desc]\nuse = true\nb_vendor_code = 0xcd\n" in text
    assert 'sub_compatible_id = "5162001"' in text
    remove_gadget("demo", k)
    apply_spec(loads_spec(text), k)
    assert snapshot(k) == before


def test_os_desc_switched_off_is_saved_as_it_is(k):
    """use = 0 and no link, with a vendor code and signature left behind: saved and applied
    again, it stays unlinked."""
    apply_spec(loads_spec(WINDOWS), k)
    off = WINDOWS.replace("[os_desc]\nb_vendor_code = 0xcd\nqw_sign = \"MSFT100\"\nconfig = 1\n", "")
    apply_spec(loads_spec(off), k)
    before = snapshot(k)
    saved = dump_spec(save_gadget("demo", k))
    assert "[os_desc]\nuse = false\nb_vendor_code = 0xcd\nqw_sign = \"MSFT100\"\n\n" in saved
    remove_gadget("demo", k)
    apply_spec(loads_spec(saved), k)
    assert snapshot(k) == before


def test_os_desc_set_up_by_another_tool_is_read_and_removed(k):
    """A link named otherwise (libusbgx-style), a signature never written."""
    k.mkdir(G)
    k.mkdir(f"{G}/functions/ncm.usb0")
    k.mkdir(f"{G}/configs/b.1")
    k.symlink(f"{G}/functions/ncm.usb0", f"{G}/configs/b.1/ncm.usb0")
    k.write(f"{G}/os_desc/use", "1")
    k.write(f"{G}/os_desc/b_vendor_code", "0x99")
    k.symlink(f"{G}/configs/b.1", f"{G}/os_desc/config")
    g = read_gadget("demo", k)
    assert g.os_desc is not None
    assert (g.os_desc.use, g.os_desc.b_vendor_code, g.os_desc.qw_sign) == (True, 0x99, None)
    assert (g.os_desc.config, g.os_desc.link) == (1, "config")
    assert g.functions["ncm.usb0"].os_desc == {"ncm": InterfaceOsDesc()}
    assert "qw_sign" not in dump_spec(save_gadget("demo", k))
    assert "interface" not in dump_spec(save_gadget("demo", k))  # empty ids are left out
    remove_gadget("demo", k)
    assert not k.path(G).exists()


# ---------------------------------------------------------------- apply

def test_apply_builds_the_tree_the_kernel_needs(k):
    result = apply_spec(loads_spec(DEMO), k)
    assert result.created and result.changed and result.udc == "dummy_udc.0"
    assert read(k, "idVendor") == b"0x1d6b\n" and read(k, "bcdDevice") == b"0x0100\n"
    assert read(k, "strings/0x409/product") == b"Demo gadget\n"
    assert read(k, "configs/c.1/MaxPower") == b"250\n"
    assert read(k, "configs/c.1/strings/0x409/configuration") == b"Composite\n"
    assert read(k, "functions/hid.kbd/report_desc") == hid.KEYBOARD_REPORT_DESC  # raw bytes
    assert read(k, "functions/hid.kbd/report_length") == b"8\n"
    assert read(k, "functions/mass_storage.disk/lun.0/ro") == b"1\n"
    assert read(k, "functions/mass_storage.disk/lun.0/removable") == b"0\n"
    assert read(k, "functions/mass_storage.disk/lun.0/file") == b"/img/disk.img\n"
    assert read(k, "functions/mass_storage.disk/lun.1/cdrom") == b"1\n"
    assert sorted(os.listdir(k.path(f"{G}/configs/c.1"))) == [
        "MaxPower", "acm.tty", "bmAttributes", "hid.kbd", "mass_storage.disk", "strings"]
    assert read(k, "UDC") == b"dummy_udc.0\n"
    assert gadget_on_udc("dummy_udc.0", k) == "demo"
    assert gadget_on_udc("dummy_udc.1", k) is None
    # links in spec order: that order numbers the interfaces
    assert read_gadget("demo", k).configs[0].functions == (
        "mass_storage.disk", "acm.tty", "hid.kbd")
    assert list_gadgets(k) == ["demo"]


def test_applying_the_same_spec_twice_changes_nothing(k):
    spec = loads_spec(DEMO)
    apply_spec(spec, k)
    before, n_ops = snapshot(k), len(k.ops)
    again = apply_spec(spec, k)
    assert not again.changed and not again.created and again.steps == ()
    assert again.udc == "dummy_udc.0"
    assert len(k.ops) == n_ops  # not a single write
    assert snapshot(k) == before


def test_applying_a_live_gadget_read_back_is_a_no_op(k):
    apply_spec(loads_spec(DEMO), k)
    n_ops = len(k.ops)
    assert not apply_spec(read_gadget("demo", k), k).changed
    assert not apply_spec(save_gadget("demo", k), k).changed
    assert len(k.ops) == n_ops


def test_kernel_managed_values_do_not_make_a_bound_gadget_look_changed(k):
    apply_spec(loads_spec(DEMO.replace("bcd_device", "bcd_usb = 0x0110\nbcd_device")
                          .replace('preset = "keyboard"',
                                   'preset = "keyboard"\n[functions."ecm.net"]\n'
                                   'ifname = "usb%d"')), k)
    # At enumeration the UDC core rewrites bcdUSB/bMaxPacketSize0 and the net
    # device gets its real name; none of that is a difference to converge.
    k.path(f"{G}/bcdUSB").write_bytes(b"0x0200\n")
    k.path(f"{G}/bMaxPacketSize0").write_bytes(b"0x40\n")
    k.path(f"{G}/functions/ecm.net/ifname").write_bytes(b"usb0\n")
    n_ops = len(k.ops)
    spec = loads_spec(DEMO.replace("bcd_device", "bcd_usb = 0x0110\nbcd_device")
                      .replace('preset = "keyboard"', 'preset = "keyboard"\n'
                               '[functions."ecm.net"]\nifname = "usb%d"'))
    assert not apply_spec(spec, k).changed
    assert len(k.ops) == n_ops


def test_a_changed_spec_is_converged_by_unbind_change_rebind(k, fs):
    apply_spec(loads_spec(DEMO), k)
    new = demo(**{'preset = "keyboard"': 'preset = "mouse"',
                  '"Demo gadget"': '"Mouse gadget"'})
    result = apply_spec(loads_spec(new), k)
    assert result.changed and not result.created
    assert result.steps[0] == "unbind UDC dummy_udc.0"
    assert result.steps[-1] == "bind UDC dummy_udc.0"
    # the hid function was unlinked before its attributes changed, relinked after
    i_unlink = result.steps.index("unlink configs/c.1/hid.kbd")
    i_write = result.steps.index("write functions/hid.kbd/report_desc")
    i_link = result.steps.index("link configs/c.1/hid.kbd")
    assert i_unlink < i_write < i_link
    assert read(k, "functions/hid.kbd/report_desc") == hid.MOUSE_REPORT_DESC
    assert snapshot(k) == fresh_tree(fs, new, "/fresh")


def test_changing_ro_of_an_open_lun_closes_the_file_first(k, fs):
    apply_spec(loads_spec(DEMO), k)
    new = DEMO.replace("ro = true", "ro = false").replace("/img/disk.img", "/img/other.img")
    result = apply_spec(loads_spec(new), k)
    lun = [s for s in result.steps if "lun.0" in s]
    assert lun == ["write functions/mass_storage.disk/lun.0/file",  # closed
                   "write functions/mass_storage.disk/lun.0/ro",
                   "write functions/mass_storage.disk/lun.0/file"]  # reopened last
    assert read(k, "functions/mass_storage.disk/lun.0/file") == b"/img/other.img\n"
    assert snapshot(k) == fresh_tree(fs, new, "/fresh")


def test_removed_functions_luns_and_configs_go_away_in_order(k, fs):
    two = DEMO + '\n[[configs]]\nnumber = 2\nfunctions = ["acm.tty"]\n'
    apply_spec(loads_spec(two), k)
    small = """
name = "demo"
id_vendor = 0x1d6b
id_product = 0x0104
bcd_device = 0x0100
[strings]
manufacturer = "Example"
[[configs]]
number = 1
functions = ["mass_storage.disk"]
[functions."mass_storage.disk".lun.0]
file = "/img/disk.img"
"""
    result = apply_spec(loads_spec(small), k)
    assert result.udc == "dummy_udc.0"  # no udc in the spec: the gadget keeps its UDC
    assert "rmdir functions/mass_storage.disk/lun.1" in result.steps
    assert "rmdir configs/c.2" in result.steps
    assert snapshot(k) == fresh_tree(fs, small.replace('name = "demo"',
                                                       'name = "demo"\nudc = "dummy_udc.0"'),
                                     "/fresh")


def test_udc_none_unbinds_and_another_udc_moves_the_gadget(k):
    apply_spec(loads_spec(DEMO), k)
    moved = apply_spec(loads_spec(DEMO), k, udc="usbip-vudc.1")
    assert moved.steps == ("unbind UDC dummy_udc.0", "bind UDC usbip-vudc.1")
    assert gadget_on_udc("usbip-vudc.1", k) == "demo"
    off = apply_spec(loads_spec(DEMO), k, udc="none")
    assert off.udc is None and off.steps == ("unbind UDC usbip-vudc.1",)
    assert read(k, "UDC") == b"\n"


def test_auto_prefers_a_free_vudc_then_any_free_udc(fs, disks):
    k = FakeConfigfs.build(fs, ROOT, udcs=("dummy_udc.0", "usbip-vudc.10", "usbip-vudc.2"))
    assert choose_udc(k) == "usbip-vudc.2"
    one = DEMO.replace("/img/disk.img", "").replace("removable = false", "")
    r1 = apply_spec(loads_spec(one), k, udc="auto")
    assert r1.udc == "usbip-vudc.2"
    assert apply_spec(loads_spec(one), k, udc="auto").steps == ()  # keeps its UDC
    r2 = apply_spec(loads_spec(one.replace('"demo"', '"two"')), k, udc="auto")
    r3 = apply_spec(loads_spec(one.replace('"demo"', '"three"')), k, udc="auto")
    assert (r2.udc, r3.udc) == ("usbip-vudc.10", "dummy_udc.0")
    with pytest.raises(DeviceBusy, match="every UDC is held"):
        apply_spec(loads_spec(one.replace('"demo"', '"four"')), k, udc="auto")
    assert [u.name for u in list_udcs(k)] == ["usbip-vudc.2", "usbip-vudc.10", "dummy_udc.0"]


def test_a_held_or_unknown_udc_is_refused_before_anything_changes(k):
    k.add_udc("dummy_udc.1", holder="g_zero")  # a legacy gadget driver holds it
    apply_spec(loads_spec(DEMO), k)
    before, n_ops = snapshot(k), len(k.ops)
    other = DEMO.replace('"demo"', '"other"')
    with pytest.raises(DeviceBusy, match=r"UDC dummy_udc\.0 is held by demo"):
        apply_spec(loads_spec(other), k)
    with pytest.raises(DeviceBusy, match="held by g_zero"):
        apply_spec(loads_spec(other), k, udc="dummy_udc.1")
    with pytest.raises(DeviceNotFound, match=r"no UDC named dummy_udc\.7"):
        apply_spec(loads_spec(other), k, udc="dummy_udc.7")
    assert len(k.ops) == n_ops and snapshot(k) == before
    holders = {u.name: (u.gadget, u.holder) for u in list_udcs(k)}
    assert holders["dummy_udc.0"] == ("demo", "demo")
    assert holders["dummy_udc.1"] == (None, "g_zero")


def test_without_configfs_the_error_says_which_module(fs, disks):
    k = FakeConfigfs(ROOT)
    with pytest.raises(ModuleNotLoaded, match="libcomposite"):
        apply_spec(loads_spec(DEMO), k)


# ---------------------------------------------------------------- failures roll back

def test_a_missing_function_module_rolls_back_and_says_so(k):
    k.modules.discard("hid")
    with pytest.raises(GadgetApplyError) as info:
        apply_spec(loads_spec(DEMO), k)
    e = info.value
    assert e.step == "mkdir functions/hid.kbd" and e.errno == errno.ENOENT
    assert "ENOENT (No such file or directory)" in str(e)
    assert "usb_f_hid" in str(e) and "rolled back" in str(e)
    assert e.rollback_errors == []
    assert os.listdir(k.path(GADGETS)) == []


def test_a_value_the_kernel_rejects_rolls_back_a_converge(k):
    apply_spec(loads_spec(DEMO), k)
    before = snapshot(k)
    bad = DEMO.replace('preset = "keyboard"', 'preset = "mouse"') + (
        '\n[functions."uac2.mic"]\nc_sync = "sometimes"\n')
    bad = bad.replace('"acm.tty", "hid.kbd"]', '"acm.tty", "hid.kbd", "uac2.mic"]')
    with pytest.raises(GadgetApplyError) as info:
        apply_spec(loads_spec(bad), k)
    assert info.value.step == "write functions/uac2.mic/c_sync"
    assert "EINVAL (Invalid argument)" in str(info.value)
    assert snapshot(k) == before  # mouse undone, rebound to dummy_udc.0


def _count_steps(fs, spec_text: str, setup: str | None) -> int:
    k = FakeConfigfs.build(fs, "/count")
    if setup:
        apply_spec(loads_spec(setup), k)
    return len(apply_spec(loads_spec(spec_text), k).steps)


CONVERGE_TO = demo(**{'preset = "keyboard"': 'preset = "mouse"',
                      "ro = true": "ro = false", "cdrom = true": "nofua = true",
                      '"Example"': '"Changed"',
                      'functions = ["mass_storage.disk", "acm.tty", "hid.kbd"]':
                      'functions = ["hid.kbd", "ecm.net"]\n[functions."ecm.net"]\nqmult = 7'})


@pytest.mark.parametrize(("setup", "target"), [
    (None, DEMO),  # create
    (DEMO, CONVERGE_TO),  # converge
    (DEMO, DEMO.replace('udc = "dummy_udc.0"', 'udc = "usbip-vudc.0"')),  # move
    (None, WINDOWS),  # create with os_desc
    (WINDOWS, WINDOWS.replace("config = 1", "config = 2").replace('"RNDIS"', '"WINUSB"')
     .replace("0xcd", "0x21")),  # converge os_desc
    (WINDOWS, DEMO),  # os_desc off, its config and function gone
])
def test_a_failure_at_any_step_leaves_configfs_exactly_as_before(fs, disks, setup, target):
    n = _count_steps(fs, target, setup)
    assert n > 0
    for i, step in enumerate(range(1, n + 1)):
        k = FakeConfigfs.build(fs, f"/r{i}")
        if setup:
            apply_spec(loads_spec(setup), k)
        before = snapshot(k)
        k.fail_at = k._count + step
        k.fail_errno = errno.EIO
        with pytest.raises(GadgetApplyError) as info:
            apply_spec(loads_spec(target), k)
        assert info.value.step_number == step
        assert info.value.rollback_errors == []
        assert snapshot(k) == before, f"step {step}: {info.value.step}"


@pytest.mark.parametrize("spec", [DEMO, WINDOWS])
def test_a_failure_while_removing_restores_the_gadget(fs, disks, spec):
    k = FakeConfigfs.build(fs, "/count")
    apply_spec(loads_spec(spec), k)
    start = len(k.ops)
    remove_gadget("demo", k)
    n = len(k.ops) - start
    for step in range(1, n + 1):
        k = FakeConfigfs.build(fs, f"/rm{step}")
        apply_spec(loads_spec(spec), k)
        before = snapshot(k)
        k.fail_at = k._count + step
        with pytest.raises(GadgetApplyError):
            remove_gadget("demo", k)
        assert snapshot(k) == before, f"step {step}"


# ---------------------------------------------------------------- remove, save

def test_remove_tears_down_in_the_kernel_order(k):
    apply_spec(loads_spec(DEMO), k)
    start = len(k.ops)
    remove_gadget("demo", k)
    ops = [op.split("=")[0].replace(G, "") for op in k.ops[start:]]
    assert ops == [
        "write /UDC",
        # newest link first, so that a rollback makes them again in interface order
        "unlink /configs/c.1/hid.kbd", "unlink /configs/c.1/acm.tty",
        "unlink /configs/c.1/mass_storage.disk",
        "rmdir /configs/c.1/strings/0x409", "rmdir /configs/c.1",
        "rmdir /functions/mass_storage.disk/lun.1", "rmdir /functions/mass_storage.disk",
        "rmdir /functions/acm.tty", "rmdir /functions/hid.kbd",
        "rmdir /strings/0x409", "rmdir ",
    ]
    assert snapshot(k) == {f"udc:{u}": b"" for u in os.listdir(k.path(UDC_CLASS))}
    with pytest.raises(DeviceNotFound, match="no gadget named demo"):
        remove_gadget("demo", k)


def test_save_then_apply_reproduces_the_tree(k, fs):
    apply_spec(loads_spec(DEMO + '\n[functions."uac2.mic"]\nc_srate = 44100\n'
                          '[functions."ecm.net"]\nhost_addr = "02:11:22:33:44:55"\n'
                          '[strings."0x407"]\nproduct = "Vorführung"\n'), k)
    before = snapshot(k)
    text = dump_spec(save_gadget("demo", k))
    assert 'preset = "keyboard"' in text
    remove_gadget("demo", k)
    apply_spec(loads_spec(text), k)
    assert snapshot(k) == before


def test_save_of_a_gadget_made_by_another_tool(k):
    """Link names like f1 and a config label other than c are read back by target."""
    k.mkdir(G)
    k.write(f"{G}/idVendor", "0x0525")
    k.write(f"{G}/idProduct", "0xa4a2")
    k.mkdir(f"{G}/functions/ecm.usb0")
    k.mkdir(f"{G}/functions/uac2.x")
    k.write(f"{G}/functions/uac2.x/c_srate", "48000")
    k.mkdir(f"{G}/configs/cfg.2")
    k.symlink(f"{G}/functions/uac2.x", f"{G}/configs/cfg.2/f1")
    k.symlink(f"{G}/functions/ecm.usb0", f"{G}/configs/cfg.2/f2")
    spec = save_gadget("demo", k)
    assert spec.configs[0].dirname == "cfg.2"
    assert spec.configs[0].functions == ("uac2.x", "ecm.usb0")
    assert spec.functions["uac2.x"].attrs["c_srate"] == 48000
    assert spec.functions["ecm.usb0"].attrs["dev_addr"] == "f2:80:bc:a0:14:1c"
    assert not apply_spec(loads_spec(dump_spec(spec)), k).changed


# ---------------------------------------------------------------- converge property

_FUNCTIONS = {
    "acm.a": "",
    "hid.k": 'preset = "keyboard"',
    "hid.m": 'preset = "mouse"\nno_out_endpoint = true',
    "ecm.e": "qmult = 3",
    "midi.m": "in_ports = 2",
    "mass_storage.s": '[functions."mass_storage.s".lun.0]\nfile = "/img/disk.img"\nro = true',
    "mass_storage.t": '[functions."mass_storage.t".lun.0]\nfile = "/img/other.img"\n'
                      '[functions."mass_storage.t".lun.2]\ncdrom = true',
    "rndis.r": '[functions."rndis.r".os_desc.interface.rndis]\ncompatible_id = "RNDIS"',
    "rndis.w": '[functions."rndis.w".os_desc.interface.rndis]\ncompatible_id = "WINUSB"\n'
               'sub_compatible_id = "X"',
}


@st.composite
def gadget_texts(draw: st.DrawFn) -> str:
    names = draw(st.lists(st.sampled_from(sorted(_FUNCTIONS)), min_size=1, max_size=4,
                          unique=True))
    lines = ['name = "g"', f'id_vendor = {draw(st.sampled_from([0x1d6b, 0x0525]))}',
             'id_product = 0x0104']
    udc = draw(st.sampled_from([None, "dummy_udc.0", "usbip-vudc.1", "none"]))
    if udc:
        lines.append(f'udc = "{udc}"')
    if draw(st.booleans()):
        lines += ["[strings]", f'product = "{draw(st.sampled_from(["A", "B"]))}"']
    n_configs = draw(st.integers(1, 2))
    if draw(st.booleans()):
        lines += ["[os_desc]", f"use = {draw(st.sampled_from(['true', 'false']))}",
                  f"b_vendor_code = {draw(st.sampled_from([0x21, 0xcd]))}",
                  f"config = {draw(st.integers(1, n_configs))}"]
    for n in range(1, n_configs + 1):
        funcs = draw(st.permutations(names))[:draw(st.integers(1, len(names)))]
        lines += ["[[configs]]", f"number = {n}", f"functions = {funcs!r}".replace("'", '"')]
        if draw(st.booleans()):
            lines.append(f"max_power = {draw(st.sampled_from([100, 500]))}")
    for name in names:
        body = _FUNCTIONS[name]
        if name == "ecm.e":
            body = f"qmult = {draw(st.integers(1, 9))}"
        lines += [f'[functions."{name}"]', body]
    return "\n".join(lines) + "\n"


_roots = itertools.count()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(first=gadget_texts(), second=gadget_texts())
def test_converging_any_gadget_to_any_spec_equals_building_it_fresh(k, fs, first, second):
    n = next(_roots)
    k1 = FakeConfigfs.build(fs, f"/a{n}")
    apply_spec(loads_spec(first), k1)
    spec = loads_spec(second)
    applied = apply_spec(spec, k1)
    # a spec without udc keeps the UDC the gadget had; say so for the fresh build
    udc = applied.udc or "none"
    fresh = second if spec.udc else second.replace('name = "g"', f'name = "g"\nudc = "{udc}"')
    expected = fresh_tree(fs, fresh, f"/b{n}")
    got = snapshot(k1)
    if spec.os_desc is None:
        # Without [os_desc] a converge turns use off and leaves code and signature be:
        # they do nothing then, and the kernel takes no empty signature (a 0-byte store).
        for attr in ("g/os_desc/b_vendor_code", "g/os_desc/qw_sign"):
            got.pop(attr), expected.pop(attr)
    assert got == expected
    ops = len(k1.ops)
    assert not apply_spec(spec, k1).changed
    assert len(k1.ops) == ops


def test_a_config_with_no_function_is_refused_when_binding(k):
    spec = loads_spec('name = "e"\nid_vendor = 1\nid_product = 2\n[[configs]]\nnumber = 1\n')
    apply_spec(spec, k)  # unbound: fine
    with pytest.raises(Exception, match="needs at least one function"):
        apply_spec(replace(spec, udc="dummy_udc.0"), k)


EXAMPLES = Path(__file__).resolve().parents[2] / "gadget" / "examples"


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_example_specs_build_and_bind(fs, example):
    fs.add_real_directory(str(EXAMPLES))
    fs.create_file("/var/lib/usbipx/disk.img", contents=b"\0" * 4096)
    k = FakeConfigfs.build(fs, ROOT)
    spec = load_spec(EXAMPLES / example)
    result = apply_spec(spec, k, udc="auto")
    # --udc auto overrides the spec's udc; on a fresh tree it takes the first free vUDC
    assert result.udc == "usbip-vudc.0"
    assert read_gadget(spec.name, k).udc == "usbip-vudc.0"
    assert gadget_on_udc("usbip-vudc.0", k) == spec.name
    assert not apply_spec(spec, k, udc="auto").changed
    assert not apply_spec(loads_spec(dump_spec(save_gadget(spec.name, k))), k).changed


# ---------------------------------------------------------------- gadget names are checked

BAD_NAMES = ["/srv/x", "../x", "x/../../srv/x", "demo\n", "a/b", "", ".", "x" * 65, "-x"]


def _outside_tree(fs) -> dict[str, object]:
    """A directory outside configfs that looks like a gadget: UDC file and a sub-directory."""
    fs.create_file(f"{ROOT}/srv/x/UDC", contents=b"dummy_udc.0\n")
    fs.create_dir(f"{ROOT}/srv/x/strings/0x409")
    fs.create_file(f"{ROOT}/sys/kernel/config/x/UDC", contents=b"dummy_udc.0\n")
    fs.create_dir(f"{ROOT}/sys/kernel/config/x/configs")
    return _listing(f"{ROOT}/srv", f"{ROOT}/sys/kernel/config/x")


def _listing(*dirs: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for d in dirs:
        for dirpath, dirnames, filenames in os.walk(d):
            for n in dirnames:
                out[os.path.join(dirpath, n)] = "dir"
            for n in filenames:
                out[os.path.join(dirpath, n)] = Path(dirpath, n).read_bytes()
    return out


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_gadget_name_that_is_not_one_is_refused_before_any_path_is_built(k, fs, name):
    apply_spec(loads_spec(DEMO), k)
    before, outside, n_ops = snapshot(k), _outside_tree(fs), len(k.ops)
    for call in (lambda: read_gadget(name, k), lambda: save_gadget(name, k),
                 lambda: remove_gadget(name, k),
                 lambda: apply_spec(replace(loads_spec(DEMO), name=name, udc=None), k)):
        with pytest.raises(ValidationError, match="is not a gadget name"):
            call()
    assert snapshot(k) == before and len(k.ops) == n_ops
    assert _listing(f"{ROOT}/srv", f"{ROOT}/sys/kernel/config/x") == outside


@pytest.mark.parametrize("udc", ["../x", "dummy_udc.0\n", "/sys/class/udc/dummy_udc.0", ""])
def test_a_udc_name_that_is_not_one_is_refused(k, udc):
    apply_spec(loads_spec(DEMO), k)
    before = snapshot(k)
    with pytest.raises(ValidationError, match="is not a UDC name"):
        gadget_on_udc(udc, k)
    with pytest.raises(ValidationError, match="is not a UDC name"):
        apply_spec(loads_spec(DEMO), k, udc=udc)
    assert snapshot(k) == before


@pytest.mark.parametrize(("os_desc", "functions", "expected"), [
    ({"config": 9}, {}, "os_desc links configuration 9, which it does not have"),
    ({"config": 1, "link": "../x"}, {}, "'../x' is not a link name"),
    ({"config": 1}, {"rndis.usb0": {"../x": InterfaceOsDesc("RNDIS")}}, "'../x' is not an interface"),
])
def test_os_desc_names_built_in_code_are_checked_before_any_path(k, os_desc, functions, expected):
    spec = loads_spec(WINDOWS)
    fs_ = dict(spec.functions)
    for name, interfaces in functions.items():
        fs_[name] = replace(fs_[name], os_desc=interfaces)
    bad = replace(spec, functions=fs_, os_desc=replace(spec.os_desc, **os_desc))
    with pytest.raises(ValidationError, match=expected.replace("(", r"\(")):
        apply_spec(bad, k)
    assert k.ops == []


def test_a_rolled_back_unlink_keeps_the_interface_order(fs, disks):
    """configfs numbers a config's interfaces in the order its links were made: undoing
    unlinks must make them again in that order, or the rolled-back gadget is another device."""
    order = ("mass_storage.disk", "acm.tty", "hid.kbd")
    changed = demo(**{'preset = "keyboard"': 'preset = "mouse"'})
    for i, (target, fail_on) in enumerate([
            (None, "rmdir"),  # remove: fails after every link is gone
            (changed, "write")]):  # converge: fails after the relink's unlinks
        k = FakeConfigfs.build(fs, f"/order{i}")
        apply_spec(loads_spec(DEMO), k)
        assert read_gadget("demo", k).configs[0].functions == order
        k.fail_when = lambda op, path, fail_on=fail_on: errno.EIO if op == fail_on else None
        with pytest.raises(GadgetApplyError) as info:
            if target is None:
                remove_gadget("demo", k)
            else:
                apply_spec(loads_spec(target), k)
        assert info.value.rollback_errors == []
        k.fail_when = None
        assert read_gadget("demo", k).configs[0].functions == order
