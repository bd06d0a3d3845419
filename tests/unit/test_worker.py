"""A supervisor worker against the fake kernel and a real usbipa on 127.0.0.1.

The worker runs in a thread (stopped with ``request_stop()``, as SIGTERM does in a
worker process); the usbipa handler attaches to the same fake kernel's vhci_hcd, so
both ends of each export are checked.  Gadget exports run over the fake configfs
wired to the fake kernel's vUDCs (``GadgetKernelSysfs``).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fakeconfigfs import GADGETS
from fakekernel import PLATFORM, STUB_DIR, FakeKernel
from loopback import HOST, LoopbackServer, Spy, used_ports
from supervisor_helpers import (
    UDC_CLASS,
    GadgetKernelSysfs,
    PipeSelect,
    SerialSysfs,
    WorkerThread,
    drop_export,
    gadget_spec,
    read_record,
    replug,
    unplug,
)

import usbipx.daemon.worker as worker_mod
from usbipx import protocol as p
from usbipx.daemon.config import ExportSpec, Options, ServerSpec
from usbipx.daemon.policy import Policy
from usbipx.daemon.supervisor import Job
from usbipx.daemon.usbipa import UsbipaHandler
from usbipx.daemon.worker import Backoff, clean_leftovers, records
from usbipx.errors import UsbipError
from usbipx.gadget.live import list_gadgets
from usbipx.gadget.transaction import apply_spec
from usbipx.gadget.udc import gadget_on_udc
from usbipx.lease import Lease
from usbipx.ownership import Owned
from usbipx.remote import RelayStats
from usbipx.stubmode.host import HostDriver
from usbipx.sysfs import Sysfs
from usbipx.url import Endpoint
from usbipx.vhci import VhciDriver

STATE = "/run/sup-test/state"
KEY = "busid:1-1"
V1 = "usbip-vudc.1"


@pytest.fixture(autouse=True)
def _select_over_fake_pipes(fs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker sleeps in select() on its wake-up pipe; under pyfakefs that pipe's
    descriptors are fake ones."""
    monkeypatch.setattr(worker_mod, "select", PipeSelect(fs))


def options(**kw: Any) -> Options:
    base: dict[str, Any] = {"state_dir": STATE, "backoff_initial": 0.01, "backoff_max": 0.04,
                            "connect_timeout": 2.0, "poll_interval": 0.01}
    return Options(**{**base, **kw})


def stub_job(port: int, busid: str = "1-1") -> Job:
    return Job(f"busid:{busid}", ExportSpec("busid", busid=busid), busid,
               ServerSpec(HOST, port), options())


def gadget_job(port: int, udc: str | None = None) -> Job:
    spec = ExportSpec("gadget", gadget=gadget_spec("sup"), gadget_path="/specs/sup.toml",
                      udc=udc)
    return Job("gadget:sup", spec, None, ServerSpec(HOST, port), options())


@pytest.fixture
def ssys(kernel: FakeKernel) -> SerialSysfs:
    """What the worker sees of the kernel (changes made by the test are atomic to it)."""
    return SerialSysfs(kernel)


def requests(spy: Spy, kind: type) -> list[Any]:
    return [r for r, _, _ in spy.calls if isinstance(r, kind)]


# ---------------------------------------------------------------- stub mode

