"""Benchmarks run inside the lab VM by scripts/bench.  Prints figures and ratios.

Every comparison is measured in the same VM run: usbipx against Debian's C
tools, or usbipx against itself (16 exports vs one).  The VM emulates its
CPU (TCG), which makes CPU-bound work (interpreter start-up above all) some
40x slower than on hardware; ratios are what to read, not absolute times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "kernel"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import labkit as lab

from usbipx import log
from usbipx.client import export_device, unexport_device
from usbipx.drivers import device_driver
from usbipx.remote import Remote
from usbipx.sysfs import Sysfs

RESULTS: list[tuple[str, str, str]] = []


def result(name: str, value: str, goal: str) -> None:
    RESULTS.append((name, value, goal))
    print(f"  {name}: {value}   (goal {goal})", flush=True)


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


NCPU = os.cpu_count() or 1


def vm_cpu() -> float:
    """CPU-seconds the whole VM has been busy (every CPU, kernel included)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_costs(argv: list[str], runs: int = 5) -> tuple[float, float]:
    """Median wall and CPU seconds of a fresh process running ``argv``."""
    import resource

    walls, cpus = [], []
    for _ in range(runs):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
        walls.append(time.monotonic() - t0)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def typer_start() -> tuple[float, float]:
    """Wall and CPU seconds of an interpreter that imports typer and exits: what
    any typer CLI pays before its own code runs."""
    return process_costs([sys.executable, "-c", "import typer"])


def devlist_rate(load: str, port: int, n: int, k: int) -> float:
    out = subprocess.run([load, str(port), str(n), str(k)], capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[0]) / float(out[1])


def bench_devlist(load: str) -> None:
    section("DEVLIST requests per second: usbipx usbipd vs Debian's usbipd")
    disk = Path("/tmp/bench-disk.img")
    lab.make_disk(disk, 1)
    lab.mass_storage_gadget("bench", disk, "dummy_udc.0")
    busid = lab.usb_busid_on_udc("dummy_udc.0")
    lab.wait_for(lambda: lab.driver_of(busid) == "usb", what="the bench device")
    lab.usbipx("bind", "-b", busid)
    ours = lab.Daemon([lab.USBIPX, "usbipd", "-t", "3301"], 3301)
    theirs = lab.Daemon(["usbipd", "-t", "3302"], 3302)
    try:
        for d in (ours, theirs):  # warm up
            devlist_rate(load, d.port, 5, 1)
        rates: dict[str, list[float]] = {"usbipx": [], "c": []}
        for _ in range(3):  # interleaved rounds, so drift hits both alike
            rates["usbipx"].append(devlist_rate(load, ours.port, 100, 4))
            rates["c"].append(devlist_rate(load, theirs.port, 100, 4))
        ours_rate = statistics.median(rates["usbipx"])
        c_rate = statistics.median(rates["c"])
        print(f"  usbipx usbipd: {ours_rate:.0f} req/s   Debian usbipd: {c_rate:.0f} req/s "
              f"(4 clients x 100 requests, median of 3 rounds)")
        result("DEVLIST throughput usbipx/C", f"{ours_rate / c_rate:.2f}x", ">= 3x")
    finally:
        ours.stop()
        theirs.stop()
        lab.reset_usbip()


def time_to_usable(start: float) -> float:
    dev = lab.vhci_disk(60)
    lab.read_block(dev, 4096)
    return time.monotonic() - start


