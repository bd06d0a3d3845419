"""``usbipx gadget ...`` through typer's CliRunner, on a fake configfs injected as State(sysfs=...)."""

from __future__ import annotations

import json
import os

import pytest
from fakeconfigfs import GADGETS, FakeConfigfs, snapshot
from typer.testing import CliRunner

from usbipx.cli.app import app
from usbipx.cli.common import State
from usbipx.sysfs import Sysfs

ROOT = "/fake"
SPEC = """
name = "demo"
udc = "dummy_udc.0"
id_vendor = 0x1d6b
id_product = 0x0104

[strings]
manufacturer = "Example"
product = "Demo gadget"

[[configs]]
number = 1
max_power = 250
functions = ["mass_storage.disk", "acm.tty", "hid.kbd"]

[functions."mass_storage.disk".lun.0]
file = "/img/disk.img"

[functions."acm.tty"]

[functions."hid.kbd"]
preset = "keyboard"
"""


INJECTED: Sysfs | None = None
"""The kernel ``run`` injects, as the other commands' tests do (State.kernel())."""


@pytest.fixture
def k(fs, monkeypatch) -> FakeConfigfs:
    fs.create_file("/img/disk.img", contents=b"\0" * 4096)
    fs.create_file("/specs/demo.toml", contents=SPEC)
    kernel = FakeConfigfs.build(fs, ROOT)
    monkeypatch.setitem(globals(), "INJECTED", kernel)
    return kernel


def run(*args: str, input: str | None = None):
    obj = State(sysfs=INJECTED) if INJECTED is not None else None
    return CliRunner().invoke(app, list(args), input=input, obj=obj)


def test_apply_then_apply_again_is_unchanged(k):
    r = run("gadget", "apply", "/specs/demo.toml")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().startswith("gadget demo: created, bound to dummy_udc.0 (")
    ops = len(k.ops)
    r = run("gadget", "apply", "/specs/demo.toml")
    assert r.exit_code == 0 and r.stdout == "gadget demo: unchanged, bound to dummy_udc.0\n"
    assert len(k.ops) == ops