@pytest.mark.scenario("host_unbound", "vhci_free")
def test_stub_export_binds_exports_and_cleans_up(kernel: FakeKernel, ssys: SerialSysfs,
                                                  usbipa) -> None:
    srv, spy = usbipa
    at_bind: list[dict[str, Any] | None] = []
    kernel.before_write(f"{STUB_DIR}/bind", lambda k, w: at_bind.append(read_record(STATE, KEY)))
    w = WorkerThread(stub_job(srv.port), ssys)
    with w:
        w.wait_for("exported")
        srv.idle()
        # The ownership record is on disk before the device is bound.
        assert len(at_bind) == 1 and at_bind[0] is not None
        assert at_bind[0]["key"] == KEY
        assert Lease.from_json(at_bind[0]["lease"]) == Lease(
            "usbip-host", "1-1", bound_here=True, original_driver="usb")
        assert w.states() == ["exporting", "exported"]
        exported = w.reports[-1]
        assert exported["remote"] == f"{HOST}:{srv.port}" and exported["busid"] == "1-1"
        assert kernel.driver_of("1-1") == "usbip-host" and kernel.stub_status["1-1"] == 2
        (req,) = requests(spy, p.ExportRequest)
        assert req.device.busid == "1-1"
        assert used_ports(kernel) == [0]
        rec = read_record(STATE, KEY)
        assert rec is not None and rec["remote"] == f"{HOST}:{srv.port}"
        w.stop()
    assert w.states()[-1] == "stopping"
    assert spy.kinds() == ["ExportRequest", "UnexportRequest"]
    assert used_ports(kernel) == []
    assert kernel.driver_of("1-1") == "usb"
    assert kernel.match_busid() == []
    assert read_record(STATE, KEY) is None


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_a_refused_export_backs_off_and_retries(kernel: FakeKernel, ssys: SerialSysfs) -> None:
    spy = Spy(UsbipaHandler(VhciDriver(kernel.sysfs), Policy(default="deny")))
    with LoopbackServer(spy, "usbipa") as srv:
        w = WorkerThread(stub_job(srv.port), ssys)
        with w:
            i = -1
            for _ in range(3):
                i = w.wait_for("backoff", i + 1)
            w.stop()
    errors = {r["error"] for r in w.reports if r["state"] == "backoff"}
    assert errors == {f"export of 1-1 to {HOST} refused: "
                      "ST_NA: request refused (not allowed or not available)"}
    assert "exported" not in w.states()
    assert len(requests(spy, p.ExportRequest)) >= 3
    assert requests(spy, p.UnexportRequest) == []  # nothing was exported
    assert kernel.driver_of("1-1") == "usb"
    assert read_record(STATE, KEY) is None


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_an_unreachable_usbipa_backs_off(kernel: FakeKernel, ssys: SerialSysfs) -> None:
    from loopback import free_port

    w = WorkerThread(stub_job(free_port()), ssys)
    with w:
        w.wait_for("backoff", w.wait_for("backoff") + 1)
        w.stop()
    err = next(r["error"] for r in w.reports if r["state"] == "backoff")
    assert "cannot connect" in err
    assert kernel.driver_of("1-1") == "usb"


