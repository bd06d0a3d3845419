"""A supervisor worker: keeps one device exported to the usbipa.

The loop: wait for the device, provision it (stub: bind to usbip-host;
vUDC: apply the gadget spec to a usbip-vudc), then either *adopt* an export
the kernel still holds (a previous worker was killed; the connection lives
on in the kernel) or export it, then watch ``usbip_status`` and the device.
When the export drops -- peer gone, dead link noticed by keepalive, usbipa
restarted -- back off (exponential, jittered, capped) and export again.  On
stop: UNEXPORT, the stub device back to its original driver, a gadget we
created removed.

What preparing the device takes is a lease (:mod:`usbipx.lease`): the
worker claims it, writes it to its ownership record in the state directory
*before* binding or creating anything, and on stop gives back exactly what
the lease took -- a device bound before the supervisor came stays bound, a
gadget it did not create stays.  A supervisor restarted after a crash
adopts or releases what its predecessor left (:func:`clean_leftovers`),
through the same records and the same ``release``.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from usbipx.client import export_prepared, unexport_device
from usbipx.daemon.supervisor import Job, State
from usbipx.driver import DeviceDriver, ExportStatus
from usbipx.drivers import driver_of_lease
from usbipx.errors import DeviceBusy, DeviceNotFound, UsbipError
from usbipx.gadget.live import read_gadget
from usbipx.gadget.udc import gadget_on_udc
from usbipx.gadget.vudc import VudcDriver
from usbipx.lease import Lease
from usbipx.log import logger
from usbipx.ownership import Owned, OwnershipStore
from usbipx.procfs import Proc
from usbipx.remote import Relayer, RelayStats, Remote
from usbipx.stubmode.host import HostDriver
from usbipx.sysfs import Sysfs

Report = Callable[[dict[str, Any]], None]
Relayed = Callable[[int, int], None]
"""``relayed(to_network, to_kernel)``: plaintext bytes relayed since the last call."""


class Stop(Exception):
    """The worker was asked to stop (SIGTERM)."""


@dataclass
class Backoff:
    """Exponential backoff with +-``jitter`` spread, capped at ``cap`` seconds."""

    initial: float
    cap: float
    factor: float = 2.0
    jitter: float = 0.2
    rng: random.Random = field(default_factory=random.Random)
    _n: int = 0

    def reset(self) -> None:
        self._n = 0

    def next(self) -> float:
        base = min(self.initial * self.factor ** self._n, self.cap)
        if base < self.cap:
            self._n += 1  # stop counting at the cap: factor ** n would overflow
        return base * (1 + self.rng.uniform(-self.jitter, self.jitter))


# -- the worker -----------------------------------------------------------------

class Worker:
    """Runs one :class:`Job` until asked to stop.

    ``report`` receives ``{"state": ..., "remote": ..., "error": ...}`` on every
    change; ``sysfs`` and ``rng`` are injectable for tests.  Call
    :meth:`install_signals` in the worker process so SIGTERM stops it at the
    next safe point.
    """

    def __init__(self, job: Job, report: Report, sysfs: Sysfs | None = None,
                 rng: random.Random | None = None, proc: Proc | None = None,
                 relayed: Relayed | None = None) -> None:
        self.job = job
        self.report_fn = report
        self.relayed_fn = relayed
        """Told the bytes this worker's relay moved since it was last told (metrics)."""
        self.sysfs = sysfs or Sysfs()
        self.opts = job.options
        self.server = job.server
        self.store = records(self.opts.state_dir, proc)
        self.backoff = Backoff(self.opts.backoff_initial, self.opts.backoff_max,
                               rng=rng or random.Random())
        self.stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self.busid: str | None = job.busid
        self.vudc = VudcDriver(self.sysfs)
        self.driver: DeviceDriver = (self.vudc if job.spec.kind == "gadget"
                                     else HostDriver(self.sysfs))
        self.lease: Lease | None = None
        self.exported = False
        self.transport: str | None = None
        self.current = 0
        """Index of the server (``[server] urls``) that holds, or last held, the export."""
        self.first = 0
        """The server the next export tries first: after a loss, the next one."""
        self._relay: tuple[threading.Thread, threading.Event, Relayer] | None = None
        self._counted = RelayStats()
        """What of the running relay's stats :attr:`relayed_fn` has been told."""
        self._last: tuple[str, str | None] | None = None
        self.log = logger.bind(export=job.key)

    # -- plumbing ----------------------------------------------------------

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us in order
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def request_stop(self) -> None:
        """Stop at the next safe point (async-signal-safe)."""
        self.stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def sleep(self, seconds: float) -> None:
        """Wait, but wake at once when asked to stop."""
        if not self.stopping:
            select.select([self._wake_r], [], [], max(seconds, 0))
        if self.stopping:
            raise Stop

    def report(self, state: State, error: str | None = None, remote: str | None = None) -> None:
        if self._last == (state, error) and state != State.EXPORTED:
            return
        self._last = (state, error)
        self.report_fn({"state": str(state), "error": error, "remote": remote,
                        "busid": self.busid,
                        "transport": self.transport if state == State.EXPORTED else None})

    def remote(self, index: int | None = None) -> Remote:
        """Server ``index`` (default: the one holding the export), with this worker's
        connect timeout."""
        return self.server.remote(self.opts.connect_timeout,
                                  self.current if index is None else index)

    # -- the device ----------------------------------------------------------

    def present(self) -> bool:
        """Whether the device is here to be exported."""
        if self.job.spec.kind == "gadget":
            gadget = self.job.spec.gadget
            assert gadget is not None
            try:
                read_gadget(gadget.name, self.sysfs)
            except UsbipError:
                return True  # no gadget yet: provisioning creates it
            lease = self._held()
            udc = lease.busid if lease is not None else None
            # A gadget we bound and somebody unbound is an unplugged device.
            return not (udc and gadget_on_udc(udc, self.sysfs) != gadget.name)
        assert self.busid is not None
        return self.driver.present(self.busid)

    def _held(self) -> Lease | None:
        """The lease this export holds: ours, or the one a predecessor recorded."""
        if self.lease is None:
            rec = self.store.read(self.job.key)
            self.lease = rec.lease if rec is not None else None
        return self.lease

    def _record(self, lease: Lease) -> None:
        if lease != self.lease or self.store.read(self.job.key) is None:
            self.store.update(self.job.key, lease=lease)
        self.lease = lease

    def provision(self) -> None:
        """Claim the device, record the lease, then bind it or build and bind the gadget."""
        held = self._held()
        if self.job.spec.kind == "gadget":
            spec = self.job.spec.gadget
            assert spec is not None
            lease = self.vudc.claim_gadget(spec.name, held)
            self._record(lease)
            lease = self.vudc.provision(lease, spec, lease.busid or self.job.spec.udc)
        else:
            assert self.busid is not None
            lease = self.driver.claim(self.busid, held)
            self._record(lease)
            self.driver.acquire(lease)
        self._record(lease)
        self.busid = lease.busid

    # -- the loop ------------------------------------------------------------

    def run(self) -> None:
        """Keep the device exported until stopped; then clean up."""
        self.log.info("worker {} started", os.getpid())
        try:
            while True:
                try:
                    self._cycle()
                except UsbipError as exc:
                    self.report(State.BACKOFF, str(exc))
                    self.log.warning("{}", exc)
                self.sleep(self.backoff.next())
        except Stop:
            pass
        self.cleanup()

    def _cycle(self) -> None:
        if self.stopping:
            raise Stop
        if not self.present():
            self.report(State.WAITING, "device not present")
            self.backoff.reset()
            while not self.present():
                self.sleep(self.opts.poll_interval)
        self.provision()
        assert self.busid is not None
        urls = [self.server.url(i) for i in range(len(self.server.endpoints))]
        if self.driver.status(self.busid) == ExportStatus.USED and self._adopt(urls):
            self.log.info("adopting the live export of {}", self.busid)
            rec = self.store.read(self.job.key)
            self.transport = rec.transport if rec is not None else None
        else:
            self.report(State.EXPORTING)
            self.current = self._export_to_one()
            self.store.update(self.job.key, remote=urls[self.current],
                              transport=self.transport)
        self.exported = True
        self.backoff.reset()
        self.report(State.EXPORTED, remote=urls[self.current])
        self._watch()
        # Lost: next time, try the server after the one that held it first.
        self.first = (self.current + 1) % len(urls)

    def _export_to_one(self) -> int:
        """Export to the first server that accepts, starting at :attr:`first`; its index.

        If none does, the last refusal is raised (the caller backs off), and the
        next round starts again at the first server of the configuration.
        """
        assert self.busid is not None
        n = len(self.server.endpoints)
        error: UsbipError | None = None
        for k in range(n):
            i = (self.first + k) % n
            try:
                path = export_prepared(self.remote(i), self.busid, self.driver)
            except UsbipError as exc:
                if n > 1:
                    self.log.info("{}: {}", self.server.url(i), exc)
                error = exc
                if self.stopping:
                    break
                continue
            self.transport = path.transport
            if path.relay is not None:
                self._start_relay(path.relay)
            return i
        self.first = 0
        assert error is not None
        raise error

    def _adopt(self, urls: list[str]) -> bool:
        """A live export: adopt it if a worker of ours made it to one of ``urls``.

        The kernel keeps an export when its worker is killed; the new worker
        takes it over instead of exporting twice.  One we made to another
        server (the configuration changed) is withdrawn so it can be made
        again; one we did not make is left alone.
        """
        assert self.busid is not None
        rec = self.store.read(self.job.key)
        made = rec.remote if rec is not None else None
        if made in urls:
            self.current = urls.index(made)
            return True
        if made is None:
            raise DeviceBusy(f"{self.busid} is exported, but not by this supervisor")
        self.log.info("{} is exported to {} by an earlier configuration; moving it to {}",
                      self.busid, made, urls[0])
        self.driver.shutdown(self.busid)
        for _ in range(50):
            if self.driver.status(self.busid) != ExportStatus.USED:
                return False
            self.sleep(0.1)
        raise DeviceBusy(f"{self.busid} stays exported to {made}")

    def _watch(self) -> None:
        assert self.busid is not None
        while True:
            self.sleep(self.opts.poll_interval)
            self._count_relayed()
            if not self.present():
                self.log.info("{} unplugged; ending its export", self.busid)
                self.report(State.WAITING, "device unplugged")
                self._unexport(local=False)
                return
            try:
                st = self.driver.status(self.busid)
            except DeviceNotFound:
                if not self.present():
                    continue  # unplugged this instant: the next poll says so
                # Still plugged but no longer ours (someone ran unbind):
                # provision again, which binds it again.
                self.exported = False
                self.report(State.BACKOFF, f"{self.busid} was taken from {self.driver.name}")
                return
            if st != ExportStatus.USED:
                self.exported = False
                self._stop_relay()
                self.report(State.BACKOFF, "export dropped: connection closed")
                return

    def _start_relay(self, relay: Relayer) -> None:
        """Carry the export's data: this worker is the relay (TLS without kernel TLS)."""
        self._stop_relay()
        stop = threading.Event()

        def run() -> None:
            self.log.info("relay of {} ended: {}", self.busid, relay.run(stop))

        thread = threading.Thread(target=run, name=f"relay {self.busid}", daemon=True)
        self._counted = RelayStats()
        self._relay = (thread, stop, relay)
        thread.start()

    def _stop_relay(self) -> None:
        if self._relay is not None:
            thread, stop, _ = self._relay
            stop.set()
            thread.join(5)
            self._count_relayed()  # what it moved before it ended
            self._relay = None

    def _count_relayed(self) -> None:
        """Tell :attr:`relayed_fn` what the relay moved since it was last told: from
        this thread, on the watch's own beat, so the relay's loop pays nothing."""
        if self._relay is None or self.relayed_fn is None:
            return
        now, told = self._relay[2].stats, self._counted
        net, kernel = now.to_network - told.to_network, now.to_kernel - told.to_kernel
        if net or kernel:
            self._counted = RelayStats(told.to_network + net, told.to_kernel + kernel)
            self.relayed_fn(net, kernel)

    def _unexport(self, local: bool) -> None:
        """Best effort: tell usbipa (frees its port at once), then withdraw locally."""
        self.exported = False
        assert self.busid is not None
        try:
            unexport_device(self.remote(), self.busid, self.driver, force=local)
        except UsbipError as exc:
            self.log.info("unexport of {}: {}", self.busid, exc)
        self._stop_relay()

    def cleanup(self) -> None:
        """Unexport what we exported, then release the lease: a device we bound goes
        back to its driver, a gadget we created is removed, nothing else is touched."""
        self.report(State.STOPPING)
        rec = self.store.read(self.job.key)
        lease = self._held()
        if self.busid is not None and self.present():
            with contextlib.suppress(UsbipError):
                live = self.driver.status(self.busid) == ExportStatus.USED
                if self.exported or (live and rec is not None and rec.remote):
                    self._unexport(local=True)  # only what we exported
        if lease is not None:
            try:
                self.driver.release(lease)
            except UsbipError as exc:
                self.log.error("could not give back {}: {}", lease.busid or lease.gadget, exc)
        self.store.remove(self.job.key)
        self.log.info("worker {} stopped", os.getpid())


