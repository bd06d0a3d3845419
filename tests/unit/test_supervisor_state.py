"""The supervisor's state machine with a fake spawner and clock: which workers run,
restarts after crashes (at once after a steady state, with backoff and a pause when
flapping), the stop flow, reload, hotplug, and what ``status`` shows."""

from __future__ import annotations

import signal
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from supervisor_helpers import (
    OPTIONS,
    FakeClock,
    FakeSpawner,
    busid,
    config,
    device,
    fork_failure,
    gadget,
    match,
)

from usbipx.daemon.config import ExportSpec, SupervisorConfig
from usbipx.daemon.supervisor import STOP_GRACE, Device, State, Supervisor, jobs_for

TERM, KILL = signal.SIGTERM, signal.SIGKILL
FTDI = (0x0403, 0x6001)


def make(*exports: ExportSpec, devices: tuple[Device, ...] = (), **kw: object,
         ) -> tuple[Supervisor, FakeSpawner, FakeClock]:
    clock = FakeClock()
    spawner = FakeSpawner()
    sup = Supervisor(config(*exports, **kw), spawner, clock)  # type: ignore[arg-type]
    sup.start(devices)
    return sup, spawner, clock


def steady(sup: Supervisor, key: str, spawner: FakeSpawner, remote: str = "10.0.0.1:3240",
           ) -> int:
    pid = spawner.pid_of(key)
    sup.on_report(key, pid, "exporting")
    sup.on_report(key, pid, "exported", remote=remote, transport="ktls")
    return pid


# ---------------------------------------------------------------- start

def test_start_spawns_one_worker_per_export() -> None:
    devs = (device("1-1", *FTDI), device("1-2", *FTDI), device("1-3", 0x0781, 0x5567),
            device("2-1", 0x1234, 0x5678))
    sup, spawner, clock = make(busid("1-1"), match(*FTDI), match(0x0781), gadget("sup"),
                               devices=devs)
    keys = sorted(j.key for _, j in spawner.spawned)
    # 1-1 is named by bus id: not also taken by the match entry; 2-1 matches nothing.
    assert keys == ["busid:1-1", "gadget:sup", "match:0403:6001@1-2", "match:0781:*@1-3"]
    assert len(spawner.live) == 4 and len(set(spawner.live)) == 4
    for key, slot in sup.slots.items():
        assert slot.state == State.STARTING
        assert slot.pid == spawner.pid_of(key)
        assert slot.started == clock.now and slot.restarts == 0
    assert sup.slots["match:0403:6001@1-2"].job.busid == "1-2"
    assert sup.slots["gadget:sup"].job.busid is None
    assert spawner.signals == []
    assert not sup.done


def test_match_jobs_only_for_present_devices() -> None:
    sup, spawner, _ = make(match(*FTDI), devices=(device("3-1", 0x0403, 0x6010),))
    assert sup.slots == {} and spawner.spawned == []
    assert sup.summary() == "no exports"


def test_a_device_matched_by_two_entries_gets_one_worker() -> None:
    """vendor=0403 and vendor=0403,product=6001 both match an FT232: exporting it twice
    would make two workers fight over one device.  The first entry takes it."""
    cfg = config(match(0x0403), match(*FTDI))
    jobs = jobs_for(cfg, [device("1-2", *FTDI), device("1-3", 0x0403, 0x6010)])
    assert sorted(jobs) == ["match:0403:*@1-2", "match:0403:*@1-3"]
    cfg = config(match(*FTDI), match(0x0403))
    jobs = jobs_for(cfg, [device("1-2", *FTDI), device("1-3", 0x0403, 0x6010)])
    assert sorted(jobs) == ["match:0403:*@1-3", "match:0403:6001@1-2"]


def test_jobs_carry_server_and_options() -> None:
    cfg = config(busid("1-1"), host="h", port=4000)
    (job,) = jobs_for(cfg, []).values()
    assert job.server == cfg.server and job.options == OPTIONS and job.spec == busid("1-1")


