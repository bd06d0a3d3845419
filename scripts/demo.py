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
    # nsenter switches only the network namespace (ip netns exec would also
    # remount /sys and hide configfs from gadget commands).
    full = ["nsenter", f"--net=/run/netns/{ns}", *argv] if ns else list(argv)
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


def wait_for(pred: Callable[[], object], what: str, timeout: float = 60,
             interval: float = 0.2) -> object:
    deadline = time.monotonic() + timeout
    while not (val := pred()):
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}")
        time.sleep(interval)
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
    usbipx("gadget", "remove", "stub")
    usbipx("gadget", "remove", "vudc")


def status(sock: str) -> dict[str, dict[str, object]]:
    """The supervisor's status, asked in-process: polling through the CLI would
    add an interpreter start (seconds on the emulated CPU) to every figure."""
    from usbipx.daemon.control import query_status

    return {e["export"]: e for e in query_status(sock)["exports"]}


def all_exported(sock: str, n: int = 2) -> bool:
    st = status(sock)
    return len(st) == n and all(e["state"] == "exported" for e in st.values())


def read_both(stub: Path, vudc: Path) -> None:
    """Both exported disks read back on the application side, whole."""
    disks = wait_for(lambda: len(vhci_disks()) == 2 and vhci_disks(), "both disks")
    want = {stub.read_bytes(): stub.name, vudc.read_bytes(): vudc.name}
    for dev in disks:  # type: ignore[union-attr]
        with open(dev, "rb", buffering=0) as fh:
            got = fh.read(DISK_MB << 20)
        which = want.get(got)
        print(f"  {dev} on the application side: {DISK_MB} MiB "
              f"{'identical to ' + which if which else 'MATCHES NO BACKING FILE'}", flush=True)
        if not which:
            raise SystemExit("demo: data read back differs from the backing files")


def supervised(host_busid: str) -> None:
    banner("3. The supervisor on the board: one worker per device, healing itself")
    note("the board exports a real USB device (stub) and provisions a gadget (vUDC) at boot")
    stub_backing = make_disk("hw")
    vudc_backing = make_disk("emulated")
    usbipx("gadget", "apply", str(disk_spec("hw", stub_backing, 0x0104, "dummy_udc.0")))
    wait_for(lambda: Path(f"/sys/bus/usb/devices/{host_busid}/driver").exists(), host_busid)
    spec = disk_spec("emulated", vudc_backing, 0x0105, "auto").read_text()
    (WORK / "emulated.toml").write_text(spec.replace('udc = "auto"\n', ""))
    sock = str(WORK / "supervisor.sock")
    cfg = WORK / "supervisor.toml"
    cfg.write_text(f"""[server]
host = "{SERVER}"

[[export]]
busid = "{host_busid}"

[[export]]
gadget = "{WORK / 'emulated.toml'}"

[supervisor]
control_socket = "{sock}"
state_dir = "{WORK / 'state'}"
""")
    run("cat", str(cfg))
    print(f"[board] $ usbipx supervisor run -c {cfg} &", flush=True)
    log = open(WORK / "supervisor.log", "w")  # noqa: SIM115 - the child writes to it
    sup = subprocess.Popen(["nsenter", "--net=/run/netns/board", USBIPX, "supervisor", "run",
                            "-c", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    wait_for(lambda: Path(sock).exists() and all_exported(sock), "both exports", 120, 0.05)
    note(f"both exported {time.monotonic() - t0:.1f} s after start")
    usbipx("supervisor", "status", "-s", sock)
    usbipx("port", ns="server")
    read_both(stub_backing, vudc_backing)

    note("fault 1: the stub device's worker is killed (kill -9)")
    old = int(status(sock)[f"busid:{host_busid}"]["pid"])  # type: ignore[arg-type]
    os.kill(old, 9)
    t0 = time.monotonic()
    wait_for(lambda: (e := status(sock)[f"busid:{host_busid}"])["pid"] not in (None, old)
             and e["state"] == "exported", "a new worker", 30, 0.05)
    note(f"a new worker adopted the live export after {time.monotonic() - t0:.2f} s "
         "(the kernel kept the connection: nothing was exported twice)")
    usbipx("supervisor", "status", "-s", sock)
    read_both(stub_backing, vudc_backing)

    note("fault 2: the board's link dies silently (every packet dropped, nothing says so)")
    run("nft", "-f", "-", ns="board", show=False, input="""
        table inet cut {
            chain input { type filter hook input priority -10; policy drop; }
            chain output { type filter hook output priority -10; policy drop; }
        }""")
    t0 = time.monotonic()
    wait_for(lambda: not any(e["state"] == "exported" for e in status(sock).values()),
             "the loss to be noticed", 60, 0.05)
    note(f"loss noticed by keepalive after {time.monotonic() - t0:.1f} s")
    usbipx("supervisor", "status", "-s", sock)
    time.sleep(5)
    run("nft", "delete", "table", "inet", "cut", ns="board")
    t0 = time.monotonic()
    wait_for(lambda: all_exported(sock), "the re-export", 60, 0.05)
    note(f"link back: both devices exported again after {time.monotonic() - t0:.1f} s")
    read_both(stub_backing, vudc_backing)

    note("clean shutdown: SIGTERM")
    sup.terminate()
    sup.wait(90)
    log.close()
    print("  supervisor log (last lines):")
    for line in (WORK / "supervisor.log").read_text().splitlines()[-12:]:
        print(f"    {line}", flush=True)
    usbipx("port", ns="server")
    run("readlink", f"/sys/bus/usb/devices/{host_busid}/driver")
    usbipx("gadget", "list")
    usbipx("gadget", "remove", "hw")
    if vhci_disks() or Path("/sys/kernel/config/usb_gadget/emulated").exists():
        raise SystemExit("demo: the supervisor did not clean up")


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
    supervised(host_busid)
    stop_pid("/run/usbipx-usbipa.pid")
    for ns in ("board", "server"):
        run("ip", "netns", "del", ns, show=False)
    banner("demo complete: every disk read back identical to its backing file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