def records(state_dir: str | Path, proc: Proc | None = None) -> OwnershipStore:
    """The supervisor's ownership records in ``state_dir``."""
    return OwnershipStore(Path(state_dir) / "owned", proc)


def clean_leftovers(state_dir: str | Path, keep: set[str], sysfs: Sysfs | None = None,
                    wait: Callable[[float], None] | None = None,
                    proc: Proc | None = None) -> list[str]:
    """Undo what workers of a dead supervisor left, except exports in ``keep``
    (their new workers adopt them).  Returns the keys cleaned up.

    A predecessor's worker still alive (it got SIGTERM when its parent died and
    may be cleaning up) is given time to finish, then killed -- only if it is
    that worker (pid, start time and command line as recorded).  Raises
    :class:`UsbipError` if the state directory is not root's alone.
    """
    import time

    sysfs = sysfs or Sysfs()
    store = records(state_dir, proc)
    store.check()
    sleep = wait or time.sleep
    cleaned = []
    for found in store.all():
        key = found.key
        rec: Owned | None = found
        if store.writer_alive(found):
            store.end_writer(found, 5.0, signal.SIGKILL, sleep)
            rec = store.read(key)
        if rec is None:
            continue  # its worker cleaned up after itself
        if key in keep:
            continue
        logger.info("cleaning up after a previous supervisor: {}", key)
        if rec.lease is not None:
            _release_leftover(sysfs, rec.lease, exported=rec.remote is not None)
        store.remove(key)
        cleaned.append(key)
    return cleaned


def _release_leftover(sysfs: Sysfs, lease: Lease, exported: bool) -> None:
    """End an export a dead worker made, then release its lease."""
    driver = driver_of_lease(sysfs, lease)
    try:
        if exported and lease.busid is not None and driver.present(lease.busid) \
                and driver.status(lease.busid) == ExportStatus.USED:
            driver.shutdown(lease.busid)
        driver.release(lease)
    except UsbipError as exc:
        logger.error("could not give back {}: {}", lease.busid or lease.gadget, exc)
