"""The systemd units shipped in daemon/systemd: what they say, and that systemd accepts them."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("name", sorted(p.name for p in UNITS.glob("*.service")))
def test_systemd_accepts_the_unit(name: str, tmp_path: Path) -> None:
    """systemd-analyze verify, with ExecStart pointing at this venv's usbipx."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (Debian's systemd package) is needed for this test"
    text = (UNITS / name).read_text().replace(
        "/usr/local/bin/usbipx", str(Path(sys.executable).parent / "usbipx"))
    (tmp_path / name).write_text(text)
    res = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / name)],
                         capture_output=True, text=True, timeout=60)
    problems = [line for line in (res.stdout + res.stderr).splitlines()
                if name in line or "Unknown" in line or "Failed" in line]
    assert res.returncode == 0 and not problems, res.stdout + res.stderr