@pytest.mark.scenario("host_bound", "vhci_free")
def test_a_live_export_is_adopted_not_exported_again(kernel: FakeKernel, ssys: SerialSysfs,
                                                     usbipa) -> None:
    """A previous worker was killed; the kernel still holds its connection."""
    srv, spy = usbipa
    HostDriver(kernel.sysfs).handoff("1-1", 7)
    kernel.clear_log()
    # ... one that had bound the device itself.
    records(STATE).update(KEY, lease=Lease("usbip-host", "1-1", bound_here=True,
                                           original_driver="usb"),
                          remote=f"127.0.0.1:{srv.port}")
    w = WorkerThread(stub_job(srv.port), ssys)
    with w:
        w.wait_for("exported")
        srv.idle()
        assert w.states() == ["exported"]
        assert w.reports[0]["remote"] == f"127.0.0.1:{srv.port}"
        time.sleep(0.05)  # a few polls: the export is still there
        assert w.states() == ["exported"]
        assert spy.calls == [] and kernel.writes == []
        w.stop()
    # Stopping ends the adopted export: usbipa is told, the device goes back.
    assert spy.kinds() == ["UnexportRequest"]
    assert kernel.driver_of("1-1") == "usb"
    assert read_record(STATE, KEY) is None


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_a_dropped_export_is_exported_again(kernel: FakeKernel, ssys: SerialSysfs, usbipa) -> None:
    srv, spy = usbipa
    w = WorkerThread(stub_job(srv.port), ssys)
    with w:
        first = w.wait_for("exported")
        srv.idle()
        # The link dies: the application side's kernel frees its port (usbipa refuses
        # a re-export while the old port is alive), the device side's drops the export.
        kernel.vhci_unplug(0)
        drop_export(kernel, "1-1")
        back = w.wait_for("backoff", first)
        assert w.reports[back]["error"] == "export dropped: connection closed"
        again = w.wait_for("exported", back)
        srv.idle()
        assert w.states()[back:again + 1] == ["backoff", "exporting", "exported"]
        assert kernel.stub_status["1-1"] == 2
        # usbipa attached the device afresh (on another port than the dead link's)
        assert len(requests(spy, p.ExportRequest)) == 2
        assert used_ports(kernel) == [1]
        w.stop()
    assert kernel.driver_of("1-1") == "usb"


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_an_absent_device_is_waited_for(kernel: FakeKernel, ssys: SerialSysfs, usbipa) -> None:
    srv, spy = usbipa
    saved = unplug(kernel, "1-1")
    w = WorkerThread(stub_job(srv.port), ssys)
    with w:
        i = w.wait_for("waiting")
        assert w.reports[i]["error"] == "device not present"
        time.sleep(0.05)
        assert w.states() == ["waiting"]  # reported once, not every poll
        assert spy.calls == []
        replug(kernel, saved)
        w.wait_for("exported", i)
        srv.idle()
        assert w.states() == ["waiting", "exporting", "exported"]
        assert kernel.driver_of("1-1") == "usbip-host"
        w.stop()
    assert kernel.driver_of("1-1") == "usb"
    assert read_record(STATE, KEY) is None


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_unplugged_while_exported(kernel: FakeKernel, ssys: SerialSysfs, usbipa) -> None:
    srv, spy = usbipa
    w = WorkerThread(stub_job(srv.port), ssys)
    with w:
        first = w.wait_for("exported")
        srv.idle()
        saved = unplug(kernel, "1-1")
        i = w.wait_for("waiting", first)
        assert w.reports[i]["error"] == "device unplugged"
        srv.wait_for(lambda _: bool(requests(spy, p.UnexportRequest)))
        (req,) = requests(spy, p.UnexportRequest)
        assert req.device.busid == "1-1"
        srv.wait_for(lambda _: used_ports(kernel) == [])  # usbipa let go of its port
        # Plugged back in: usbip-host takes it (still in match_busid); exported again.
        replug(kernel, saved)
        w.wait_for("exported", i)
        srv.idle()
        assert len(requests(spy, p.ExportRequest)) == 2
        w.stop()
    assert kernel.driver_of("1-1") == "usb"


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_a_device_unbound_behind_the_workers_back_is_exported_again(
        kernel: FakeKernel, ssys: SerialSysfs, usbipa) -> None:
    srv, _ = usbipa
    w = WorkerThread(stub_job(srv.port), ssys)
    with w:
        first = w.wait_for("exported")
        srv.idle()
        kernel.vhci_unplug(0)  # the application side sees the connection end
        HostDriver(ssys).unbind("1-1")  # e.g. `usbipx unbind`, or another worker
        try:
            w.wait_for("exported", w.wait_for("backoff", first, timeout=0.5), timeout=2.0)
            srv.idle()
            assert kernel.driver_of("1-1") == "usbip-host" and kernel.stub_status["1-1"] == 2
        finally:
            w.stop()


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_stop_while_waiting_cleans_up_the_record(kernel: FakeKernel, ssys: SerialSysfs,
                                                 usbipa) -> None:
    srv, spy = usbipa
    unplug(kernel, "1-1")
    w = WorkerThread(stub_job(srv.port), ssys)
    with w:
        w.wait_for("waiting")
        t0 = time.monotonic()
        w.stop()
        assert time.monotonic() - t0 < 1.0  # woken at once, not after a poll
    assert w.states() == ["waiting", "stopping"]
    assert spy.calls == []
    assert read_record(STATE, KEY) is None


# ---------------------------------------------------------------- vUDC mode

@pytest.fixture
def gsys(kernel: FakeKernel, fs: Any) -> GadgetKernelSysfs:
    return GadgetKernelSysfs(kernel, fs)


