"""Kernel tier: runs inside the lab VM (scripts/lab), never on the host.

The session fixture loads the drivers once per boot; tests share one VM boot
and clean up after themselves (see ``lab`` helpers).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

if os.environ.get("USBIPX_IN_LAB") != "1":
    pytest.exit(
        "tests/kernel runs only inside the lab kernel: "
        "scripts/lab run -- .venv/bin/pytest tests/kernel", returncode=2,
    )

from labkit import (
    USBIPX,
    Daemon,
    driver_of,
    free_tcp_port,
    in_ns,
    load_drivers,
    make_disk,
    mass_storage_gadget,
    netns_down,
    reset_usbip,
    usb_busid_on_udc,
    wait_for,
)

DISK_MB = 4


@pytest.fixture(scope="session", autouse=True)
def lab_drivers() -> None:
    """configfs, libcomposite, dummy_hcd (8 UDCs), usbip-host, vhci-hcd, usbip-vudc (8)."""
    load_drivers()


@pytest.fixture
def run():
    """Run a command, return CompletedProcess (text); never raises on failure."""

    def _run(*cmd: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)

    return _run


@pytest.fixture(autouse=True)
def clean():
    """Every test starts and ends with no gadgets, stubs, vhci ports or namespaces."""
    reset_usbip()
    yield
    reset_usbip()
    netns_down()


@pytest.fixture
def stub_disk(tmp_path: Path):
    """A mass-storage gadget on dummy_udc.0: a USB disk on this host, not yet bound."""
    backing = tmp_path / "disk.img"
    data = make_disk(backing, DISK_MB)
    mass_storage_gadget("stubdisk", backing, "dummy_udc.0")
    busid = usb_busid_on_udc("dummy_udc.0")
    wait_for(lambda: driver_of(busid) == "usb", what=f"{busid} to enumerate")
    return busid, data


@pytest.fixture
def vudc_disk(tmp_path: Path):
    """A mass-storage gadget bound to usbip-vudc.0."""
    backing = tmp_path / "vdisk.img"
    data = make_disk(backing, DISK_MB)
    mass_storage_gadget("vudcdisk", backing, "usbip-vudc.0", product=0x0105)
    return "usbip-vudc.0", data


@pytest.fixture
def daemons():
    """Start daemons: ``start(kind, *args, ns=None)`` with kind usbipd, usbipa or c-usbipd."""
    started: list[Daemon] = []

    def start(kind: str, *extra: str, ns: str | None = None, host: str = "127.0.0.1") -> Daemon:
        port = free_tcp_port()
        if kind == "c-usbipd":
            argv = ["usbipd", "-t", str(port), *extra]
        else:
            argv = [USBIPX, "--debug", kind, "-t", str(port), *extra]
        d = Daemon(in_ns(ns, argv), port, ns=ns, host=host)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
