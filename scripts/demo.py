"""The usbipx lab demo, run inside the lab VM by scripts/demo.

Prints a transcript: every command as ``$ ...`` with its output.  A
mass-storage gadget on dummy_hcd stands in for USB hardware; disks are read
back on the vhci side and compared with their backing files.  Exits non-zero
if any step does not do what it should.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
USBIPX = str(VENV_BIN / "usbipx")
WORK = Path("/tmp/usbipx-demo")
BOARD, SERVER = "10.77.0.2", "10.77.0.1"
DISK_MB = 16


def banner(text: str) -> None:
    print(f"\n{'=' * 78}\n{text}\n{'=' * 78}", flush=True)


def note(text: str) -> None:
    print(f"# {text}", flush=True)


def run(*argv: str, ns: str | None = None, check: bool = True, show: bool = True,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command without a shell and print it like a terminal session."""
    shown = ["usbipx" if a == USBIPX else a for a in argv]
    prefix = f"[{ns}] " if ns else ""
    full = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    if show:
        print(f"{prefix}$ {shlex.join(shown)}", flush=True)
    res = subprocess.run(full, capture_output=True, text=True, input=input, timeout=300)
    if show:
        for line in (res.stdout + res.stderr).rstrip().splitlines():
            print(f"  {line}", flush=True)
    if check and res.returncode != 0:
        raise SystemExit(f"demo: step failed (exit {res.returncode}): {shlex.join(shown)}")
    return res


def usbipx(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(USBIPX, *args, ns=ns, check=check)


def wait_for(pred: Callable[[], object], what: str, timeout: float = 60) -> object:
    deadline = time.monotonic() + timeout
    while not (val := pred()):
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}")
        time.sleep(0.2)
    return val


def vhci_disks() -> list[str]:
    return [f"/dev/{b.name}" for b in Path("/sys/block").iterdir()
            if "vhci_hcd" in os.path.realpath(b / "device")]


def check_disk(backing: Path) -> None:
    """Read the disk that appeared on the vhci side and compare it with its file."""
    dev = wait_for(vhci_disks, "the disk on the vhci side")[0]  # type: ignore[index]
    want = backing.read_bytes()
    with open(dev, "rb", buffering=0) as fh:
        got = fh.read(len(want))
    same = got == want
    digest = hashlib.sha256(got).hexdigest()[:16]
    print(f"  read {len(got) >> 20} MiB from {dev} on the application side: sha256 {digest}... "
          f"{'identical to' if same else 'DIFFERENT FROM'} {backing.name}", flush=True)
    if not same:
        raise SystemExit("demo: data read back differs from the backing file")


def make_disk(name: str) -> Path:
    path = WORK / f"{name}.img"
    path.write_bytes(os.urandom(DISK_MB << 20))
    return path


def disk_spec(name: str, backing: Path, product: int, udc: str) -> Path:
    spec = WORK / f"{name}.toml"
    spec.write_text(f'''name = "{name}"
udc = "{udc}"
id_vendor = 0x1d6b
id_product = 0x{product:04x}

[strings]
manufacturer = "usbipx demo"
product = "{name} disk"
serialnumber = "{product:04x}"

[[configs]]
number = 1
max_power = 100
functions = ["mass_storage.0"]

[functions."mass_storage.0".lun.0]
file = "{backing}"
removable = true
''')
    return spec


def load_drivers() -> None:
    banner("The lab: Debian's stock kernel in QEMU, no USB hardware")
    run("uname", "-sr")
    for args in (["configfs"], ["libcomposite"], ["dummy_hcd", "num=2"], ["usbip-host"],
                 ["vhci-hcd"], ["usbip-vudc", "num=2"]):
        run("modprobe", *args, show=False)
    if not os.path.ismount("/sys/kernel/config"):
        run("mount", "-t", "configfs", "none", "/sys/kernel/config", show=False)
    note("loaded configfs, libcomposite, dummy_hcd num=2, usbip-host, vhci-hcd, usbip-vudc num=2")
    usbipx("gadget", "udc")


def classic(host_busid: str) -> None:
    banner("1. The classic operation: usbipd on the device side, attach on the application side")
    backing = make_disk("disk")
    note(f"a mass-storage gadget on dummy_udc.0 stands in for a USB disk ({DISK_MB} MiB)")
    usbipx("gadget", "apply", str(disk_spec("disk", backing, 0x0104, "dummy_udc.0")))
    wait_for(lambda: Path(f"/sys/bus/usb/devices/{host_busid}/driver").exists(), "1-1")
    usbipx("list", "-l")
    usbipx("bind", "-b", host_busid)
    usbipx("usbipd", "-D", "-P", "/run/usbipx-usbipd.pid")
    wait_for(lambda: Path("/run/usbipx-usbipd.pid").exists(), "usbipd")
    usbipx("list", "-r", "127.0.0.1")
    usbipx("attach", "-r", "127.0.0.1", "-b", host_busid)
    check_disk(backing)
    usbipx("port")
    port = usbipx("--json", "port", check=True).stdout
    usbipx("detach", "-p", str(json.loads(port)[0]["port"]))
    usbipx("port")
    usbipx("unbind", "-b", host_busid)
    run("readlink", f"/sys/bus/usb/devices/{host_busid}/driver")
    stop_pid("/run/usbipx-usbipd.pid")
    usbipx("gadget", "remove", "disk")


