"""Where a supervised export stands, and the one table of how that may change.

In the manner of h11's state tables: :data:`TRANSITIONS` is data -- for each
:class:`State`, the :class:`Event` s it accepts and the state each leads to --
and :func:`transition` is the one function that consults it.  An event a
state does not accept raises :class:`IllegalTransition`.

Events come from two sides.  The parent's own (:attr:`Event.START`,
:attr:`~Event.STOP`, :attr:`~Event.ENDED`, :attr:`~Event.DIED`,
:attr:`~Event.FLAPPING`) are decisions of :class:`usbipx.daemon.supervisor.Supervisor`;
one it may not make is a bug and raises.  A worker's reports
(:data:`WORKER_REPORTS`) are input: the supervisor checks them with
:func:`allowed` first and ignores, with a warning, a report the table
refuses (a garbled one, or one from a worker that should be gone).

::

    stopped/backoff/failed --start--> starting
    starting|exporting|exported|backoff|waiting --(worker reports)--> the reported state
    running --stop--> stopping --ended--> stopped      (anything --ended--> stopped)
    running --died--> backoff --start--> starting ...
    starting|exporting|backoff --flapping--> failed --start--> starting
"""

from __future__ import annotations

from enum import StrEnum

from usbipx.errors import UsbipError


class State(StrEnum):
    """Where an export stands (what ``supervisor status`` shows)."""

    STARTING = "starting"
    EXPORTING = "exporting"
    EXPORTED = "exported"
    BACKOFF = "backoff"
    WAITING = "waiting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class Event(StrEnum):
    """What happens to an export."""

    START = "start"
    """The parent starts a worker for it."""
    EXPORTING = "exporting"
    """The worker reports: exporting the device now."""
    EXPORTED = "exported"
    """The worker reports: exported (or an export still in the kernel adopted)."""
    BACKOFF = "backoff"
    """The worker reports: the export failed or dropped; retrying after a pause."""
    WAITING = "waiting"
    """The worker reports: the device is not present; waiting for it."""
    STOPPING = "stopping"
    """The worker reports: it is stopping (told by someone else: the state stays)."""
    STOP = "stop"
    """The parent asks the worker to stop (SIGTERM)."""
    ENDED = "ended"
    """No worker is left and none is to be restarted (stopped, or its device gone)."""
    DIED = "died"
    """The worker ended unasked, or could not be started: restart it, after a pause."""
    FLAPPING = "flapping"
    """Died once too often before coming up: restarts pause for the restart window."""


class IllegalTransition(UsbipError):
    """An event the export's current state does not accept."""

    def __init__(self, state: State, event: Event) -> None:
        self.state = state
        self.event = event
        super().__init__(f"event {event.value!r} is not allowed in state {state.value!r}")


WORKER_REPORTS: dict[str, Event] = {
    "exporting": Event.EXPORTING,
    "exported": Event.EXPORTED,
    "backoff": Event.BACKOFF,
    "waiting": Event.WAITING,
    "stopping": Event.STOPPING,
}
"""The ``state`` a worker may put in a report, and the event it is."""


def _running(here: State, *, flapping: bool) -> dict[Event, State]:
    """A state in which a worker may be alive: it reports, is stopped, or dies."""
    out = {
        Event.EXPORTING: State.EXPORTING,
        Event.EXPORTED: State.EXPORTED,
        Event.BACKOFF: State.BACKOFF,
        Event.WAITING: State.WAITING,
        Event.STOPPING: here,
        Event.STOP: State.STOPPING,
        Event.ENDED: State.STOPPED,
        Event.DIED: State.BACKOFF,
    }
    if flapping:
        out[Event.FLAPPING] = State.FAILED
    return out


TRANSITIONS: dict[State, dict[Event, State]] = {
    # Only a worker that never came up flaps: one that reached exported or
    # waiting is restarted at once however often it dies.
    State.STARTING: _running(State.STARTING, flapping=True),
    State.EXPORTING: _running(State.EXPORTING, flapping=True),
    State.EXPORTED: _running(State.EXPORTED, flapping=False),
    State.WAITING: _running(State.WAITING, flapping=False),
    # backoff: either a live worker retrying, or none, waiting for its restart.
    State.BACKOFF: {**_running(State.BACKOFF, flapping=True), Event.START: State.STARTING},
    # Asked to stop: whatever the worker still says, it is on its way out.
    State.STOPPING: {
        Event.EXPORTING: State.STOPPING,
        Event.EXPORTED: State.STOPPING,
        Event.BACKOFF: State.STOPPING,
        Event.WAITING: State.STOPPING,
        Event.STOPPING: State.STOPPING,
        Event.STOP: State.STOPPING,
        Event.ENDED: State.STOPPED,
    },
    # No worker in these: there is nobody to report, stop or die.  A new
    # export starts from stopped.
    State.STOPPED: {Event.START: State.STARTING, Event.ENDED: State.STOPPED},
    State.FAILED: {Event.START: State.STARTING, Event.ENDED: State.STOPPED},
}
"""For each state, the events it accepts and the state each leads to."""


def allowed(state: State, event: Event) -> bool:
    """Whether ``state`` accepts ``event``."""
    return event in TRANSITIONS[state]


def transition(state: State, event: Event) -> State:
    """The state ``event`` leads to from ``state``; :class:`IllegalTransition` if none."""
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise IllegalTransition(state, event) from None