# ---------------------------------------------------------------- reports

def test_reports_move_the_state() -> None:
    sup, spawner, clock = make(busid("1-1"))
    key = "busid:1-1"
    pid = spawner.pid_of(key)
    slot = sup.slots[key]
    sup.on_report(key, pid, "exporting")
    assert slot.state == State.EXPORTING and not slot.steady
    clock.advance(2)
    sup.on_report(key, pid, "exported", remote="10.0.0.1:3240")
    assert (slot.state, slot.remote, slot.since, slot.steady) == (
        State.EXPORTED, "10.0.0.1:3240", clock.now, True)
    sup.on_report(key, pid, "backoff", error="export dropped: connection closed")
    assert (slot.state, slot.remote, slot.last_error) == (
        State.BACKOFF, None, "export dropped: connection closed")
    sup.on_report(key, pid, "waiting", error="device not present")
    assert slot.state == State.WAITING and slot.last_error == "device not present"
    sup.on_report(key, pid, "exporting")  # an error-less report keeps the last error
    assert slot.last_error == "device not present"


@pytest.mark.parametrize("state", ["starting", "failed", "stopped", "bogus", ""])
def test_reports_a_worker_may_not_make_are_ignored(state: str) -> None:
    sup, spawner, _ = make(busid("1-1"))
    pid = steady(sup, "busid:1-1", spawner)
    sup.on_report("busid:1-1", pid, state, error="x")
    assert sup.slots["busid:1-1"].state == State.EXPORTED
    assert sup.slots["busid:1-1"].last_error is None


def test_reports_for_unknown_exports_or_pids_are_ignored() -> None:
    sup, spawner, _ = make(busid("1-1"))
    pid = spawner.pid_of("busid:1-1")
    sup.on_report("busid:9-9", pid, "exported")
    sup.on_report("busid:1-1", pid + 50, "exported")
    sup.on_exit("busid:9-9", pid, 1)
    assert sup.slots["busid:1-1"].state == State.STARTING
    assert list(sup.slots) == ["busid:1-1"]


# ---------------------------------------------------------------- restarts

def test_a_worker_dying_after_a_steady_state_is_restarted_at_once_every_time() -> None:
    """The kernel keeps the export; the new worker adopts it.  Never 'flapping'."""
    sup, spawner, clock = make(busid("1-1"))
    key = "busid:1-1"
    slot = sup.slots[key]
    for n in range(1, 21):
        old = steady(sup, key, spawner)
        clock.advance(0.1)
        spawner.exit(sup, old, -signal.SIGKILL)
        assert slot.state == State.BACKOFF and slot.pid is None and slot.remote is None
        assert slot.restart_at == clock.now
        assert slot.last_error == "worker exited with signal SIGKILL"
        sup.tick()
        new = spawner.pid_of(key)
        assert new != old and slot.pid == new and slot.state == State.STARTING
        assert slot.restarts == n
    assert len(spawner.spawned) == 21
    assert spawner.signals == []


def test_waiting_counts_as_steady() -> None:
    sup, spawner, clock = make(busid("1-1"), options=replace(OPTIONS, restart_limit=1))
    key = "busid:1-1"
    for _ in range(5):
        pid = spawner.pid_of(key)
        sup.on_report(key, pid, "waiting", error="device not present")
        spawner.exit(sup, pid, 1)
        assert sup.slots[key].restart_at == clock.now
        sup.tick()
    assert sup.slots[key].restarts == 5 and sup.slots[key].state == State.STARTING