def export(host_busid: str) -> None:
    banner("2. Exporting from the device side: the board connects out to usbipa")
    note("two network namespaces joined by veth: 'server' (application side, "
         f"{SERVER}) and 'board' (device side, {BOARD}), whose firewall drops inbound TCP")
    for cmd in (
        "ip netns add board", "ip netns add server",
        "ip link add vb type veth peer name vs",
        "ip link set vb netns board", "ip link set vs netns server",
        f"ip -n board addr add {BOARD}/24 dev vb", f"ip -n server addr add {SERVER}/24 dev vs",
        "ip -n board link set vb up", "ip -n server link set vs up",
        "ip -n board link set lo up", "ip -n server link set lo up",
    ):
        run(*cmd.split(), show=False)
    run("nft", "-f", "-", ns="board", show=False, input="""
        table inet fw {
            chain input {
                type filter hook input priority 0; policy accept;
                iifname "lo" accept
                ct state established,related accept
                tcp flags syn drop
            }
        }""")
    run("nft", "list", "ruleset", ns="board")
    stub_backing = make_disk("stub")
    vudc_backing = make_disk("vudc")
    usbipx("gadget", "apply", str(disk_spec("stub", stub_backing, 0x0104, "dummy_udc.0")))
    usbipx("gadget", "apply", str(disk_spec("vudc", vudc_backing, 0x0105, "usbip-vudc.0")))
    wait_for(lambda: Path(f"/sys/bus/usb/devices/{host_busid}/driver").exists(), host_busid)
    usbipx("usbipa", "-D", "-P", "/run/usbipx-usbipa.pid", "--allow", "10.77.0.0/24",
           ns="server")
    wait_for(lambda: Path("/run/usbipx-usbipa.pid").exists(), "usbipa")
    note("the application side cannot reach the board: attach is blocked by its firewall")
    usbipx("usbipd", "-D", "-P", "/run/usbipx-usbipd.pid", ns="board")
    usbipx("bind", "-b", host_busid)
    res = usbipx("attach", "-r", BOARD, "-b", host_busid, ns="server", check=False)
    if res.returncode == 0:
        raise SystemExit("demo: attach through the firewall should have failed")
    usbipx("unbind", "-b", host_busid)
    stop_pid("/run/usbipx-usbipd.pid")
    note("so the board connects out instead (stub mode: a real USB device via usbip-host)")
    usbipx("connect", "-r", SERVER, "-b", host_busid, ns="board")
    check_disk(stub_backing)
    note("and a gadget the board emulates (vUDC mode)")
    usbipx("list", "-d")
    usbipx("connect", "-r", SERVER, "-b", "usbip-vudc.0", "--device", ns="board")
    wait_for(lambda: len(vhci_disks()) == 2, "the second disk")
    usbipx("port", ns="server")
    note("Debian's usbip port reads the same records")
    run("usbip", "port")
    for dev in vhci_disks():
        with open(dev, "rb", buffering=0) as fh:
            head = fh.read(1 << 20)
        which = "stub" if head == stub_backing.read_bytes()[: 1 << 20] else "vudc"
        print(f"  {dev}: first MiB matches {which}.img", flush=True)
    usbipx("disconnect", "-r", SERVER, "-b", host_busid, ns="board")
    usbipx("disconnect", "-r", SERVER, "-b", "usbip-vudc.0", "--device", ns="board")
    usbipx("port", ns="server")
    run("readlink", f"/sys/bus/usb/devices/{host_busid}/driver")
    stop_pid("/run/usbipx-usbipa.pid")
    usbipx("gadget", "remove", "stub")
    usbipx("gadget", "remove", "vudc")
    for ns in ("board", "server"):
        run("ip", "netns", "del", ns, show=False)


def stop_pid(pidfile: str) -> None:
    pid = int(Path(pidfile).read_text())
    os.kill(pid, 15)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), f"pid {pid} to exit", 30)


def main() -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    load_drivers()
    host_busid = "1-1"  # dummy_hcd.0's first port: where dummy_udc.0's gadget shows up
    classic(host_busid)
    export(host_busid)
    banner("demo complete: every disk read back identical to its backing file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
