"""Helpers for kernel-tier tests: drivers, test gadgets, block devices, processes.

Test scaffolding only: builds gadgets with plain configfs writes so that the
foundation tests do not depend on the gadget module they may be testing.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

CONFIGFS = Path("/sys/kernel/config")
GADGETS = CONFIGFS / "usb_gadget"
NUM_UDC = 8


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def load_drivers() -> None:
    sh("modprobe", "configfs")
    if not os.path.ismount(CONFIGFS):
        sh("mount", "-t", "configfs", "none", str(CONFIGFS))
    sh("modprobe", "libcomposite")
    sh("modprobe", "dummy_hcd", f"num={NUM_UDC}")
    sh("modprobe", "usbip-host")
    sh("modprobe", "vhci-hcd")
    sh("modprobe", "usbip-vudc", f"num={NUM_UDC}")
    # Storage drivers are loaded by mdev on demand; preload to save time.
    sh("modprobe", "usb-storage")
    sh("modprobe", "sd_mod")


def wait_for(pred, timeout: float = 15.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        val = pred()
        if val:
            return val
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def make_disk(path: Path, size_mb: int = 4) -> bytes:
    data = os.urandom(size_mb << 20)
    path.write_bytes(data)
    return data


def write(p: Path, value: str) -> None:
    p.write_text(value)


def mass_storage_gadget(name: str, backing: Path, udc: str | None = None,
                        vendor: int = 0x1D6B, product: int = 0x0104) -> Path:
    """A one-LUN mass-storage gadget, bound to ``udc`` if given."""
    g = GADGETS / name
    g.mkdir()
    write(g / "idVendor", f"0x{vendor:04x}")
    write(g / "idProduct", f"0x{product:04x}")
    (g / "strings/0x409").mkdir()
    write(g / "strings/0x409/manufacturer", "usbipx lab")
    write(g / "strings/0x409/product", f"disk {name}")
    write(g / "strings/0x409/serialnumber", name)
    f = g / "functions/mass_storage.0"
    f.mkdir()
    write(f / "lun.0/file", str(backing))
    c = g / "configs/c.1"
    c.mkdir()
    (c / "mass_storage.0").symlink_to(f)
    if udc:
        write(g / "UDC", udc)
    return g


def remove_gadget(g: Path) -> None:
    """Tear a gadget down in the order the kernel requires."""
    if not g.exists():
        return
    with contextlib.suppress(OSError):
        write(g / "UDC", "\n")
    for c in (g / "configs").iterdir():
        for link in c.iterdir():
            if link.is_symlink():
                link.unlink()
        for s in (c / "strings").iterdir():
            s.rmdir()
        c.rmdir()
    for f in (g / "functions").iterdir():
        f.rmdir()
    for s in (g / "strings").iterdir():
        s.rmdir()
    g.rmdir()


def remove_all_gadgets() -> None:
    for g in GADGETS.iterdir():
        remove_gadget(g)


def usb_busid_on_udc(udc: str) -> str:
    """Host-side bus id of the device a gadget on dummy_udc.K shows as."""
    k = int(udc.rsplit(".", 1)[1])
    hcd = Path(f"/sys/devices/platform/dummy_hcd.{k}")
    usb = next(p.name for p in hcd.iterdir() if p.name.startswith("usb"))
    return f"{usb[3:]}-1"


def block_devices_under(fragment: str) -> list[str]:
    """/dev names of whole disks whose sysfs device path contains ``fragment``."""
    out = []
    for b in Path("/sys/block").iterdir():
        if fragment in os.path.realpath(b / "device"):
            out.append(f"/dev/{b.name}")
    return out


def read_block(dev: str, size: int) -> bytes:
    with open(dev, "rb", buffering=0) as fh:
        return fh.read(size)


# -- processes and USB/IP state -------------------------------------------

USBIPX = str(Path(__import__("sys").executable).parent / "usbipx")
VHCI0 = Path("/sys/devices/platform/vhci_hcd.0")
STUB = Path("/sys/bus/usb/drivers/usbip-host")


def free_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    import socket

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False

    wait_for(up, timeout, what=f"TCP port {port} to listen")


class Daemon:
    """A daemon subprocess (ours or Debian's) listening on a TCP port."""

    def __init__(self, argv: list[str], port: int) -> None:
        self.argv = argv
        self.port = port
        self.log = Path(f"/tmp/daemon-{port}.log")
        with open(self.log, "w") as out:  # the child keeps its own copy
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_port(port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"{argv} did not start: {self.output()}") from None

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def vhci_used_ports() -> list[tuple[int, str]]:
    """(port, local busid) of every vhci port in use."""
    out = []
    for f in sorted(VHCI0.glob("status*")):
        for line in f.read_text().splitlines()[1:]:
            cols = line.split()
            if cols[2] != "004":
                out.append((int(cols[1]), cols[6]))
    return out


def reset_usbip() -> None:
    """Detach every vhci port, unbind every stub device, remove every gadget."""
    for port, _ in vhci_used_ports():
        with contextlib.suppress(OSError):
            (VHCI0 / "detach").write_text(str(port))
    for rec in Path("/var/run/vhci_hcd").glob("port*"):
        rec.unlink()
    for dev in STUB.iterdir():
        if dev.is_symlink() and "-" in dev.name:
            with contextlib.suppress(OSError):
                (STUB / "unbind").write_text(dev.name)
            with contextlib.suppress(OSError):
                (STUB / "match_busid").write_text(f"del {dev.name}")
            with contextlib.suppress(OSError):
                (STUB / "rebind").write_text(dev.name)
    remove_all_gadgets()


def driver_of(busid: str) -> str | None:
    link = Path(f"/sys/bus/usb/devices/{busid}/driver")
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def vhci_disk(timeout: float = 30.0) -> str:
    """The block device that appeared on the vhci side."""
    devs = wait_for(lambda: block_devices_under("vhci_hcd"), timeout, 0.2,
                    "a disk on a vhci_hcd port")
    return devs[0]
