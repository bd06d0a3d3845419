"""The supervisor's core: one worker per exported device, as an explicit state machine.

States of an export (what ``supervisor status`` shows)::

    starting -> exporting -> exported -> backoff -> exporting -> ...
                    |            |          \\-> waiting (device absent)
                    +------------+--> stopping -> stopped
    crashed too often -> failed (restarts paused for restart_window)

``starting`` and ``stopping``/``stopped``/``failed`` are the parent's own;
the others are reported by the worker.  Every change of state goes through
the one checked table of :mod:`usbipx.daemon.states`: a move this class
should never make raises :class:`~usbipx.daemon.states.IllegalTransition`; a
worker's report the table refuses is ignored with a warning.

Everything that touches the OS -- forking, signalling, the clock -- is
behind :class:`Spawner` and ``clock``, so the logic here is tested without
processes.  The asyncio shell in :mod:`usbipx.daemon.runner` feeds events in:
:meth:`Supervisor.on_report`, :meth:`on_exit`, :meth:`on_device`,
:meth:`reload`, :meth:`shutdown`, :meth:`tick`.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from usbipx.daemon.config import ExportSpec, Options, ServerSpec, SupervisorConfig
from usbipx.daemon.states import WORKER_REPORTS, Event, State, allowed, transition
from usbipx.log import logger

if TYPE_CHECKING:
    from usbipx.metrics import Metrics

__all__ = ["STOP_GRACE", "Device", "Job", "Slot", "Spawner", "State", "Supervisor", "jobs_for"]

STOP_GRACE = 20.0
"""Seconds a worker gets to unexport and clean up before SIGKILL."""

STEADY = {State.EXPORTED, State.WAITING}
"""A worker that reached one of these came up properly; if it dies later it
was killed or hit something rare, and is restarted at once however often
that happens.  Only workers that die before getting there count as flapping."""


@dataclass(frozen=True)
class Job:
    """What one worker does: export one device (immutable, sent to the worker)."""

    key: str
    spec: ExportSpec
    busid: str | None
    server: ServerSpec
    options: Options


@dataclass(frozen=True)
class Device:
    """A USB device present on this host (for ``vendor``/``product`` exports)."""

    busid: str
    vendor: int
    product: int
    serial: str | None = None
    """Its serial number string (sysfs ``serial``), None if it has none."""


class Spawner(Protocol):
    """Starts and signals worker processes; the runner reports their messages and exits."""

    def spawn(self, job: Job) -> int:
        """Start a worker for ``job``; return its pid."""

    def signal(self, pid: int, sig: int) -> None:
        """Send ``sig`` to a worker (no error if it is already gone)."""


@dataclass
class Slot:
    """The parent's record of one export and its current worker."""

    job: Job
    state: State = State.STOPPED  # until its first worker starts
    pid: int | None = None
    since: float = 0.0
    started: float | None = None
    restarts: int = 0
    crashes: list[float] = field(default_factory=list)
    remote: str | None = None
    transport: str | None = None
    last_error: str | None = None
    restart_at: float | None = None
    kill_at: float | None = None
    busid: str | None = None
    steady: bool = False
    removing: bool = False
    replacement: Job | None = None
    lost: bool = False
    """Its export was lost (dropped after it was up): the next one is a re-export."""


def jobs_for(config: SupervisorConfig, devices: Iterable[Device]) -> dict[str, Job]:
    """The jobs a configuration asks for, given the devices present now."""
    jobs: dict[str, Job] = {}
    devices = list(devices)
    claimed: set[str] = set()  # a device matched by two entries goes to the first
    for spec in config.exports:
        if spec.kind == "match":
            for d in devices:
                if spec.matches(d.vendor, d.product, d.serial) and d.busid not in claimed:
                    claimed.add(d.busid)
                    key = f"{spec.key}@{d.busid}"
                    jobs[key] = Job(key, spec, d.busid, config.server, config.options)
        else:
            jobs[spec.key] = Job(spec.key, spec, spec.busid, config.server, config.options)
    # A device named by bus id is not also taken by a match entry.
    named = {j.busid for j in jobs.values() if j.spec.kind == "busid"}
    return {k: j for k, j in jobs.items() if j.spec.kind != "match" or j.busid not in named}


