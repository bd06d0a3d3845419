"""``usbipx gadget ...`` through typer's CliRunner, on a fake configfs injected as State(sysfs=...)."""

from __future__ import annotations

import json
import os

import pytest
from fakeconfigfs import GADGETS, FakeConfigfs, snapshot
from typer.testing import CliRunner

from usbipx.cli.common import State
from usbipx.cli.main import app
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