def test_crashes_before_a_steady_state_back_off_then_fail() -> None:
    opts = replace(OPTIONS, restart_limit=4, restart_window=60.0, backoff_initial=0.5,
                   backoff_max=1.5)
    sup, spawner, clock = make(busid("1-1"), options=opts)
    key = "busid:1-1"
    slot = sup.slots[key]
    delays = []
    for _ in range(4):
        pid = spawner.pid_of(key)
        sup.on_report(key, pid, "exporting")  # came up, never got to exported
        spawner.exit(sup, pid, 1)
        assert slot.state == State.BACKOFF and slot.last_error == "worker exited with status 1"
        assert slot.restart_at is not None
        delays.append(slot.restart_at - clock.now)
        sup.tick()
        if delays[-1] > 0:
            assert slot.pid is None, "restarted before its backoff"
            clock.advance(delays[-1])
            sup.tick()
        assert slot.pid is not None
    assert delays == [0.0, 0.5, 1.0, 1.5]  # at once, then doubling, capped
    # The fifth crash within the window is one too many: failed, paused for the window.
    spawner.exit(sup, spawner.pid_of(key), 1)
    assert slot.state == State.FAILED and slot.pid is None
    assert slot.restart_at == clock.now + 60.0
    clock.advance(59.9)
    sup.tick()
    assert slot.state == State.FAILED and not spawner.live
    clock.advance(0.1)
    sup.tick()
    assert slot.state == State.STARTING and slot.pid == spawner.pid_of(key)
    assert slot.restarts == 5
    # A fresh start: the next crash is retried at once again.
    spawner.exit(sup, slot.pid, 1)
    assert slot.state == State.BACKOFF and slot.restart_at == clock.now


def test_crashes_outside_the_window_are_forgotten() -> None:
    sup, spawner, clock = make(busid("1-1"), options=replace(OPTIONS, restart_limit=1,
                                                             restart_window=10.0))
    key = "busid:1-1"
    for _ in range(5):
        spawner.exit(sup, spawner.pid_of(key), 1)
        assert sup.slots[key].state == State.BACKOFF
        assert sup.slots[key].restart_at == clock.now  # one crash in the window: at once
        sup.tick()
        clock.advance(10.0)


def test_reaching_steady_forgets_earlier_crashes() -> None:
    sup, spawner, clock = make(busid("1-1"), options=replace(OPTIONS, restart_limit=2))
    key = "busid:1-1"
    for _ in range(2):
        spawner.exit(sup, spawner.pid_of(key), 1)
        clock.advance(5)
        sup.tick()
    steady(sup, key, spawner)
    sup.on_report(key, spawner.pid_of(key), "backoff", error="export dropped")
    assert sup.slots[key].crashes == []
    spawner.exit(sup, spawner.pid_of(key), 1)
    assert sup.slots[key].restart_at == clock.now  # steady before: at once


def test_a_worker_stopping_on_its_own_is_restarted() -> None:
    """SIGTERM from someone else: the worker cleans up, says 'stopping' and exits 0.
    The parent did not ask for that; the export is wanted, so it is restarted."""
    sup, spawner, _ = make(busid("1-1"))
    key = "busid:1-1"
    pid = steady(sup, key, spawner)
    sup.on_report(key, pid, "stopping")
    spawner.exit(sup, pid, 0)
    sup.tick()
    slot = sup.slots[key]
    assert slot.state == State.STARTING and slot.pid == spawner.pid_of(key) != pid
    assert slot.restarts == 1


def test_a_failed_fork_is_a_crash_not_the_end_of_the_supervisor() -> None:
    clock = FakeClock()
    spawner = FakeSpawner(fail=[fork_failure()])
    sup = Supervisor(config(busid("1-1"), busid("1-2")), spawner, clock)
    sup.start()
    a, b = sup.slots["busid:1-1"], sup.slots["busid:1-2"]
    assert a.pid is None and a.state == State.BACKOFF
    assert a.last_error is not None and "Resource temporarily unavailable" in a.last_error
    assert b.pid == spawner.pid_of("busid:1-2")  # the others still start
    spawner.fail.append(fork_failure())
    sup.tick()
    assert a.pid is None and a.state == State.BACKOFF
    clock.advance(10)
    sup.tick()
    assert a.pid == spawner.pid_of("busid:1-1") and a.state == State.STARTING