@pytest.mark.scenario("vudc", "vhci_free")
def test_gadget_export_provisions_a_free_vudc_and_removes_it_on_stop(
        kernel: FakeKernel, gsys: GadgetKernelSysfs, usbipa) -> None:
    srv, spy = usbipa
    at_mkdir: list[dict[str, Any] | None] = []

    def first_mkdir(op: str, rel: str) -> None:
        if op == "mkdir" and not at_mkdir:
            at_mkdir.append(read_record(STATE, "gadget:sup"))

    gsys.cfs.fail_when = first_mkdir
    w = WorkerThread(gadget_job(srv.port), gsys)
    with w:
        w.wait_for("exported")
        srv.idle()
        assert at_mkdir[0] is not None and at_mkdir[0]["lease"]["created_here"] is True
        assert w.states() == ["exporting", "exported"]
        # usbip-vudc.0 is held by another gadget: the free usbip-vudc.1 is used
        assert w.reports[-1]["busid"] == V1
        assert gadget_on_udc(V1, gsys) == "sup"
        (req,) = requests(spy, p.ExportRequest)
        assert req.device.busid == V1 and req.device.id_product == 0x0104
        assert kernel.vudc[V1].connected and used_ports(kernel) == [0]
        rec = read_record(STATE, "gadget:sup")
        assert rec is not None and Lease.from_json(rec["lease"]) == Lease(
            "usbip-vudc", V1, gadget="sup", created_here=True)
        w.stop()
    assert spy.kinds() == ["ExportRequest", "UnexportRequest"]
    assert used_ports(kernel) == []
    assert list_gadgets(gsys) == []  # we made it, we removed it
    assert gsys.read_optional(f"{UDC_CLASS}/{V1}/function") == ""
    assert not kernel.vudc[V1].gadget
    assert read_record(STATE, "gadget:sup") is None


@pytest.mark.scenario("vudc", "vhci_free")
def test_a_gadget_that_was_there_before_is_left_in_place(
        kernel: FakeKernel, gsys: GadgetKernelSysfs, usbipa) -> None:
    srv, spy = usbipa
    apply_spec(gadget_spec("sup"), gsys, udc=V1)
    w = WorkerThread(gadget_job(srv.port), gsys)
    with w:
        w.wait_for("exported")
        srv.idle()
        rec = read_record(STATE, "gadget:sup")
        assert rec is not None and rec["lease"]["created_here"] is False
        w.stop()
    assert spy.kinds() == ["ExportRequest", "UnexportRequest"]
    assert list_gadgets(gsys) == ["sup"] and gadget_on_udc(V1, gsys) == "sup"
    assert read_record(STATE, "gadget:sup") is None


@pytest.mark.scenario("vudc", "vhci_free")
def test_a_dropped_gadget_export_is_exported_again(
        kernel: FakeKernel, gsys: GadgetKernelSysfs, usbipa) -> None:
    srv, spy = usbipa
    w = WorkerThread(gadget_job(srv.port, udc=V1), gsys)
    with w:
        first = w.wait_for("exported")
        srv.idle()
        kernel.vhci_unplug(0)  # both sides see the connection end
        kernel.vudc[V1].connected = False  # the vUDC saw its connection end
        kernel.set_attr(f"{PLATFORM}/{V1}/usbip_status", "1\n")
        w.wait_for("exported", w.wait_for("backoff", first))
        srv.idle()
        assert len(requests(spy, p.ExportRequest)) == 2 and kernel.vudc[V1].connected
        w.stop()
    assert list_gadgets(gsys) == []


@pytest.mark.scenario("vudc", "vhci_free")
def test_a_gadget_unbound_by_someone_else_is_an_unplugged_device(
        kernel: FakeKernel, gsys: GadgetKernelSysfs, usbipa) -> None:
    srv, spy = usbipa
    w = WorkerThread(gadget_job(srv.port), gsys)
    with w:
        first = w.wait_for("exported")
        srv.idle()
        gsys.write(f"{GADGETS}/sup/UDC", "\n")
        i = w.wait_for("waiting", first)
        assert w.reports[i]["error"] == "device unplugged"
        w.stop()
    assert "UnexportRequest" in spy.kinds()
    assert list_gadgets(gsys) == []


# ---------------------------------------------------------------- backoff

def test_backoff_grows_and_is_capped() -> None:
    b = Backoff(0.5, 4.0, jitter=0.0)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.next() == 0.5