def bench_connect(rounds: int) -> None:
    section("connect -> disk usable on the application side, vs Debian's bind + attach")
    disk = Path("/tmp/bench-disk.img")
    lab.make_disk(disk, 4)
    lab.mass_storage_gadget("bench", disk, "dummy_udc.0")
    busid = lab.usb_busid_on_udc("dummy_udc.0")
    lab.wait_for(lambda: lab.driver_of(busid) == "usb", what="the bench device")
    usbipa = lab.Daemon([lab.USBIPX, "usbipa", "-t", "3303"], 3303)
    c_usbipd = lab.Daemon(["usbipd", "-t", "3304"], 3304)
    ours: list[float] = []
    inproc: list[float] = []
    theirs: list[float] = []
    host = device_driver(Sysfs(), vudc=False)
    try:
        for _ in range(rounds):
            t0 = time.monotonic()
            lab.usbipx("-t", "3303", "connect", "-r", "127.0.0.1", "-b", busid)
            ours.append(time_to_usable(t0))
            lab.usbipx("-t", "3303", "disconnect", "-r", "127.0.0.1", "-b", busid)
            lab.wait_for(lambda: not lab.vhci_used_ports(), what="port free")
            t0 = time.monotonic()
            res = export_device(Remote.tcp("127.0.0.1", 3303), busid, host)
            inproc.append(time_to_usable(t0))
            unexport_device(Remote.tcp("127.0.0.1", 3303), busid, host)
            host.release(res.lease)
            lab.wait_for(lambda: not lab.vhci_used_ports(), what="port free")
            t0 = time.monotonic()
            subprocess.run(["usbip", "bind", "-b", busid], check=True, capture_output=True)
            subprocess.run(["usbip", "-t", "3304", "attach", "-r", "127.0.0.1", "-b", busid],
                           check=True, capture_output=True)
            theirs.append(time_to_usable(t0))
            lab.reset_usbip_ports_only()
            subprocess.run(["usbip", "unbind", "-b", busid], check=True, capture_output=True)
            lab.wait_for(lambda: lab.driver_of(busid) == "usb", what="driver back")
        o, i, t = (statistics.median(x) for x in (ours, inproc, theirs))
        print(f"  usbipx connect (CLI): {o:.2f} s   the same operation in-process: {i:.2f} s   "
              f"Debian bind+attach: {t:.2f} s")
        print(f"  (median of {rounds}; each until the disk reads on the application side; "
              "the CLI figure includes starting a Python interpreter on an emulated CPU)")
        result("connect-to-usable usbipx CLI/C", f"{o / t:.2f}x", "<= 1.3x")
        bare = process_costs([sys.executable, "-c", "pass"])[0]
        typer_wall = typer_start()[0]
        print(f"  the least a typer CLI can reach here: interpreter {bare:.2f} s + import typer "
              f"{typer_wall - bare:.2f} s + the in-process export = {(i + typer_wall) / t:.2f}x C")
        result("connect-to-usable in-process/C", f"{i / t:.2f}x", "<= 1.0x")
    finally:
        usbipa.stop()
        c_usbipd.stop()
        lab.reset_usbip()


def _export_all(busids: list[str], port: int) -> float:
    """Export ``busids`` concurrently in-process; seconds until all are attached on
    the application side."""
    sysfs = Sysfs()
    errors: list[BaseException] = []

    def one(b: str) -> None:
        try:
            export_device(Remote.tcp("127.0.0.1", port), b,
                          device_driver(sysfs, b.startswith("usbip-vudc")))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(b,)) for b in busids]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"exports failed: {errors}")
    # usbipa replies before it attaches (the reply must precede the kernel's
    # traffic on that socket), so the last ports appear just after the replies.
    lab.wait_for(lambda: len(lab.vhci_used_ports()) == len(busids), 30, 0.02,
                 "every export on a vhci port")
    return time.monotonic() - t0