def test_late_messages_from_a_replaced_worker_are_ignored() -> None:
    sup, spawner, _ = make(busid("1-1"))
    key = "busid:1-1"
    old = steady(sup, key, spawner)
    spawner.exit(sup, old, -9)
    sup.tick()
    new = spawner.pid_of(key)
    sup.on_report(key, old, "exported", remote="stale:1")
    sup.on_report(key, old, "backoff", error="stale")
    sup.on_exit(key, old, 1)
    slot = sup.slots[key]
    assert (slot.pid, slot.state, slot.remote, slot.restarts) == (new, State.STARTING, None, 1)
    assert slot.last_error == "worker exited with signal SIGKILL"


# ---------------------------------------------------------------- stop

def test_shutdown_stops_every_worker_and_is_done_when_all_exited() -> None:
    sup, spawner, clock = make(busid("1-1"), busid("1-2"), gadget("sup"))
    pids = {k: spawner.pid_of(k) for k in sup.slots}
    steady(sup, "busid:1-1", spawner)
    sup.shutdown()
    assert sorted(spawner.signals) == sorted((p, TERM) for p in pids.values())
    assert all(s.state == State.STOPPING for s in sup.slots.values())
    # A worker's own 'stopping' and late reports do not change that.
    sup.on_report("busid:1-1", pids["busid:1-1"], "stopping")
    sup.on_report("busid:1-2", pids["busid:1-2"], "exported", remote="x")
    assert sup.slots["busid:1-2"].state == State.STOPPING
    sup.shutdown()  # twice: no second round of signals
    assert len(spawner.signals) == 3
    spawner.exit(sup, pids["busid:1-1"], 0)
    spawner.exit(sup, pids["busid:1-2"], 0)
    assert not sup.done
    assert sup.slots["busid:1-1"].state == State.STOPPED
    clock.advance(100)
    sup.tick()  # no restarts while shutting down
    assert sup.slots["busid:1-1"].pid is None
    spawner.exit(sup, pids["gadget:sup"], 3)
    assert sup.done
    assert sup.slots["gadget:sup"].last_error == "worker exited with status 3 while stopping"
    assert not spawner.live and len(spawner.spawned) == 3


def test_a_worker_ignoring_sigterm_is_killed_after_the_grace() -> None:
    sup, spawner, clock = make(busid("1-1"))
    pid = spawner.pid_of("busid:1-1")
    sup.shutdown()
    clock.advance(STOP_GRACE - 0.1)
    sup.tick()
    assert spawner.signalled(pid) == [TERM]
    clock.advance(0.1)
    sup.tick()
    sup.tick()
    assert spawner.signalled(pid) == [TERM, KILL]  # once
    assert not sup.done
    spawner.exit(sup, pid, -9)
    assert sup.done


def test_shutdown_with_a_worker_waiting_for_its_restart() -> None:
    sup, spawner, clock = make(busid("1-1"), options=replace(OPTIONS, restart_limit=1))
    spawner.exit(sup, spawner.pid_of("busid:1-1"), 1)
    spawner.exit(sup, (sup.tick(), spawner.pid_of("busid:1-1"))[1], 1)
    assert sup.slots["busid:1-1"].state == State.FAILED
    sup.shutdown()
    assert sup.done and spawner.signals == []
    assert sup.slots["busid:1-1"].state == State.STOPPED
    clock.advance(1000)
    sup.tick()
    assert not spawner.live


def test_done_needs_a_shutdown() -> None:
    sup, _, _ = make(match(*FTDI))
    assert not sup.done
    sup.shutdown()
    assert sup.done


# ---------------------------------------------------------------- reload