class Supervisor:
    """Decides which workers run, restarts crashed ones, and tracks their state."""

    def __init__(self, config: SupervisorConfig, spawner: Spawner,
                 clock: Callable[[], float] = time.monotonic,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.spawner = spawner
        self.clock = clock
        self.slots: dict[str, Slot] = {}
        self.devices: dict[str, Device] = {}
        self.shutting_down = False
        self.metrics = metrics
        if metrics is not None:
            metrics.live("usbipx_workers", "Exports in each state.", "state", self.by_state)
            metrics.live("usbipx_exports_active", "Exports each usbipa holds.", "peer",
                         self.by_remote)

    # -- lifecycle --------------------------------------------------------

    def start(self, devices: Iterable[Device] = ()) -> None:
        """Spawn a worker for every export the configuration asks for."""
        self.devices = {d.busid: d for d in devices}
        for job in jobs_for(self.config, self.devices.values()).values():
            self._add(job)

    def _add(self, job: Job) -> None:
        slot = Slot(job, since=self.clock())
        self.slots[job.key] = slot
        self._spawn(slot)

    def _apply(self, slot: Slot, event: Event, error: str | None = None) -> None:
        """Move ``slot`` on ``event``; the only place a slot's state changes.

        Raises :class:`~usbipx.daemon.states.IllegalTransition` (a bug) if the
        table does not allow it, before anything is changed.
        """
        state = transition(slot.state, event)
        if state != slot.state:
            logger.info("{}: {} -> {}{}", slot.job.key, slot.state, state,
                        f" ({error})" if error else "")
            slot.state = state
            slot.since = self.clock()
        if error:
            slot.last_error = error

    def _spawn(self, slot: Slot) -> None:
        self._apply(slot, Event.START)  # checked before a process exists
        slot.restart_at = None
        slot.kill_at = None
        slot.steady = False
        try:
            slot.pid = self.spawner.spawn(slot.job)
        except OSError as exc:  # fork failed (EAGAIN, ENOMEM...): a crash, not our end
            slot.pid = None
            self._crashed(slot, f"cannot start a worker: {exc}")
            return
        slot.started = self.clock()

    def _stop(self, slot: Slot, remove: bool) -> None:
        slot.removing = slot.removing or remove
        slot.restart_at = None
        if slot.pid is None:
            self._stopped(slot)
            return
        if slot.state != State.STOPPING:
            self._apply(slot, Event.STOP)
            self.spawner.signal(slot.pid, signal.SIGTERM)
            slot.kill_at = self.clock() + STOP_GRACE

    def _stopped(self, slot: Slot) -> None:
        self._apply(slot, Event.ENDED)
        slot.pid = None
        slot.kill_at = None
        if slot.replacement is not None:
            job, slot.replacement = slot.replacement, None
            del self.slots[slot.job.key]
            self._add(job)
        elif slot.removing:
            del self.slots[slot.job.key]
            self._start_deferred(slot.job.busid)

    def _holds(self, busid: str | None) -> bool:
        """Whether a live worker has the device ``busid`` (stopping ones included)."""
        return busid is not None and any(s.pid is not None and s.job.busid == busid
                                         for s in self.slots.values())

    def _start_deferred(self, busid: str | None) -> None:
        """A device's old worker is gone: start the job that now wants it, if any."""
        if self.shutting_down or busid is None:
            return
        for job in jobs_for(self.config, self.devices.values()).values():
            if job.busid == busid and job.key not in self.slots:
                self._add(job)

    def shutdown(self) -> None:
        """Stop every worker (each unexports and cleans up)."""
        self.shutting_down = True
        for slot in list(self.slots.values()):
            slot.replacement = None
            self._stop(slot, remove=False)

    @property
    def done(self) -> bool:
        """Shutting down and every worker has exited."""
        return self.shutting_down and all(s.pid is None for s in self.slots.values())

    def reload(self, config: SupervisorConfig) -> None:
        """Apply a new configuration: start new exports, stop removed ones,
        restart changed ones, leave unchanged ones untouched."""
        self.config = config
        if self.shutting_down:
            return  # nothing new starts now; every worker is on its way out
        self._converge("removed from the configuration", "changed in the configuration")

    def _converge(self, gone: str, changed: str) -> None:
        """Make the workers match the configuration and the devices present."""
        wanted = jobs_for(self.config, self.devices.values())
        for key, slot in list(self.slots.items()):
            if key not in wanted:
                logger.info("{}: {}", key, gone)
                slot.replacement = None
                self._stop(slot, remove=True)
        for key, job in wanted.items():
            current = self.slots.get(key)
            if current is None:
                if not self._holds(job.busid):
                    self._add(job)
                # else the device changes hands (e.g. a match job's device is now
                # named by busid): _start_deferred() starts this job once the old
                # worker has unexported and let go of it.
            elif current.removing:
                # Already on its way out (removed, changed, unplugged): the job
                # wanted now is started by _stopped() once the old worker is gone.
                current.replacement = job
            elif current.job != job:
                logger.info("{}: {}; restarting", key, changed)
                current.replacement = job
                self._stop(current, remove=True)

    # -- events from workers and the kernel --------------------------------

    def on_report(self, key: str, pid: int, state: str, remote: str | None = None,
                  error: str | None = None, busid: str | None = None,
                  transport: str | None = None) -> None:
        """A worker says where its export stands (and, for a gadget, which vUDC it got).

        A report that does not fit -- from a worker that is not the export's
        current one, of a state a worker may not report, or one the state table
        refuses -- is ignored with a warning: a worker cannot break the parent.
        """
        slot = self.slots.get(key)
        if slot is None or slot.pid != pid:
            logger.warning("{}: ignoring a report from worker {}, not the export's worker",
                           key, pid)
            return
        event = WORKER_REPORTS.get(state)
        if event is None or not allowed(slot.state, event):
            logger.warning("{}: ignoring worker {}'s report {!r} in state {}", key, pid, state,
                           slot.state)
            return
        if busid:
            slot.busid = busid
        if event is Event.STOPPING or transition(slot.state, event) is not State(event.value):
            # It says it is stopping, not asked by us (SIGTERM from elsewhere):
            # when it exits it is restarted like any worker that died, so keep
            # the state we know.  Or we asked it to stop: it is on its way,
            # whatever it says.
            return
        st = State(event.value)
        if self.metrics is not None:
            self._count(slot, st)
        if st in STEADY:
            slot.steady = True
            slot.crashes.clear()
        if st == State.EXPORTED:
            slot.remote, slot.transport = remote, transport
        elif st in (State.BACKOFF, State.WAITING):
            slot.remote = slot.transport = None
        self._apply(slot, event, error)

    def _count(self, slot: Slot, st: State) -> None:
        """Link losses (an export dropped) and re-exports (made again after one)."""
        assert self.metrics is not None
        if slot.state == State.EXPORTED and st == State.BACKOFF:
            self.metrics.link_losses.inc()
            slot.lost = True
        elif st == State.EXPORTED and slot.state != State.EXPORTED and slot.lost:
            self.metrics.reexports.inc()
            slot.lost = False

    def on_exit(self, key: str, pid: int, code: int) -> None:
        """A worker process ended with ``code`` (negative: killed by that signal)."""
        slot = self.slots.get(key)
        if slot is None or slot.pid != pid:
            return
        now = self.clock()
        if slot.state == State.STOPPING or self.shutting_down or slot.removing:
            if code != 0:
                slot.last_error = f"worker exited with {_describe_exit(code)} while stopping"
            self._stopped(slot)
            return
        slot.pid = None
        slot.remote = slot.transport = None
        if code == 0 and slot.job.spec.kind == "match" and slot.job.busid not in self.devices:
            # The device went away and its worker finished cleanly.
            self._stopped(slot)
            del self.slots[key]
            return
        slot.last_error = f"worker exited with {_describe_exit(code)}"
        if slot.steady:
            # Killed after coming up: the kernel keeps the export, and a new
            # worker adopts it; restart at once.
            self._apply(slot, Event.DIED)
            slot.restart_at = now
            return
        self._crashed(slot, None)

    def _crashed(self, slot: Slot, error: str | None) -> None:
        """A worker failed before coming up: restart it, with backoff, or pause if flapping."""
        now = self.clock()
        window = self.config.options.restart_window
        slot.crashes = [t for t in slot.crashes if now - t < window] + [now]
        if len(slot.crashes) > self.config.options.restart_limit:
            logger.error("{}: worker crashed {} times in {:.0f} s; pausing restarts",
                         slot.job.key, len(slot.crashes), window)
            self._apply(slot, Event.FLAPPING, error)
            slot.restart_at = now + window
            slot.crashes.clear()
            return
        # A worker that fails to come up is retried at once, then with backoff.
        opts = self.config.options
        delay = 0.0 if len(slot.crashes) == 1 else min(
            opts.backoff_initial * 2 ** (len(slot.crashes) - 2), opts.backoff_max)
        self._apply(slot, Event.DIED, error)
        slot.restart_at = now + delay

    def on_device(self, action: str, device: Device) -> None:
        """A USB device was plugged in (``add``) or removed (``remove``)."""
        if action == "add":
            self.devices[device.busid] = device
        elif action == "remove":
            self.devices.pop(device.busid, None)
        else:
            return
        if self.shutting_down:
            return
        self._converge(f"device {device.busid} removed", "changed")

    def tick(self) -> None:
        """Do what is due: scheduled restarts, SIGKILL of workers that ignore SIGTERM."""
        now = self.clock()
        for slot in list(self.slots.values()):
            if slot.restart_at is not None and now >= slot.restart_at and not self.shutting_down:
                slot.restarts += 1
                if self.metrics is not None:
                    self.metrics.worker_restarts.inc()
                self._spawn(slot)
            if slot.kill_at is not None and now >= slot.kill_at and slot.pid is not None:
                logger.warning("{}: worker {} did not stop in {:.0f} s; killing it",
                               slot.job.key, slot.pid, STOP_GRACE)
                self.spawner.signal(slot.pid, signal.SIGKILL)
                slot.kill_at = None

    # -- reporting ----------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """One entry per export, for ``supervisor status``."""
        now = self.clock()
        out = []
        for key, s in sorted(self.slots.items()):
            out.append({
                "export": key,
                "busid": s.busid or s.job.busid or s.job.spec.udc,
                "gadget": s.job.spec.gadget.name if s.job.spec.gadget else None,
                "pid": s.pid,
                "state": str(s.state),
                "state_for": round(now - s.since, 1),
                "uptime": (round(now - s.started, 1)
                           if s.started is not None and s.pid is not None else None),
                "remote": s.remote,
                "transport": s.transport,
                "restarts": s.restarts,
                "last_error": s.last_error,
            })
        return out

    def by_state(self) -> dict[str, float]:
        """How many exports are in each state (every state, none left out)."""
        counts: dict[str, float] = {str(st): 0 for st in State}
        for s in list(self.slots.values()):
            counts[str(s.state)] += 1
        return counts

    def by_remote(self) -> dict[str, float]:
        """How many exports each usbipa (its URL) holds now."""
        counts: dict[str, float] = {}
        for s in list(self.slots.values()):
            if s.state == State.EXPORTED and s.remote:
                counts[s.remote] = counts.get(s.remote, 0) + 1
        return counts

    def summary(self) -> str:
        """``3 exported, 1 backoff`` for systemd's STATUS=."""
        counts: dict[str, int] = {}
        for s in self.slots.values():
            counts[str(s.state)] = counts.get(str(s.state), 0) + 1
        return ", ".join(f"{n} {st}" for st, n in sorted(counts.items())) or "no exports"


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"