def test_backoff_jitter_stays_within_twenty_percent() -> None:
    b = Backoff(1.0, 8.0, rng=random.Random(1))
    seen = []
    for _ in range(400):
        b.reset()
        for base in (1.0, 2.0, 4.0, 8.0, 8.0):
            v = b.next()
            assert base * 0.8 <= v <= base * 1.2
            seen.append(v / base)
    assert min(seen) < 0.85 and max(seen) > 1.15  # it does spread
    assert len({round(x, 6) for x in seen}) > 100


def test_backoff_keeps_working_after_many_failures() -> None:
    b = Backoff(0.5, 2.0, rng=random.Random(0))
    for _ in range(2000):
        assert 0.4 <= b.next() <= 2.4


# ---------------------------------------------------------------- leftovers of a dead supervisor

def write_record(state_dir: str, rec: Owned) -> Path:
    """A record as a predecessor's worker left it (its own pid, start time, cmdline)."""
    d = Path(state_dir) / "owned"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = records(state_dir).path(rec.key)
    path.write_text(json.dumps(rec.to_json()))
    return path


DEAD = {"pid": 999999, "starttime": 12345, "cmdline": ("usbipx", "supervisor", "run")}
STUB_LEASE = Lease("usbip-host", "1-1", bound_here=True, original_driver="usb")


@pytest.mark.scenario("host_unbound")
def test_leftover_stub_not_kept_is_unbound(kernel: FakeKernel) -> None:
    HostDriver(kernel.sysfs).bind("1-1")
    rec = write_record(STATE, Owned(KEY, STUB_LEASE, **DEAD))
    assert clean_leftovers(STATE, set(), kernel.sysfs) == [KEY]
    assert kernel.driver_of("1-1") == "usb"
    assert not rec.exists()


@pytest.mark.scenario("host_bound")
def test_leftover_stub_bound_by_someone_else_stays_bound(kernel: FakeKernel) -> None:
    """The predecessor exported a device it had not bound: its export ends, the
    device stays on usbip-host."""
    HostDriver(kernel.sysfs).handoff("1-1", 7)
    kernel.clear_log()
    rec = write_record(STATE, Owned(KEY, Lease("usbip-host", "1-1"), "10.0.0.1:3240", **DEAD))
    assert clean_leftovers(STATE, set(), kernel.sysfs) == [KEY]
    assert kernel.writes == [("/sys/bus/usb/devices/1-1/usbip_sockfd", "-1")]
    assert kernel.driver_of("1-1") == "usbip-host"
    assert not rec.exists()


@pytest.mark.scenario("host_unbound")
def test_leftover_stub_kept_is_untouched(kernel: FakeKernel) -> None:
    HostDriver(kernel.sysfs).bind("1-1")
    kernel.clear_log()
    rec = write_record(STATE, Owned(KEY, STUB_LEASE, **DEAD))
    assert clean_leftovers(STATE, {KEY}, kernel.sysfs) == []
    assert kernel.driver_of("1-1") == "usbip-host" and kernel.writes == []
    assert rec.exists()


@pytest.mark.scenario("host_unbound")
def test_leftover_of_an_unplugged_stub_is_forgotten(kernel: FakeKernel) -> None:
    unplug(kernel, "1-1")
    rec = write_record(STATE, Owned(KEY, STUB_LEASE, **DEAD))
    assert clean_leftovers(STATE, set(), kernel.sysfs) == [KEY]
    assert not rec.exists()


@pytest.mark.scenario("vudc")
def test_leftover_gadget_we_created_is_removed(kernel: FakeKernel, gsys: GadgetKernelSysfs,
                                              ) -> None:
    apply_spec(gadget_spec("sup"), gsys, udc=V1)
    apply_spec(gadget_spec("theirs", 0x0105), gsys)
    write_record(STATE, Owned("gadget:sup", Lease("usbip-vudc", V1, gadget="sup",
                                                  created_here=True), **DEAD))
    write_record(STATE, Owned("gadget:theirs", Lease("usbip-vudc", None, gadget="theirs"),
                              **DEAD))
    assert clean_leftovers(STATE, set(), gsys) == ["gadget:sup", "gadget:theirs"]
    assert list_gadgets(gsys) == ["theirs"]  # not ours to remove
    assert not kernel.vudc[V1].gadget
    assert records(STATE).all() == []