def test_reload_starts_stops_restarts_and_leaves_the_rest() -> None:
    sup, spawner, _ = make(busid("1-1"), busid("1-2"), gadget("sup", "usbip-vudc.0"))
    pids = {k: spawner.pid_of(k) for k in sup.slots}
    steady(sup, "busid:1-1", spawner)
    sup.reload(config(busid("1-1"), gadget("sup", "usbip-vudc.1"), busid("2-1")))
    # unchanged: untouched
    assert sup.slots["busid:1-1"].pid == pids["busid:1-1"]
    assert sup.slots["busid:1-1"].state == State.EXPORTED
    assert spawner.signalled(pids["busid:1-1"]) == []
    # added: started
    new = spawner.pid_of("busid:2-1")
    assert sup.slots["busid:2-1"].state == State.STARTING
    # removed and changed: asked to stop
    assert spawner.signalled(pids["busid:1-2"]) == [TERM]
    assert spawner.signalled(pids["gadget:sup"]) == [TERM]
    assert sup.slots["busid:1-2"].state == State.STOPPING
    # the changed one's replacement waits for the old worker to be gone
    assert spawner.pid_of("gadget:sup") == pids["gadget:sup"]
    spawner.exit(sup, pids["busid:1-2"], 0)
    assert "busid:1-2" not in sup.slots
    spawner.exit(sup, pids["gadget:sup"], 0)
    g = sup.slots["gadget:sup"]
    assert g.pid == spawner.pid_of("gadget:sup") not in pids.values()
    assert g.job.spec.udc == "usbip-vudc.1" and g.state == State.STARTING
    assert sorted(spawner.live.values()) == ["busid:1-1", "busid:2-1", "gadget:sup"]
    assert new == spawner.pid_of("busid:2-1")
    assert sup.config.exports[1].udc == "usbip-vudc.1"


def test_reload_of_the_same_configuration_changes_nothing() -> None:
    sup, spawner, _ = make(busid("1-1"), match(*FTDI), devices=(device("1-2", *FTDI),))
    before = dict(spawner.live)
    sup.reload(config(busid("1-1"), match(*FTDI)))
    assert spawner.live == before and spawner.signals == []
    assert len(spawner.spawned) == 2


def test_a_changed_server_restarts_every_export() -> None:
    sup, spawner, _ = make(busid("1-1"), busid("1-2"))
    old = set(spawner.live)
    sup.reload(config(busid("1-1"), busid("1-2"), port=3241))
    assert sorted(p for p, _ in spawner.signals) == sorted(old)
    for pid in sorted(old):
        spawner.exit(sup, pid, 0)
    assert all(j.server.port == 3241 for _, j in spawner.spawned[2:])
    assert len(spawner.live) == 2


def test_removed_then_added_back_before_the_old_worker_exits() -> None:
    sup, spawner, _ = make(busid("1-1"))
    pid = spawner.pid_of("busid:1-1")
    sup.reload(config())
    sup.reload(config(busid("1-1")))
    spawner.exit(sup, pid, 0)
    assert list(sup.slots) == ["busid:1-1"], "the export is configured: it must run"
    assert sup.slots["busid:1-1"].pid == spawner.pid_of("busid:1-1") != pid


def test_changed_then_changed_back_runs_the_current_configuration() -> None:
    sup, spawner, _ = make(gadget("sup", "usbip-vudc.0"))
    pid = spawner.pid_of("gadget:sup")
    sup.reload(config(gadget("sup", "usbip-vudc.1")))
    sup.reload(config(gadget("sup", "usbip-vudc.0")))
    spawner.exit(sup, pid, 0)
    assert sup.slots["gadget:sup"].job.spec.udc == "usbip-vudc.0"
    assert spawner.job_of(spawner.pid_of("gadget:sup")).spec.udc == "usbip-vudc.0"


def test_changed_then_removed_runs_nothing() -> None:
    sup, spawner, _ = make(gadget("sup", "usbip-vudc.0"))
    pid = spawner.pid_of("gadget:sup")
    sup.reload(config(gadget("sup", "usbip-vudc.1")))
    sup.reload(config(busid("1-1")))
    spawner.exit(sup, pid, 0)
    assert sorted(spawner.live.values()) == ["busid:1-1"]
    assert list(sup.slots) == ["busid:1-1"]


