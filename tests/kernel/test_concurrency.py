"""Many exports at once on a busy board: every `usbipx connect` must succeed.

Boot scripts start many exports together, and a board is rarely idle.  A slow
start (an interpreter starting on a starved CPU) must never turn into a
failure.  This is a correctness test: it checks success, not time.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from labkit import (
    NUM_UDC,
    USBIPX,
    block_devices_under,
    driver_of,
    make_disk,
    mass_storage_gadget,
    read_block,
    records,
    usb_busid_on_udc,
    vhci_used_ports,
    wait_for,
)


class CpuHog:
    """A busy loop on CPU 0 (the VM has two)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["python3", "-c", "import os\nos.sched_setaffinity(0, {0})\nwhile True: pass"])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _sixteen(tmp_path: Path) -> tuple[list[str], dict[bytes, str]]:
    heads: dict[bytes, str] = {}
    targets = []
    for k in range(NUM_UDC):
        for kind, udc in (("s", f"dummy_udc.{k}"), ("v", f"usbip-vudc.{k}")):
            backing = tmp_path / f"{kind}{k}.img"
            data = make_disk(backing, 1)
            heads[data[:65536]] = f"{kind}{k}"
            mass_storage_gadget(f"{kind}{k}", backing, udc, product=0x0400 + k)
            targets.append(usb_busid_on_udc(udc) if kind == "s" else udc)
    for b in targets:
        if not b.startswith("usbip-vudc"):
            wait_for(lambda b=b: driver_of(b) == "usb", 60, what=f"{b} to enumerate")
    return targets, heads


def test_16_concurrent_cli_connects_with_a_cpu_hog_all_succeed(tmp_path: Path,
                                                               daemons) -> None:
    """Also the test of 16 exports at once: each gets its own vhci port and record
    (an idle run would prove less; its time is the bench's)."""
    targets, heads = _sixteen(tmp_path)
    a = daemons("usbipa")
    hog = CpuHog()
    try:
        t0 = time.monotonic()
        procs = [subprocess.Popen(
            [USBIPX, "-t", str(a.port), "connect", "-r", "127.0.0.1", "-b", b],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for b in targets]
        results = [(b, pr.wait(600), pr.stderr.read()) for b, pr in
                   zip(targets, procs, strict=True)]
        wall = time.monotonic() - t0
    finally:
        hog.stop()
    failed = [(b, rc, err) for b, rc, err in results if rc != 0]
    assert not failed, f"{len(failed)} of 16 failed: {failed}\nusbipa:\n{a.output()[-4000:]}"
    used = vhci_used_ports()
    assert len(used) == 16 and len({p for p, _ in used}) == 16
    assert sorted(r.split()[2] for r in records().values()) == sorted(targets)
    disks = wait_for(lambda: (d := block_devices_under("vhci_hcd")) and len(d) == 16 and d,
                     300, 0.5, "16 disks on the vhci side")
    seen = {heads.get(read_block(d, 65536)) for d in disks}
    assert None not in seen and len(seen) == 16
    print(f"16 concurrent CLI connects with a CPU hog: {wall:.1f} s, load {os.getloadavg()}")
