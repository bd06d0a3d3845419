"""The systemd units shipped in daemon/systemd: what they say, and that systemd accepts them."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fakeconfigfs import GADGETS, FakeConfigfs
from typer.testing import CliRunner

from usbipx.cli.app import app
from usbipx.cli.common import State

UNITS = Path(__file__).resolve().parents[2] / "daemon" / "systemd"


def unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # keys are case-sensitive in systemd
    cp.read(UNITS / name)
    return cp


def test_supervisor_unit_is_notify_with_watchdog_and_reload() -> None:
    s = unit("usbipx-supervisor.service")["Service"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["WatchdogSec"] and s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert "supervisor run -c" in s["ExecStart"]
    # SIGTERM to the main process only: it stops its workers in order.
    assert s["KillMode"] == "mixed"
    # Ownership records survive a restart of the service.
    assert s["RuntimeDirectory"] == "usbipx" and s["RuntimeDirectoryPreserve"] == "yes"


@pytest.mark.parametrize(("name", "command"), [("usbipx-usbipa.service", "usbipa"),
                                               ("usbipx-usbipd.service", "usbipd")])
def test_daemon_units_run_in_the_foreground(name: str, command: str) -> None:
    s = unit(name)["Service"]
    assert s["Type"] == "simple" and s["ExecStart"].endswith(f"usbipx {command}")
    assert " -D" not in s["ExecStart"]


def command(line: str, instance: str) -> list[str]:
    """An Exec*= line as argv, %i replaced (systemd splits words as a shell would)."""
    return [w.replace("%i", instance) for w in shlex.split(line)]


def test_gadget_template_applies_at_start_and_removes_at_stop() -> None:
    s = unit("usbipx-gadget@.service")["Service"]
    assert s["Type"] == "oneshot" and s["RemainAfterExit"] == "yes"
    start = command(s["ExecStart"], "disk")
    assert start[:4] == ["/usr/local/bin/usbipx", "gadget", "apply", "/etc/usbipx/gadgets/disk.toml"]
    # the spec must name the gadget the stop command removes
    assert start[start.index("--expect-name") + 1] == "disk"
    assert float(start[start.index("--wait") + 1]) > 0
    assert float(s["TimeoutStartSec"]) > float(start[start.index("--wait") + 1])
    assert command(s["ExecStop"], "disk") == ["/usr/local/bin/usbipx", "gadget", "remove", "disk"]


DISK = """
name = "disk"
id_vendor = 0x1d6b
id_product = 0x0104
[[configs]]
number = 1
functions = ["acm.a"]
[functions."acm.a"]
"""


def test_the_gadget_units_commands_build_and_remove_the_gadget(fs) -> None:
    """ExecStart then ExecStop of usbipx-gadget@disk, through the CLI on a fake configfs."""
    fs.add_real_directory(str(UNITS))
    s = unit("usbipx-gadget@.service")["Service"]
    fs.create_file("/etc/usbipx/gadgets/disk.toml", contents=DISK)
    fs.create_file("/etc/usbipx/gadgets/other.toml", contents=DISK)  # names "disk" too
    k = FakeConfigfs.build(fs, "/fake", udcs=("dummy_udc.0",))

    def run(line: str, instance: str):
        return CliRunner().invoke(app, command(line, instance)[1:], obj=State(sysfs=k))

    r = run(s["ExecStart"], "other")
    assert r.exit_code == 2 and "the gadget is named 'disk', not 'other'" in r.stderr
    assert k.ops == []
    r = run(s["ExecStart"], "disk")
    assert r.exit_code == 0, r.output
    # the spec names no UDC: the unit takes a free one
    assert k.path(f"{GADGETS}/disk/UDC").read_bytes() == b"dummy_udc.0\n"
    r = run(s["ExecStop"], "disk")
    assert r.exit_code == 0, r.output
    assert not k.path(f"{GADGETS}/disk").exists()


@pytest.mark.parametrize("name", sorted(p.name for p in UNITS.glob("*.service")))
def test_systemd_accepts_the_unit(name: str, tmp_path: Path) -> None:
    """systemd-analyze verify, with ExecStart pointing at this venv's usbipx.

    A template is verified as an instance: only then does systemd check its commands.
    """
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (Debian's systemd package) is needed for this test"
    text = (UNITS / name).read_text().replace(
        "/usr/local/bin/usbipx", str(Path(sys.executable).parent / "usbipx"))
    name = name.replace("@.", "@test.")
    (tmp_path / name).write_text(text)
    res = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / name)],
                         capture_output=True, text=True, timeout=60)
    problems = [line for line in (res.stdout + res.stderr).splitlines()
                if name in line or "Unknown" in line or "Failed" in line]
    assert res.returncode == 0 and not problems, res.stdout + res.stderr