def test_reload_while_shutting_down_starts_nothing() -> None:
    sup, spawner, _ = make(busid("1-1"))
    pid = spawner.pid_of("busid:1-1")
    sup.shutdown()
    sup.reload(config(busid("1-1"), busid("1-2")))
    assert list(spawner.live) == [pid]
    spawner.exit(sup, pid, 0)
    assert sup.done and not spawner.live


def test_reload_removes_a_failed_export_at_once() -> None:
    sup, spawner, _ = make(busid("1-1"), options=replace(OPTIONS, restart_limit=1))
    spawner.exit(sup, spawner.pid_of("busid:1-1"), 1)
    sup.tick()
    spawner.exit(sup, spawner.pid_of("busid:1-1"), 1)
    assert sup.slots["busid:1-1"].state == State.FAILED
    sup.reload(config(busid("1-2")))
    assert list(sup.slots) == ["busid:1-2"]


def test_a_device_changing_hands_waits_for_its_old_worker() -> None:
    """A reload names a device that a match entry exported: the new busid worker starts
    only once the match worker has unexported and let go of the device."""
    sup, spawner, _ = make(match(*FTDI), devices=(device("1-2", *FTDI),))
    old = spawner.pid_of("match:0403:6001@1-2")
    sup.reload(config(match(*FTDI), busid("1-2")))
    assert spawner.signalled(old) == [TERM]
    assert list(spawner.live) == [old], "the device still belongs to the old worker"
    spawner.exit(sup, old, 0)
    assert sorted(sup.slots) == ["busid:1-2"]
    assert sup.slots["busid:1-2"].pid == spawner.pid_of("busid:1-2")


# ---------------------------------------------------------------- hotplug

def test_hotplug_starts_and_stops_match_workers() -> None:
    sup, spawner, _ = make(busid("1-1"), match(*FTDI))
    assert list(sup.slots) == ["busid:1-1"]
    sup.on_device("add", device("1-4", 0x1234, 0x5678))  # not ours
    sup.on_device("add", device("1-2", *FTDI))
    key = "match:0403:6001@1-2"
    pid = spawner.pid_of(key)
    assert sup.slots[key].job.busid == "1-2"
    sup.on_device("add", device("1-2", *FTDI))  # a repeated event
    sup.on_device("bind", device("1-2", *FTDI))  # not an add/remove
    assert len(spawner.spawned) == 2
    sup.on_device("remove", device("1-2", *FTDI))
    assert spawner.signalled(pid) == [TERM] and sup.slots[key].state == State.STOPPING
    spawner.exit(sup, pid, 0)
    assert key not in sup.slots
    # The device named by bus id: its worker waits for it by itself.
    sup.on_device("remove", device("1-1", *FTDI))
    sup.on_device("add", device("1-1", *FTDI))
    assert list(sup.slots) == ["busid:1-1"] and spawner.signals == [(pid, TERM)]


def test_replugged_before_the_old_worker_exited() -> None:
    sup, spawner, _ = make(match(*FTDI), devices=(device("1-2", *FTDI),))
    key = "match:0403:6001@1-2"
    pid = spawner.pid_of(key)
    sup.on_device("remove", device("1-2", *FTDI))
    sup.on_device("add", device("1-2", *FTDI))
    spawner.exit(sup, pid, 0)
    assert key in sup.slots, "the device is back: it must be exported"
    assert sup.slots[key].pid == spawner.pid_of(key) != pid


def test_hotplug_while_shutting_down_starts_nothing() -> None:
    sup, spawner, _ = make(match(*FTDI))
    sup.shutdown()
    sup.on_device("add", device("1-2", *FTDI))
    assert sup.slots == {} and not spawner.spawned and sup.done


def test_a_match_worker_whose_device_left_and_that_finished_is_dropped() -> None:
    sup, spawner, _ = make(match(*FTDI), devices=(device("1-2", *FTDI),))
    key = "match:0403:6001@1-2"
    pid = spawner.pid_of(key)
    sup.devices.pop("1-2")  # the remove event has not been handled yet
    sup.on_exit(key, pid, 0)
    spawner.live.pop(pid)
    assert key not in sup.slots


