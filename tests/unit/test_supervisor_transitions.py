"""The supervisor's one state table: every (state, event) pair against a grid written
out here by hand, illegal moves of the parent raising, and a worker's reports that do not
fit ignored with a warning instead of breaking the parent."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from loguru import logger
from supervisor_helpers import FakeClock, FakeSpawner, busid, config

from usbipx.daemon.states import (
    TRANSITIONS,
    Event,
    IllegalTransition,
    State,
    allowed,
    transition,
)
from usbipx.daemon.supervisor import Supervisor
from usbipx.errors import UsbipError

# Rows: the state now.  Columns: the event.  Cells: the state after it, "-" if refused.
GRID = """
           start     exporting exported backoff waiting stopping  stop     ended   died    flapping
starting   -         exporting exported backoff waiting starting  stopping stopped backoff failed
exporting  -         exporting exported backoff waiting exporting stopping stopped backoff failed
exported   -         exporting exported backoff waiting exported  stopping stopped backoff -
backoff    starting  exporting exported backoff waiting backoff   stopping stopped backoff failed
waiting    -         exporting exported backoff waiting waiting   stopping stopped backoff -
stopping   -         stopping  stopping stopping stopping stopping stopping stopped -       -
stopped    starting  -         -        -       -       -         -        stopped -       -
failed     starting  -         -        -       -       -         -        stopped -       -
"""


def grid() -> Iterator[tuple[State, Event, State | None]]:
    header, *rows = GRID.strip().splitlines()
    events = [Event(e) for e in header.split()]
    for row in rows:
        state, *cells = row.split()
        assert len(cells) == len(events), row
        for event, cell in zip(events, cells, strict=True):
            yield State(state), event, None if cell == "-" else State(cell)


CELLS = list(grid())


def test_the_grid_covers_every_state_and_event() -> None:
    assert {(s, e) for s, e, _ in CELLS} == {(s, e) for s in State for e in Event}
    assert set(TRANSITIONS) == set(State)


@pytest.mark.parametrize(("state", "event", "after"), CELLS,
                         ids=[f"{s}-{e}" for s, e, _ in CELLS])
def test_every_state_and_event(state: State, event: Event, after: State | None) -> None:
    assert allowed(state, event) is (after is not None)
    if after is not None:
        assert transition(state, event) is after
        return
    with pytest.raises(IllegalTransition) as info:
        transition(state, event)
    assert isinstance(info.value, UsbipError)
    assert (info.value.state, info.value.event) == (state, event)
    assert str(info.value) == f"event {event.value!r} is not allowed in state {state.value!r}"


# ---------------------------------------------------------------- in the supervisor

@pytest.fixture
def warnings() -> Iterator[list[str]]:
    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level="WARNING")
    yield seen
    logger.remove(sink)


def make() -> tuple[Supervisor, FakeSpawner, FakeClock]:
    clock = FakeClock()
    spawner = FakeSpawner()
    sup = Supervisor(config(busid("1-1")), spawner, clock)
    sup.start()
    return sup, spawner, clock


def test_a_second_worker_for_a_running_export_is_refused_before_it_is_forked() -> None:
    """A bug that would start another worker beside a live one raises instead."""
    sup, spawner, clock = make()
    key = "busid:1-1"
    pid = spawner.pid_of(key)
    sup.on_report(key, pid, "exported", remote="10.0.0.1:3240")
    slot = sup.slots[key]
    slot.restart_at = clock.now  # what no code path may do to a running export
    with pytest.raises(IllegalTransition, match="'start' is not allowed in state 'exported'"):
        sup.tick()
    assert len(spawner.spawned) == 1 and slot.pid == pid and slot.state == State.EXPORTED


def test_stopping_a_failed_export_does_not_signal_anybody() -> None:
    sup, spawner, _ = make()
    slot = sup.slots["busid:1-1"]
    sup._apply(slot, Event.FLAPPING, "crashed")
    with pytest.raises(IllegalTransition):
        sup._apply(slot, Event.STOP)
    assert slot.state == State.FAILED and spawner.signals == []


@pytest.mark.parametrize("report", ["start", "stop", "ended", "died", "flapping", "starting",
                                    "failed", "stopped", "None", "", "EXPORTED", "exported\n"])
def test_a_report_no_worker_may_make_is_ignored_with_a_warning(
        warnings: list[str], report: str) -> None:
    sup, spawner, clock = make()
    key = "busid:1-1"
    pid = spawner.pid_of(key)
    sup.on_report(key, pid, "backoff", error="connection refused")
    slot = sup.slots[key]
    since = slot.since
    clock.advance(1)
    sup.on_report(key, pid, report, error="x", busid="9-9")
    assert (slot.state, slot.since, slot.last_error, slot.busid) == (
        State.BACKOFF, since, "connection refused", None)
    assert len(warnings) == 1 and repr(report) in warnings[0], warnings


def test_a_late_report_is_ignored_with_a_warning(warnings: list[str]) -> None:
    sup, spawner, _ = make()
    key = "busid:1-1"
    pid = spawner.pid_of(key)
    spawner.exit(sup, pid, 1)  # a crash: restarted at once
    sup.tick()
    new = spawner.pid_of(key)
    sup.on_report(key, pid, "exported", remote="stale:1")
    sup.on_report("busid:9-9", new, "exported")
    slot = sup.slots[key]
    assert (slot.pid, slot.state, slot.remote) == (new, State.STARTING, None)
    assert len(warnings) == 2 and all("ignoring a report from worker" in w for w in warnings)


def test_reports_after_a_stop_leave_it_stopping_silently(warnings: list[str]) -> None:
    """A worker asked to stop may still say anything before it sees SIGTERM: expected,
    no warning, and the export stays stopping."""
    sup, spawner, _ = make()
    key = "busid:1-1"
    pid = spawner.pid_of(key)
    sup.shutdown()
    for report in ("exporting", "exported", "backoff", "waiting", "stopping"):
        sup.on_report(key, pid, report, remote="r", error="e")
    slot = sup.slots[key]
    assert (slot.state, slot.remote, slot.last_error) == (State.STOPPING, None, None)
    assert warnings == []