def test_apply_udc_option_and_json(k):
    r = run("gadget", "apply", "/specs/demo.toml", "--udc", "auto", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["udc"] == "usbip-vudc.0" and out["created"] and out["changed"]
    assert out["path"] == f"{GADGETS}/demo" and "bind UDC usbip-vudc.0" in out["steps"]
    # global --json, spec on stdin; auto keeps the vUDC the gadget holds
    r = run("--json", "gadget", "apply", "-", "--udc", "auto", input=SPEC)
    assert json.loads(r.stdout)["changed"] is False
    r = run("--json", "gadget", "apply", "-", input=SPEC)  # the spec's udc moves it
    assert json.loads(r.stdout)["steps"] == ["unbind UDC usbip-vudc.0", "bind UDC dummy_udc.0"]


def test_list_show_udc_text_and_json(k):
    assert run("gadget", "list").stdout == "no gadgets\n"
    run("gadget", "apply", "/specs/demo.toml")
    r = run("gadget", "list")
    assert r.exit_code == 0
    assert r.stdout.split() == ["demo", "dummy_udc.0", "c.1:", "mass_storage.disk", "acm.tty",
                                "hid.kbd"]
    (g,) = json.loads(run("gadget", "list", "--json").stdout)
    assert g == {"name": "demo", "udc": "dummy_udc.0", "id_vendor": 0x1D6B,
                 "id_product": 0x0104,
                 "configs": {"c.1": ["mass_storage.disk", "acm.tty", "hid.kbd"]},
                 "functions": ["mass_storage.disk", "acm.tty", "hid.kbd"]}
    assert json.loads(run("--json", "gadget", "list").stdout) == [g]

    show = run("gadget", "show", "demo").stdout
    assert "  id: 1d6b:0104" in show and "  product: Demo gadget" in show
    assert "  config c.1: mass_storage.disk, acm.tty, hid.kbd (MaxPower 250 mA)" in show
    assert "    report_desc = 05 01 09 06" in show and "(63 bytes)" in show
    assert "    lun.0: " in show and "file='/img/disk.img'" in show
    js = json.loads(run("gadget", "show", "demo", "--json").stdout)
    assert js["functions"]["hid.kbd"]["preset"] == "keyboard"
    assert js["functions"]["mass_storage.disk"]["lun"]["0"]["file"] == "/img/disk.img"

    lines = run("gadget", "udc").stdout.splitlines()
    assert lines[0].split() == ["usbip-vudc.0", "not", "attached", "free"]
    assert lines[-1].split() == ["dummy_udc.1", "not", "attached", "free"]
    assert ["dummy_udc.0", "configured", "demo"] in [ln.split() for ln in lines]
    udcs = json.loads(run("gadget", "udc", "--json").stdout)
    assert {"name": "dummy_udc.0", "state": "configured", "gadget": "demo", "holder": "demo",
            "free": False, "vudc": False} in udcs


def test_save_remove_apply_gives_the_same_tree(k, fs):
    run("gadget", "apply", "/specs/demo.toml")
    before = snapshot(k)
    saved = run("gadget", "save", "demo").stdout
    assert saved.startswith('name = "demo"\nudc = "dummy_udc.0"\n')
    r = run("gadget", "save", "demo", "-o", "/specs/saved.toml")
    assert r.exit_code == 0 and "saved to /specs/saved.toml" in r.stderr
    with open("/specs/saved.toml") as fh:
        assert fh.read() == saved
    r = run("gadget", "remove", "demo")
    assert r.exit_code == 0 and r.stdout == "gadget demo: removed\n"
    assert run("gadget", "list", "--json").stdout.strip() == "[]"
    assert run("gadget", "apply", "/specs/saved.toml").exit_code == 0
    assert snapshot(k) == before


@pytest.mark.parametrize(("args", "code", "message"), [
    (("gadget", "show", "nope"), 1, "no gadget named nope"),
    (("gadget", "remove", "nope"), 1, "no gadget named nope"),
    (("gadget", "save", "nope"), 1, "no gadget named nope"),
    (("gadget", "apply", "/specs/missing.toml"), 2, "missing.toml: No such file"),
    (("gadget", "apply", "/specs/bad.toml"), 2, "bad.toml: id_vendor: 65536 is out of range"),
    (("gadget", "apply", "/specs/demo.toml", "--udc", "dummy_udc.9"), 1,
     "no UDC named dummy_udc.9"),
    (("gadget", "apply", "/specs/nohid.toml"), 1,
     "step 10 (mkdir functions/hid.kbd) failed: ENOENT (No such file or directory)"),
])
def test_errors_are_one_line_and_exit_non_zero(k, fs, args, code, message):
    fs.create_file("/specs/bad.toml", contents=SPEC.replace("0x1d6b", "0x10000"))
    fs.create_file("/specs/nohid.toml", contents=SPEC)
    k.modules.discard("hid") if "nohid" in args[-1] else None
    before = snapshot(k)
    r = run(*args)
    assert r.exit_code == code
    assert r.stderr.startswith("usbipx: error: ") and message in r.stderr
    assert r.stderr.count("\n") == 1 and r.stdout == ""
    assert snapshot(k) == before


def test_missing_configfs_is_reported(fs, monkeypatch):
    monkeypatch.setenv("USBIPX_ROOT", "/empty")
    fs.create_dir("/empty/sys")
    r = run("gadget", "list")
    assert r.exit_code == 1
    assert r.stderr == ("usbipx: error: kernel module libcomposite is not loaded (run: modprobe "
                        "libcomposite) (and configfs mounted at /sys/kernel/config)\n")


def test_the_injected_kernel_is_used_not_one_of_its_own(k):
    """No USBIPX_ROOT: only the injected Sysfs (rooted at /fake) has a configfs."""
    assert run("gadget", "apply", "/specs/demo.toml").exit_code == 0
    for args in (("gadget", "list", "--json"), ("gadget", "show", "demo"),
                 ("gadget", "save", "demo"), ("gadget", "udc", "--json")):
        r = run(*args)
        assert r.exit_code == 0, (args, r.output)
    assert json.loads(run("gadget", "list", "--json").stdout)[0]["name"] == "demo"
    assert run("gadget", "remove", "demo").exit_code == 0
    assert not k.path(f"{GADGETS}/demo").exists()


@pytest.mark.parametrize("command", ["remove", "show", "save"])
@pytest.mark.parametrize("name", ["/srv/x", "../x", "demo/../../../srv/x", "demo\n"])
def test_a_name_that_is_not_a_gadget_name_is_refused(k, fs, command, name):
    """``gadget remove /srv/x`` used to write /srv/x/UDC and rmdir under it."""
    fs.create_file(f"{ROOT}/srv/x/UDC", contents=b"dummy_udc.0\n")
    fs.create_dir(f"{ROOT}/srv/x/strings/0x409")
    fs.create_file("/srv/x/UDC", contents=b"dummy_udc.0\n")
    fs.create_dir("/srv/x/strings/0x409")
    run("gadget", "apply", "/specs/demo.toml")
    before = snapshot(k)
    r = run("gadget", command, name)
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("usbipx: error: ") and "is not a gadget name" in r.stderr
    assert r.stderr.count("\n") == 1 and r.stdout == ""
    assert snapshot(k) == before
    for base in (f"{ROOT}/srv/x", "/srv/x"):
        with open(f"{base}/UDC", "rb") as fh:
            assert fh.read() == b"dummy_udc.0\n"
        assert os.listdir(f"{base}/strings") == ["0x409"]


# ---------------------------------------------------------------- at boot: usbipx-gadget@.service

DISK = SPEC.replace('name = "demo"\nudc = "dummy_udc.0"\n', 'name = "disk"\n')


class FakeTime:
    """``time`` for usbipx.gadget.udc: sleeping moves a clock; ``on_sleep`` runs each time."""

    def __init__(self, on_sleep=None) -> None:
        self.now = 1000.0
        self.slept: list[float] = []
        self.on_sleep = on_sleep

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep(len(self.slept))


def test_apply_waits_for_the_udc_the_spec_names(fs, monkeypatch):
    from usbipx.gadget import udc as udc_module
    fs.create_file("/img/disk.img", contents=b"\0" * 4096)
    fs.create_file("/specs/demo.toml", contents=SPEC)
    kernel = FakeConfigfs.build(fs, ROOT, udcs=())  # no UDC driver loaded yet
    monkeypatch.setitem(globals(), "INJECTED", kernel)
    clock = FakeTime(on_sleep=lambda n: kernel.add_udc("dummy_udc.0") if n == 3 else None)
    monkeypatch.setattr(udc_module, "time", clock)
    r = run("gadget", "apply", "/specs/demo.toml", "--wait", "10")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("gadget demo: created, bound to dummy_udc.0")
    assert len(clock.slept) == 3 and clock.now - 1000.0 < 1


def test_apply_wait_times_out_with_one_line_and_changes_nothing(fs, monkeypatch):
    from usbipx.gadget import udc as udc_module
    fs.create_file("/img/disk.img", contents=b"\0" * 4096)
    fs.create_file("/specs/demo.toml", contents=SPEC)
    kernel = FakeConfigfs.build(fs, ROOT, udcs=("dummy_udc.1",))
    kernel.add_udc("usbip-vudc.0", holder="other")
    monkeypatch.setitem(globals(), "INJECTED", kernel)
    clock = FakeTime()
    monkeypatch.setattr(udc_module, "time", clock)
    before = snapshot(kernel)
    r = run("gadget", "apply", "/specs/demo.toml", "--wait", "2.5")
    assert r.exit_code == 1
    assert r.stderr == ("usbipx: error: no UDC named dummy_udc.0 in /sys/class/udc (present: "
                        "usbip-vudc.0, dummy_udc.1) (waited 2.5 s)\n")
    assert 2.5 <= clock.now - 1000.0 < 2.8 and max(clock.slept) <= 0.2
    assert snapshot(kernel) == before
    # auto waits for a free one; there is none
    kernel.add_udc("dummy_udc.1", holder="g_zero")
    before = snapshot(kernel)
    r = run("gadget", "apply", "/specs/demo.toml", "--udc", "auto", "--wait", "1")
    assert r.stderr == ("usbipx: error: every UDC is held: usbip-vudc.0 by other, dummy_udc.1 "
                        "by g_zero (waited 1 s)\n")
    assert snapshot(kernel) == before


def test_apply_without_wait_does_not_wait(k, monkeypatch):
    from usbipx.gadget import udc as udc_module
    clock = FakeTime()
    monkeypatch.setattr(udc_module, "time", clock)
    r = run("gadget", "apply", "/specs/demo.toml", "--udc", "dummy_udc.7")
    assert r.exit_code == 1 and "no UDC named dummy_udc.7" in r.stderr
    assert "waited" not in r.stderr and clock.slept == []


def test_expect_name_refuses_a_spec_named_otherwise(k, fs):
    fs.create_file("/specs/disk.toml", contents=SPEC)  # names the gadget demo
    r = run("gadget", "apply", "/specs/disk.toml", "--expect-name", "disk")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith("usbipx: error: /specs/disk.toml: the gadget is named 'demo', "
                               "not 'disk' as --expect-name says")
    assert r.stderr.count("\n") == 1
    assert k.ops == []
    r = run("gadget", "apply", "/specs/disk.toml", "--expect-name", "../disk")
    assert r.exit_code == 2 and "'../disk' is not a gadget name" in r.stderr
    assert run("gadget", "apply", "/specs/demo.toml", "--expect-name", "demo").exit_code == 0


def test_default_udc_applies_only_when_the_spec_names_none(k, fs):
    fs.create_file("/specs/disk.toml", contents=DISK)
    r = run("gadget", "apply", "/specs/disk.toml", "--default-udc", "auto")
    assert r.exit_code == 0 and r.stdout.startswith("gadget disk: created, bound to usbip-vudc.0")
    r = run("gadget", "apply", "/specs/demo.toml", "--default-udc", "auto")
    assert r.stdout.startswith("gadget demo: created, bound to dummy_udc.0")  # the spec's
    r = run("gadget", "apply", "/specs/disk.toml", "--default-udc", "no/such")
    assert r.exit_code == 2 and "'no/such' is not a UDC name" in r.stderr


WINDOWS = SPEC.replace('functions = ["mass_storage.disk", "acm.tty", "hid.kbd"]',
                       'functions = ["rndis.usb0", "acm.tty"]') + """
[functions."rndis.usb0".os_desc.interface.rndis]
compatible_id = "RNDIS"
sub_compatible_id = "5162001"

[os_desc]
b_vendor_code = 0xcd
"""


def test_show_and_save_os_desc(k, fs):
    fs.create_file("/specs/win.toml", contents=WINDOWS)
    assert run("gadget", "apply", "/specs/win.toml").exit_code == 0
    show = run("gadget", "show", "demo").stdout
    assert "  os_desc: use 1, b_vendor_code 0xcd, qw_sign 'MSFT100', config c.1\n" in show
    assert ("    os_desc interface.rndis: compatible_id 'RNDIS', "
            "sub_compatible_id '5162001'\n") in show
    js = json.loads(run("gadget", "show", "demo", "--json").stdout)
    assert js["os_desc"] == {"use": True, "b_vendor_code": 0xCD, "qw_sign": "MSFT100",
                             "config": 1}
    assert js["functions"]["rndis.usb0"]["os_desc"] == {
        "interface": {"rndis": {"compatible_id": "RNDIS", "sub_compatible_id": "5162001"}}}
    before = snapshot(k)
    saved = run("gadget", "save", "demo").stdout
    assert "\n[os_desc]\nuse = true\nb_vendor_code = 0xcd\nqw_sign = \"MSFT100\"\nconfig = 1\n" \
        in saved
    fs.create_file("/specs/saved.toml", contents=saved)
    assert run("gadget", "remove", "demo").exit_code == 0
    assert run("gadget", "apply", "/specs/saved.toml").exit_code == 0
    assert snapshot(k) == before