# ---------------------------------------------------------------- status

def test_status_and_summary() -> None:
    sup, spawner, clock = make(busid("1-1"), busid("1-2"), gadget("sup", "usbip-vudc.1"),
                               match(*FTDI), devices=(device("1-3", *FTDI),))
    p11 = steady(sup, "busid:1-1", spawner, remote="10.0.0.1:3240")
    sup.on_report("busid:1-2", spawner.pid_of("busid:1-2"), "waiting",
                  error="device not present")
    clock.advance(75.25)
    spawner.exit(sup, spawner.pid_of("match:0403:6001@1-3"), -15)
    st = {e["export"]: e for e in sup.status()}
    assert [e["export"] for e in sup.status()] == sorted(st)
    assert st["busid:1-1"] == {
        "export": "busid:1-1", "busid": "1-1", "gadget": None, "pid": p11,
        "state": "exported", "state_for": 75.2, "uptime": 75.2, "remote": "10.0.0.1:3240",
        "transport": "ktls", "restarts": 0, "last_error": None,
    }
    assert st["busid:1-2"]["state"] == "waiting"
    assert st["busid:1-2"]["last_error"] == "device not present"
    assert st["gadget:sup"]["busid"] == "usbip-vudc.1" and st["gadget:sup"]["gadget"] == "sup"
    m = st["match:0403:6001@1-3"]
    assert (m["busid"], m["pid"], m["state"], m["uptime"], m["state_for"]) == (
        "1-3", None, "backoff", None, 0.0)
    assert m["last_error"] == "worker exited with signal SIGTERM"
    assert sup.summary() == "1 backoff, 1 exported, 1 starting, 1 waiting"
    sup.tick()
    m = {e["export"]: e for e in sup.status()}["match:0403:6001@1-3"]
    assert (m["restarts"], m["uptime"], m["state"]) == (1, 0.0, "starting")


def test_status_shows_the_vudc_a_gadget_worker_got() -> None:
    sup, spawner, _ = make(gadget("sup"))  # udc = auto
    assert sup.status()[0]["busid"] is None
    pid = spawner.pid_of("gadget:sup")
    sup.on_report("gadget:sup", pid, "exporting", busid="usbip-vudc.1")
    assert sup.status()[0]["busid"] == "usbip-vudc.1"
    sup.on_report("gadget:sup", pid + 1, "exported", busid="usbip-vudc.3")  # not its worker
    assert sup.status()[0]["busid"] == "usbip-vudc.1"


def test_uptime_with_a_clock_starting_at_zero() -> None:
    clock = FakeClock(0.0)
    spawner = FakeSpawner()
    sup = Supervisor(config(busid("1-1")), spawner, clock)
    sup.start()
    clock.advance(3)
    assert sup.status()[0]["uptime"] == 3.0


# ---------------------------------------------------------------- random event sequences

POOL = [busid("1-1"), busid("1-2"), match(*FTDI), match(0x0403), gadget("sup", "usbip-vudc.0"),
        gadget("sup", "usbip-vudc.1"), gadget("other")]
DEVICES = [device("1-1", *FTDI), device("1-2", 0x0403, 0x6010), device("1-3", *FTDI),
           device("2-1", 0x1234, 0x5678)]
STATES = ["exporting", "exported", "backoff", "waiting", "stopping", "starting", "failed"]


def pool_config(picks: list[int], port: int) -> SupervisorConfig:
    exports: dict[str, ExportSpec] = {}
    for i in picks:
        exports.setdefault(POOL[i].key, POOL[i])  # a valid config has no repeated key
    return config(*exports.values(), port=port,
                  options=replace(OPTIONS, restart_limit=2, restart_window=30.0))


