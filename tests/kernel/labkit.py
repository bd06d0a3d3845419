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


def tls_stat() -> dict[str, int]:
    """The kernel TLS counters (cumulative since boot).  Before the first kernel TLS
    socket the ``tls`` module is not loaded and there is no file: every counter is 0."""
    from collections import Counter

    path = Path("/proc/net/tls_stat")
    if not path.exists():
        return Counter()
    return Counter({k: int(v) for k, v in (line.split() for line in
                                           path.read_text().splitlines())})


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


def wait_port(port: int, timeout: float = 30.0, ns: str | None = None,
              host: str = "127.0.0.1") -> None:
    import socket

    def up() -> bool:
        if ns is not None:  # probe over the namespace's own loopback
            probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 1)"
            return subprocess.run(in_ns(ns, ["python3", "-c", probe]),
                                  capture_output=True).returncode == 0
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return True
        except OSError:
            return False

    wait_for(up, timeout, what=f"TCP port {port} to listen")


class Daemon:
    """A daemon subprocess (ours or Debian's) listening on a TCP port."""

    def __init__(self, argv: list[str], port: int, ns: str | None = None,
                 host: str = "127.0.0.1") -> None:
        self.argv = argv
        self.port = port
        self.log = Path(f"/tmp/daemon-{port}.log")
        with open(self.log, "w") as out:  # the child keeps its own copy
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_port(port, ns=ns, host=host)
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


def reset_usbip_ports_only(settle: bool = True) -> None:
    """Detach every vhci port and (``settle``) wait until every exported device is
    available again.  Not ``settle`` where a supervisor runs: it re-exports them at
    once, so "all available" may never be seen."""
    for port, _ in vhci_used_ports():
        with contextlib.suppress(OSError):
            (VHCI0 / "detach").write_text(str(port))
    for rec in Path("/var/run/vhci_hcd").glob("port*"):
        rec.unlink()

    def settled() -> bool:
        for st in [*Path("/sys/bus/usb/devices").glob("*/usbip_status"),
                   *Path("/sys/devices/platform").glob("usbip-vudc.*/usbip_status")]:
            with contextlib.suppress(OSError):
                if st.read_text().strip() == "2":
                    return False
        return True

    if settle:
        wait_for(settled, 30, what="exported devices to be available again")


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


# -- network namespaces: a "board" behind a firewall and a "server" -------

BOARD_IP = "10.77.0.2"
SERVER_IP = "10.77.0.1"


def netns_up(firewall: bool = True) -> None:
    """Namespaces board and server joined by veth; the board drops inbound TCP."""
    netns_down()
    for cmd in (
        ["ip", "netns", "add", "board"],
        ["ip", "netns", "add", "server"],
        ["ip", "link", "add", "vb", "type", "veth", "peer", "name", "vs"],
        ["ip", "link", "set", "vb", "netns", "board"],
        ["ip", "link", "set", "vs", "netns", "server"],
        ["ip", "-n", "board", "addr", "add", f"{BOARD_IP}/24", "dev", "vb"],
        ["ip", "-n", "server", "addr", "add", f"{SERVER_IP}/24", "dev", "vs"],
        ["ip", "-n", "board", "link", "set", "vb", "up"],
        ["ip", "-n", "server", "link", "set", "vs", "up"],
        ["ip", "-n", "board", "link", "set", "lo", "up"],
        ["ip", "-n", "server", "link", "set", "lo", "up"],
    ):
        sh(*cmd)
    if firewall:
        nft("board", """
            table inet fw {
                chain input {
                    type filter hook input priority 0; policy accept;
                    iifname "lo" accept
                    ct state established,related accept
                    tcp flags syn drop
                }
            }""")


def nft(ns: str, ruleset: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=ruleset, text=True,
                   check=True, capture_output=True)


def link_cut(ns: str = "board") -> None:
    """Drop every packet in and out of ``ns`` (the link is dead, nothing says so)."""
    nft(ns, """
        table inet cut {
            chain input { type filter hook input priority -10; policy drop; }
            chain output { type filter hook output priority -10; policy drop; }
        }""")