def _c_reference(busids: list[str]) -> tuple[float, float]:
    """Seconds until usable for one and for all ``busids`` with Debian's tools."""
    stub = lab.Daemon(["usbipd", "-t", "3306"], 3306)
    vudc = lab.Daemon(["usbipd", "-e", "-t", "3307"], 3307)
    stubs = [b for b in busids if not b.startswith("usbip-vudc")]
    try:
        for b in stubs:
            if lab.driver_of(b) != "usbip-host":
                subprocess.run(["usbip", "bind", "-b", b], check=True, capture_output=True,
                               timeout=60)
        out = []
        for targets in (busids[:1], busids):
            t0 = time.monotonic()
            procs = [subprocess.Popen(
                ["usbip", "-t", "3307" if b.startswith("usbip-vudc") else "3306", "attach",
                 "-r", "127.0.0.1", "-d" if b.startswith("usbip-vudc") else "-b", b],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                for b in targets]
            # Debian's attach is not safe against itself: concurrent ones may pick the
            # same port.  Bounded waits, so a stuck C tool cannot stall the bench.
            failed = []
            deadline = time.monotonic() + 120
            for b, p in zip(targets, procs, strict=True):
                try:
                    _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    _, err = p.communicate()
                    err = "still running after 120 s"
                if p.returncode != 0:
                    failed.append(f"{b}: {err.strip()}")
            if failed:
                raise RuntimeError("C attach failed: " + "; ".join(failed))
            want = len(targets)
            disks = lab.wait_for(lambda want=want: (d := lab.block_devices_under(
                "vhci_hcd")) and len(d) == want and d, 180, 0.1, "disks")
            for d in disks:
                lab.read_block(d, 4096)
            out.append(time.monotonic() - t0)
            lab.reset_usbip_ports_only()
            lab.wait_for(lambda: not lab.block_devices_under("vhci_hcd"), 60, 0.2, "disks")
        return out[0], out[1]
    finally:
        stub.stop()
        vudc.stop()


def _cli_connects(busids: list[str], port: int, usable) -> float:
    """Start one `usbipx connect` process per device at once, as a boot script does;
    seconds until every disk reads on the application side.  Any failure is fatal:
    a slow start must never turn into a failed export."""
    t0 = time.monotonic()
    procs = [subprocess.Popen([lab.USBIPX, "-t", str(port), "connect", "-r", "127.0.0.1",
                               "-b", b], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for b in busids]
    failed = []
    for b, p in zip(busids, procs, strict=True):
        try:
            _, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if p.returncode != 0:
            failed.append(f"{b}: {err.strip()}")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(busids)} CLI connects failed: {failed}")
    took = usable(len(busids), t0)
    lab.reset_usbip_ports_only()
    lab.wait_for(lambda: not lab.block_devices_under("vhci_hcd"), 60, 0.2, "disks to go")
    return took


def bench_concurrent(rounds: int) -> None:
    section("16 concurrent exports (8 stub + 8 vUDC) vs one, to one usbipa")
    busids = []
    for k in range(lab.NUM_UDC):
        for kind, udc in (("s", f"dummy_udc.{k}"), ("v", f"usbip-vudc.{k}")):
            disk = Path(f"/tmp/bench-{kind}{k}.img")
            lab.make_disk(disk, 1)
            lab.mass_storage_gadget(f"{kind}{k}", disk, udc, product=0x0300 + k)
            busids.append(lab.usb_busid_on_udc(udc) if kind == "s" else udc)
    for b in busids:
        if not b.startswith("usbip-vudc"):
            lab.wait_for(lambda b=b: lab.driver_of(b) == "usb", 60, what=b)
    usbipa = lab.Daemon([lab.USBIPX, "usbipa", "-t", "3305"], 3305)
    one_t: list[float] = []
    all_t: list[float] = []
    one_u: list[float] = []
    all_u: list[float] = []
    # CPU-seconds the VM spent (kernel included) on each: one export's CPU times
    # 16, spread over every CPU, is the least wall time 16 can take here.
    cpu: dict[str, list[float]] = {"one_t": [], "one_u": [], "all_u": []}

    def usable(n: int, t0: float) -> float:
        disks = lab.wait_for(lambda: (d := lab.block_devices_under("vhci_hcd")) and
                             len(d) == n and d, 180, 0.1, f"{n} disks")
        for d in disks:
            lab.read_block(d, 4096)
        return time.monotonic() - t0

    try:
        for _ in range(rounds):
            for targets, hs, us in ((busids[:1], one_t, one_u), (busids, all_t, all_u)):
                c0 = vm_cpu()
                t0 = time.monotonic()
                hs.append(_export_all(targets, 3305))
                c1 = vm_cpu()
                us.append(usable(len(targets), t0))
                c2 = vm_cpu()
                if len(targets) == 1:
                    cpu["one_t"].append(c1 - c0)
                    cpu["one_u"].append(c2 - c0)
                else:
                    cpu["all_u"].append(c2 - c0)
                lab.reset_usbip_ports_only()
                lab.wait_for(lambda: not lab.block_devices_under("vhci_hcd"), 60, 0.2,
                             "disks to go")
        o, a = statistics.median(one_t), statistics.median(all_t)
        ou, au = statistics.median(one_u), statistics.median(all_u)
        print(f"  handshake (connect, EXPORT, vhci attach, handoff): one {o:.2f} s, "
              f"16 concurrent {a:.2f} s")
        print(f"  until every disk reads on the application side: one {ou:.2f} s, "
              f"16 concurrent {au:.2f} s   (in-process, median of {rounds})")
        result("16-way exports usable / one", f"{au / ou:.2f}x", "<= 2x")
        result("16-way handshakes / one", f"{a / o:.2f}x", "<= 2x")
        hs_cpu, one_cpu = statistics.median(cpu["one_t"]), statistics.median(cpu["one_u"])
        print(f"  CPU bound: one handshake takes {hs_cpu:.2f} CPU-s and one export until usable "
              f"{one_cpu:.2f} CPU-s; 16 of them on {NCPU} CPUs cannot take less than "
              f"{16 * hs_cpu / NCPU / o:.1f}x and {16 * one_cpu / NCPU / ou:.1f}x one")
        try:
            c_one, c_all = _c_reference(busids)
            print(f"  reference, Debian's tools (usbipd, usbipd -e, bind + attach): one "
                  f"{c_one:.2f} s, 16 concurrent {c_all:.2f} s until every disk reads "
                  f"({c_all / c_one:.2f}x)")
        except Exception as exc:  # the reference is informative, not the figure
            print(f"  reference with Debian's tools unavailable: {exc}")
            lab.reset_usbip_ports_only()
        cli_one = statistics.median(_cli_connects(busids[:1], 3305, usable)
                                    for _ in range(rounds))
        cli_all = statistics.median(_cli_connects(busids, 3305, usable)
                                    for _ in range(rounds))
        print(f"  'usbipx connect' processes until every disk reads: one {cli_one:.2f} s, "
              f"16 concurrent {cli_all:.2f} s (median of {rounds}; all succeeded)")
        result("16 CLI connects usable / one CLI", f"{cli_all / cli_one:.2f}x", "<= 3x")
        typer_cpu = typer_start()[1]
        all_cpu = statistics.median(cpu["all_u"])
        least = (all_cpu + 16 * typer_cpu) / NCPU
        print(f"  the least 16 typer CLIs can take here: the in-process 16-way's "
              f"{all_cpu:.1f} CPU-s + 16 x {typer_cpu:.2f} CPU-s "
              f"(interpreter + import typer) on {NCPU} CPUs = {least:.1f} s, "
              f"{least / cli_one:.1f}x one CLI")
        hog = subprocess.Popen(["python3", "-c", "import os\nos.sched_setaffinity(0, {0})\n"
                                "while True: pass"])
        try:
            busy = _cli_connects(busids, 3305, usable)
        finally:
            hog.kill()
            hog.wait()
        print(f"  the same with a CPU hog on one of the two CPUs: {busy:.2f} s "
              f"({busy / cli_one:.2f}x one idle export; all 16 succeeded)")
    finally:
        usbipa.stop()
        lab.reset_usbip()


def _smaps(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        k, v = line.split(":", 1)
        out[k] = int(v.split()[0])
    return out


def bench_supervisor(rounds: int) -> None:
    section("supervisor: memory of 16 workers, and recovery times")
    import tempfile

    from test_supervisor import VUDC_SPEC, Supervisor

    tmp = Path(tempfile.mkdtemp(prefix="bench-sup-"))
    exports = []
    for k in range(lab.NUM_UDC):
        disk = tmp / f"s{k}.img"
        lab.make_disk(disk, 1)
        lab.mass_storage_gadget(f"s{k}", disk, f"dummy_udc.{k}", product=0x0500 + k)
        busid = lab.usb_busid_on_udc(f"dummy_udc.{k}")
        lab.wait_for(lambda busid=busid: lab.driver_of(busid) == "usb", 60, what=busid)
        exports.append(f'[[export]]\nbusid = "{busid}"\n')
        vdisk = tmp / f"v{k}.img"
        lab.make_disk(vdisk, 1)
        spec = tmp / f"v{k}.toml"
        spec.write_text(VUDC_SPEC.format(name=f"v{k}", product=0x0600 + k, backing=vdisk))
        exports.append(f'[[export]]\ngadget = "{spec}"\n')
    usbipa = lab.Daemon([lab.USBIPX, "usbipa", "-t", "3308"], 3308)
    sup = Supervisor(tmp, "127.0.0.1", 3308, exports)
    try:
        t0 = time.monotonic()
        lab.wait_for(lambda: len(sup.status()) == 16 and all(
            e["state"] == "exported" for e in sup.status().values()), 300, 0.2, "16 exports")
        print(f"  16 exports up {time.monotonic() - t0:.1f} s after READY=1")
        time.sleep(3)
        rows = [_smaps(e["pid"]) for e in sup.status().values()]
        uss = sorted((r["Private_Clean"] + r["Private_Dirty"]) / 1024 for r in rows)
        pss = sorted(r["Pss"] / 1024 for r in rows)
        parent = _smaps(sup.proc.pid)
        print(f"  per worker: USS median {statistics.median(uss):.2f} MB (max {uss[-1]:.2f}), "
              f"PSS median {statistics.median(pss):.2f} MB (max {pss[-1]:.2f}); "
              f"parent RSS {parent['Rss'] / 1024:.1f} MB")
        result("worker USS (16 workers)", f"{statistics.median(uss):.2f} MB", "<= 3 MB")
        result("worker PSS (16 workers)", f"{statistics.median(pss):.2f} MB", "<= 6 MB")
        # kill -9 -> a new worker adopts the export
        took = []
        keys = sorted(sup.status())
        for i in range(rounds * 4):
            key = keys[i % len(keys)]
            old = sup.status()[key]["pid"]
            os.kill(old, 9)
            t0 = time.monotonic()
            lab.wait_for(lambda key=key, old=old: (e := sup.status()[key])["pid"] not in
                         (None, old) and e["state"] == "exported", 20, 0.05, "adoption")
            took.append(time.monotonic() - t0)
        result("kill -9 -> export adopted", f"{statistics.median(took):.2f} s "
               f"(max {max(took):.2f})", "<= 1 s")
        # the application side drops every port (usbipa keeps running)
        took = []
        for _ in range(rounds):
            lab.reset_usbip_ports_only(settle=False)
            t0 = time.monotonic()
            lab.wait_for(lambda: len(lab.vhci_used_ports()) == 16, 120, 0.05,
                         "16 re-exported")
            took.append(time.monotonic() - t0)
        result("all ports dropped -> 16 re-exported", f"{statistics.median(took):.2f} s",
               "<= 5 s")
        # the link back: usbipa restarted with its ports detached -> every device
        # exported again
        usbipa.stop()
        lab.reset_usbip_ports_only(settle=False)
        usbipa = lab.Daemon([lab.USBIPX, "usbipa", "-t", "3308"], 3308)
        t0 = time.monotonic()
        lab.wait_for(lambda: len(lab.vhci_used_ports()) == 16, 120, 0.1, "16 re-exported")
        result("link back (usbipa restart) -> 16 re-exported", f"{time.monotonic() - t0:.2f} s", "<= 5 s")
    finally:
        sup.stop()
        usbipa.stop()
        lab.reset_usbip()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--load", required=True, help="the compiled DEVLIST load generator")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", nargs="*",
                    default=["devlist", "connect", "concurrent", "supervisor", "tls"])
    a = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    log.configure(level="WARNING")
    lab.load_drivers()
    lab.reset_usbip()
    if "devlist" in a.only:
        bench_devlist(a.load)
    if "connect" in a.only:
        bench_connect(a.rounds)
    if "concurrent" in a.only:
        bench_concurrent(a.rounds)
    if "supervisor" in a.only:
        bench_supervisor(a.rounds)
    if "tls" in a.only:
        from bench_tls import bench_tls

        bench_tls(result, a.rounds)
    section("summary (inside the VM)")
    for name, value, goal in RESULTS:
        print(f"  {name:<36} {value:>10}   goal {goal}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("USBIPX_IN_LAB", "1")
    sys.exit(main())