events = st.one_of(
    st.tuples(st.just("report"), st.integers(0, 20), st.sampled_from(STATES)),
    st.tuples(st.just("exit"), st.integers(0, 20), st.sampled_from([0, 1, -9, -15])),
    st.tuples(st.just("late"), st.integers(0, 50), st.sampled_from(STATES)),
    st.tuples(st.just("device"), st.sampled_from(["add", "remove"]),
              st.integers(0, len(DEVICES) - 1)),
    st.tuples(st.just("reload"), st.lists(st.integers(0, len(POOL) - 1), max_size=5),
              st.sampled_from([3240, 3241])),
    st.tuples(st.just("tick"), st.sampled_from([0.0, 0.5, 1.0, STOP_GRACE, 31.0])),
    st.tuples(st.just("fork-fails")),
    st.tuples(st.just("shutdown")),
)


def check(sup: Supervisor, spawner: FakeSpawner) -> None:
    """What must hold after every event."""
    slot_pids = {s.pid: k for k, s in sup.slots.items() if s.pid is not None}
    # Every live worker is some slot's current worker: none forgotten, none doubled.
    assert slot_pids == spawner.live, (slot_pids, spawner.live)
    wanted = {} if sup.shutting_down else jobs_for(sup.config, sup.devices.values())
    for key, slot in sup.slots.items():
        if slot.pid is None:
            continue
        if key not in wanted or slot.job != wanted[key]:
            # not (or no longer) what the configuration asks for: on its way out
            assert slot.state == State.STOPPING, (key, slot.state)
            assert TERM in spawner.signalled(slot.pid)
    # One live worker per device, even while one is stopping: the old one's clean-up
    # (unexport, unbind) would pull the device from under the new one.
    busids = [s.job.busid for s in sup.slots.values() if s.pid is not None and s.job.busid]
    assert len(busids) == len(set(busids)), f"two workers on one device: {busids}"
    if sup.done:
        assert not spawner.live


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(start=st.lists(st.integers(0, len(POOL) - 1), max_size=4),
       present=st.sets(st.integers(0, len(DEVICES) - 1)),
       script=st.lists(events, max_size=40))
def test_random_event_sequences_keep_the_invariants(start: list[int], present: set[int],
                                                    script: list[tuple]) -> None:
    clock = FakeClock()
    spawner = FakeSpawner()
    sup = Supervisor(pool_config(start, 3240), spawner, clock)
    sup.start([DEVICES[i] for i in sorted(present)])
    dead: list[tuple[int, str]] = []
    check(sup, spawner)
    for ev in script:
        live = sorted(spawner.live)
        if ev[0] == "report" and live:
            pid = live[ev[1] % len(live)]
            sup.on_report(spawner.live[pid], pid, ev[2], remote="r", error="e")
        elif ev[0] == "exit" and live:
            pid = live[ev[1] % len(live)]
            dead.append((pid, spawner.live[pid]))
            spawner.exit(sup, pid, ev[2])
        elif ev[0] == "late" and dead:
            pid, key = dead[ev[1] % len(dead)]
            sup.on_report(key, pid, ev[2])
            sup.on_exit(key, pid, 1)
        elif ev[0] == "device":
            sup.on_device(ev[1], DEVICES[ev[2]])
        elif ev[0] == "reload":
            sup.reload(pool_config(ev[1], ev[2]))
        elif ev[0] == "tick":
            clock.advance(ev[1])
            sup.tick()
        elif ev[0] == "fork-fails":
            spawner.fail.append(fork_failure())
        elif ev[0] == "shutdown":
            sup.shutdown()
        check(sup, spawner)
    # Settle: workers asked to stop exit, time passes; then the running workers are
    # exactly what the configuration asks for (or, shutting down, none are left).
    spawner.fail.clear()
    for _ in range(6):
        for pid, key in sorted(spawner.live.items()):
            if sup.slots[key].state == State.STOPPING:
                spawner.exit(sup, pid, 0)
        clock.advance(61.0)
        sup.tick()
        check(sup, spawner)
    if sup.shutting_down:
        assert sup.done
        return
    wanted = jobs_for(sup.config, sup.devices.values())
    assert {k: s.job for k, s in sup.slots.items()} == wanted
    assert sorted(spawner.live.values()) == sorted(wanted)