def link_restore(ns: str = "board") -> None:
    sh("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "cut", check=False)


def netns_down() -> None:
    for ns in ("board", "server"):
        sh("ip", "netns", "del", ns, check=False)


def in_ns(ns: str | None, argv: list[str]) -> list[str]:
    """``argv`` in network namespace ``ns``.  nsenter switches only the network
    namespace; ``ip netns exec`` would also remount /sys and hide configfs."""
    return argv if ns is None else ["nsenter", f"--net=/run/netns/{ns}", *argv]


# -- junk PDUs ------------------------------------------------------------

def junk_pdu(rng, valid: list[bytes]) -> bytes:
    """Random, truncated, oversized, bit-flipped or wrong-version PDUs."""
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 64))
    base = bytearray(rng.choice(valid))
    if kind == 1:  # truncated
        return bytes(base[: rng.randrange(1, len(base))])
    if kind == 2:  # oversized: a valid header followed by a flood
        return bytes(base[:8]) + rng.randbytes(rng.randrange(400, 4000))
    if kind == 3:  # a few flipped bytes
        for _ in range(rng.randrange(1, 5)):
            base[rng.randrange(len(base))] = rng.randrange(256)
        return bytes(base)
    if kind == 4:  # wrong version
        return b"\x01\x06" + bytes(base[2:])
    return bytes(base[:8]) + b"\xff" * 32  # an impossible bus id / short record


def flood(port: int, valid: list[bytes], count: int, seed: int = 1234,
          stalled: int = 30, during=None) -> int:
    """Send ``count`` junk PDUs (20 connections at a time) while ``stalled``
    clients sit on half a PDU, then call ``during()`` with them still
    connected; return how many PDUs were sent."""
    import random
    import socket

    rng = random.Random(seed)
    hold = [socket.create_connection(("127.0.0.1", port)) for _ in range(stalled)]
    for s in hold:
        s.sendall(valid[0][:5])
    sent = 0
    while sent < count:
        batch = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", port))
            # The server may have rejected the junk and closed already, and a
            # close with our bytes unread resets the connection: that is a fine
            # answer to junk, so a failed send or shutdown is not the test's
            # concern (the leak and still-serving checks are).
            with contextlib.suppress(OSError):
                s.sendall(junk_pdu(rng, valid))
                s.shutdown(socket.SHUT_WR)  # EOF: the server must not wait for more
            batch.append(s)
            sent += 1
        for s in batch:
            s.settimeout(5)
            with contextlib.suppress(OSError):
                s.recv(65536)
            s.close()
    if during is not None:
        during()
    for s in hold:
        s.close()
    return sent


def usbipx(*args: str, check: bool = True, ns: str | None = None,
           **kw) -> subprocess.CompletedProcess[str]:
    """Run the usbipx CLI (in network namespace ``ns`` if given)."""
    res = subprocess.run(in_ns(ns, [USBIPX, *args]), capture_output=True, text=True,
                         timeout=kw.pop("timeout", 180), **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"usbipx {' '.join(args)} failed ({res.returncode}): {res.stderr}")
    return res


def assert_vhci_disk_matches(data: bytes) -> None:
    dev = vhci_disk()
    assert read_block(dev, len(data)) == data, f"{dev} differs from the backing file"


def stub_status(busid: str) -> str:
    return Path(f"/sys/bus/usb/devices/{busid}/usbip_status").read_text().strip()


def vudc_status(vudc: str) -> str:
    return Path(f"/sys/devices/platform/{vudc}/usbip_status").read_text().strip()


# -- TLS credentials (the pki fixture of conftest) ---------------------------------

HOSTNAME = "localhost"
"""The name the lab's server certificate carries (with 127.0.0.1)."""


def creds(pki: dict[str, Path], name: str, ca: str = "ca") -> list[str]:
    d = pki[ca]
    return ["--cert", str(d / f"{name}.crt"), "--key", str(d / f"{name}.key"),
            "--ca", str(pki["ca"] / "ca.crt")]


def records() -> dict[int, str]:
    """usbipx's vhci port records (``/var/run/vhci_hcd/portN``), by port."""
    d = Path("/var/run/vhci_hcd")
    return {int(f.name[4:]): f.read_text() for f in d.glob("port*")} if d.is_dir() else {}


def kernel_crypto() -> list[dict[str, str]]:
    """The kernel's crypto algorithms (``/proc/crypto``), one dict of fields each."""
    return [dict((x.strip() for x in line.partition(":")[::2]) for line in block.splitlines())
            for block in Path("/proc/crypto").read_text().split("\n\n") if block.strip()]
