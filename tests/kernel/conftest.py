"""Kernel tier: runs inside the lab VM (scripts/lab), never on the host.

The session fixture loads the drivers once per boot; tests share one VM boot
and clean up after themselves (see ``lab`` helpers).
"""

from __future__ import annotations

import os
import subprocess

import pytest

if os.environ.get("USBIPX_IN_LAB") != "1":
    pytest.exit(
        "tests/kernel runs only inside the lab kernel: "
        "scripts/lab run -- .venv/bin/pytest tests/kernel", returncode=2,
    )

from labkit import load_drivers


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