@pytest.mark.scenario("host_unbound")
def test_a_state_dir_others_may_write_is_refused(kernel: FakeKernel) -> None:
    """Records decide what gets unbound and killed: only root's own 0700 directory counts."""
    HostDriver(kernel.sysfs).bind("1-1")
    rec = write_record(STATE, Owned(KEY, STUB_LEASE, **DEAD))
    os.chmod(rec.parent, 0o777)
    with pytest.raises(UsbipError, match="mode 0700"):
        clean_leftovers(STATE, set(), kernel.sysfs)
    assert kernel.driver_of("1-1") == "usbip-host" and rec.exists()


@pytest.mark.scenario("host_unbound")
def test_a_record_through_a_symlink_or_with_bad_fields_is_ignored(kernel: FakeKernel) -> None:
    HostDriver(kernel.sysfs).bind("1-1")
    d = Path(STATE) / "owned"
    d.mkdir(parents=True, mode=0o700)
    elsewhere = Path("/elsewhere.json")
    elsewhere.write_text(json.dumps(Owned(KEY, STUB_LEASE, **DEAD).to_json()))
    (d / "busid_1-1.json").symlink_to(elsewhere)
    bad = Owned("gadget:x", Lease("usbip-vudc", None, gadget="x", created_here=True), **DEAD)
    raw = bad.to_json()
    raw["lease"]["gadget"] = "../../etc"
    (d / "gadget_x.json").write_text(json.dumps(raw))
    assert clean_leftovers(STATE, set(), kernel.sysfs) == []
    assert kernel.driver_of("1-1") == "usbip-host"


def _starttime(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def _cmdline(pid: int) -> tuple[str, ...]:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return tuple(a.decode() for a in raw.split(b"\0") if a)


def live(pid: int) -> dict[str, Any]:
    """What a worker records about itself.  A child Popen just returned is exec'ing:
    its command line reads empty until the new program's arguments are in place."""
    deadline = time.monotonic() + 5.0
    while not (cmdline := _cmdline(pid)) and time.monotonic() < deadline:
        time.sleep(0.005)
    return {"pid": pid, "starttime": _starttime(pid), "cmdline": cmdline}


class TestLiveWorkers:
    """A predecessor's worker still running: real processes, so the real filesystem."""

    @pytest.fixture(autouse=True)
    def _select_over_fake_pipes(self) -> None:  # no pyfakefs here
        pass

    @pytest.fixture
    def fs(self) -> None:
        return None

    def test_a_live_worker_is_waited_for(self, tmp_path: Path) -> None:
        state = str(tmp_path / "state")
        proc = subprocess.Popen(["sleep", "0.3"])
        try:
            rec = write_record(state, Owned(KEY, STUB_LEASE, **live(proc.pid)))
            t0 = time.monotonic()
            # The predecessor's workers are reaped by init; here by us, while we wait.
            cleaned = clean_leftovers(state, set(), Sysfs(tmp_path / "root"),
                                      wait=lambda t: (proc.poll(), time.sleep(t)))
            took = time.monotonic() - t0
            ended = proc.poll()  # before we kill it: the clean-up waited for its end
        finally:
            proc.kill()
            proc.wait()
        assert cleaned == [KEY] and not rec.exists()
        # Ended by itself (0), not killed (-9) after the grace period: the clean-up waited.
        assert ended == 0, f"the clean-up returned after {took:.2f} s with the worker at {ended}"

    def test_a_worker_that_cleans_up_after_itself(self, tmp_path: Path) -> None:
        state = str(tmp_path / "state")
        path = Path(state) / "owned" / "busid_1-1.json"
        proc = subprocess.Popen([sys.executable, "-c",
                                 f"import os, time; time.sleep(0.3); os.unlink({str(path)!r})"])
        try:
            write_record(state, Owned(KEY, STUB_LEASE, **live(proc.pid)))
            cleaned = clean_leftovers(state, set(), Sysfs(tmp_path / "root"),
                                      wait=lambda t: (proc.poll(), time.sleep(t)))
        finally:
            proc.kill()
            proc.wait()
        assert cleaned == [] and not path.exists()

    def test_a_worker_that_does_not_finish_is_killed(self, tmp_path: Path) -> None:
        state = str(tmp_path / "state")
        proc = subprocess.Popen(["sleep", "30"])
        try:
            write_record(state, Owned(KEY, STUB_LEASE, **live(proc.pid)))
            waits: list[float] = []
            cleaned = clean_leftovers(state, set(), Sysfs(tmp_path / "root"), wait=waits.append)
            assert proc.wait(5) == -9
        finally:
            proc.kill()
            proc.wait()
        assert cleaned == [KEY]
        assert sum(waits) == pytest.approx(5.0)  # 5 s of patience first

    def test_a_reused_pid_is_not_waited_for(self, tmp_path: Path) -> None:
        state = str(tmp_path / "state")
        ppid = os.getppid()
        write_record(state, Owned(KEY, STUB_LEASE, pid=ppid, starttime=1,
                                  cmdline=_cmdline(ppid)))
        waits: list[float] = []
        assert clean_leftovers(state, set(), Sysfs(tmp_path / "root"), wait=waits.append) == [KEY]
        assert waits == []

    def test_a_process_that_is_not_our_worker_is_never_killed(self, tmp_path: Path) -> None:
        """Right pid and start time, but another program: a forged or stale record
        must not make the supervisor kill it."""
        state = str(tmp_path / "state")
        proc = subprocess.Popen(["sleep", "30"])
        try:
            write_record(state, Owned(KEY, STUB_LEASE, pid=proc.pid,
                                      starttime=_starttime(proc.pid),
                                      cmdline=("usbipx", "supervisor", "run")))
            waits: list[float] = []
            assert clean_leftovers(state, set(), Sysfs(tmp_path / "root"),
                                   wait=waits.append) == [KEY]
            assert waits == [] and proc.poll() is None
        finally:
            proc.kill()
            proc.wait()


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_an_export_someone_else_made_is_left_alone(kernel: FakeKernel, ssys: SerialSysfs,
                                                    usbipa) -> None:
    """usbip_status 2 without a record of ours: not ours to adopt or tear down."""
    srv, spy = usbipa
    HostDriver(kernel.sysfs).bind("1-1")
    HostDriver(kernel.sysfs).handoff("1-1", 7)
    kernel.clear_log()
    w = WorkerThread(stub_job(srv.port), ssys)
    with w:
        w.wait_for("backoff")
        assert "not by this supervisor" in (w.reports[-1]["error"] or "")
        assert spy.calls == [] and kernel.writes == []
        w.stop()
    assert spy.kinds() == []  # nothing sent on stop either


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_an_export_to_an_earlier_server_is_moved(kernel: FakeKernel, ssys: SerialSysfs,
                                                  usbipa) -> None:
    """Our record names another server (the configuration changed): withdraw, export anew."""
    srv, spy = usbipa
    HostDriver(kernel.sysfs).bind("1-1")
    HostDriver(kernel.sysfs).handoff("1-1", 7)
    records(STATE).update(KEY, lease=STUB_LEASE, remote="10.9.9.9:3240")
    kernel.clear_log()
    w = WorkerThread(stub_job(srv.port), ssys)
    with w:
        w.wait_for("exported")
        srv.idle()
        assert ("/sys/bus/usb/devices/1-1/usbip_sockfd", "-1") in kernel.writes
        assert spy.kinds() == ["ExportRequest"]
        assert w.reports[-1]["remote"] == f"127.0.0.1:{srv.port}"
        w.stop()


@pytest.mark.scenario("host_bound", "vhci_free")
def test_a_device_bound_before_the_supervisor_stays_bound(kernel: FakeKernel, ssys: SerialSysfs,
                                                          usbipa) -> None:
    """Bound to usbip-host by someone else (Debian's ``usbip bind``) before the worker
    came: exported, unexported on stop, and left on usbip-host."""
    srv, spy = usbipa
    w = WorkerThread(stub_job(srv.port), ssys)
    with w:
        w.wait_for("exported")
        srv.idle()
        assert kernel.stub_status["1-1"] == 2
        w.stop()
    assert spy.kinds() == ["ExportRequest", "UnexportRequest"]
    assert used_ports(kernel) == []
    assert kernel.driver_of("1-1") == "usbip-host"
    assert (f"{STUB_DIR}/unbind", "1-1") not in kernel.writes
    assert read_record(STATE, KEY) is None


# ---------------------------------------------------------------- several servers

@pytest.mark.scenario("host_unbound", "vhci_free")
def test_the_first_server_that_accepts_holds_the_device_and_a_loss_moves_on(
        kernel: FakeKernel, ssys: SerialSysfs) -> None:
    """``urls = [a, b]``: a refuses, so b holds the device; after a loss the next try
    starts at the server after b (a, which now accepts)."""
    deny = Spy(UsbipaHandler(VhciDriver(kernel.sysfs), Policy(default="deny")))
    allow = Spy(UsbipaHandler(VhciDriver(kernel.sysfs)))
    with LoopbackServer(deny, "a") as a, LoopbackServer(allow, "b") as b:
        job = Job("busid:1-1", ExportSpec("busid", busid="1-1"), "1-1",
                  ServerSpec(HOST, a.port, more=(Endpoint("tcp", HOST, b.port),)), options())
        w = WorkerThread(job, ssys)
        with w:
            first = w.wait_for("exported")
            b.idle()
            assert w.reports[first]["remote"] == f"{HOST}:{b.port}"
            assert deny.kinds() == ["ExportRequest"] and allow.kinds() == ["ExportRequest"]
            a.server.handler = allow  # a accepts from now on
            kernel.vhci_unplug(0)  # the application side lets go of the dead link ...
            drop_export(kernel, "1-1")  # ... and the board's kernel sees it end
            again = w.wait_for("exported", w.wait_for("backoff", first))
            a.idle()
            assert w.reports[again]["remote"] == f"{HOST}:{a.port}"
            rec = read_record(STATE, KEY)
            assert rec is not None and rec["remote"] == f"{HOST}:{a.port}"
            w.stop()
    assert kernel.driver_of("1-1") == "usb"


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_when_no_server_accepts_the_worker_backs_off_and_starts_over(
        kernel: FakeKernel, ssys: SerialSysfs) -> None:
    from loopback import free_port

    job = Job("busid:1-1", ExportSpec("busid", busid="1-1"), "1-1",
              ServerSpec(HOST, free_port(), more=(Endpoint("tcp", HOST, free_port()),)),
              options())
    w = WorkerThread(job, ssys)
    with w:
        w.wait_for("backoff", w.wait_for("backoff") + 1)
        w.stop()
    assert "cannot connect" in (w.reports[-2]["error"] or "")
    assert kernel.driver_of("1-1") == "usb"


class _Relay:
    """A relay that moves what the test says, and a last few bytes as it stops."""

    def __init__(self) -> None:
        self.stats = RelayStats()
        self.running = threading.Event()

    def run(self, stop: threading.Event | None = None) -> str:
        self.running.set()
        assert stop is not None and stop.wait(10)
        self.stats.to_kernel += 5
        return "stopped"


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_a_relaying_worker_tells_the_bytes_moved_once_each(ssys: SerialSysfs) -> None:
    """The supervisor's usbipx_relay_bytes_total counts a relaying worker's traffic:
    each byte told once, including what moved as the relay ended."""
    told: list[tuple[int, int]] = []
    w = worker_mod.Worker(stub_job(1), lambda state: None, ssys,
                          relayed=lambda net, kernel: told.append((net, kernel)))
    relay = _Relay()
    w._start_relay(relay)
    assert relay.running.wait(5)
    relay.stats.to_network += 1000
    relay.stats.to_kernel += 200
    w._count_relayed()
    w._count_relayed()  # nothing moved since: nothing told
    relay.stats.to_network += 24
    w._count_relayed()
    w._stop_relay()
    w._count_relayed()  # no relay any more
    assert told == [(1000, 200), (24, 0), (0, 5)]
    # A new relay is counted from its own zero.
    second = _Relay()
    w._start_relay(second)
    assert second.running.wait(5)
    second.stats.to_network += 7
    w._stop_relay()
    assert told[3:] == [(7, 5)]
