"""A supervisor worker: keeps one device exported to the usbipa.

The loop: wait for the device, provision it (stub: bind to usbip-host;
vUDC: apply the gadget spec to a usbip-vudc), then either *adopt* an export
the kernel still holds (a previous worker was killed; the connection lives
on in the kernel) or export it, then watch ``usbip_status`` and the device.
When the export drops -- peer gone, dead link noticed by keepalive, usbipa
restarted -- back off (exponential, jittered, capped) and export again.  On
stop: UNEXPORT, the stub device back to its original driver, a gadget we
created removed.

What a worker binds or creates is written to an ownership record in the
state directory first, so a supervisor restarted after a crash can adopt
or clean up what its predecessor left (:func:`clean_leftovers`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import select
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from usbipx.client import export_device, unexport_device
from usbipx.daemon.supervisor import Job, State
from usbipx.driver import DeviceDriver, ExportStatus
from usbipx.errors import DeviceBusy, DeviceNotFound, UsbipError
from usbipx.gadget.live import read_gadget
from usbipx.gadget.transaction import apply_spec, remove_gadget
from usbipx.gadget.udc import gadget_on_udc
from usbipx.gadget.vudc import VudcDriver
from usbipx.net import Keepalive
from usbipx.stubmode.host import HostDriver
from usbipx.sysfs import Sysfs

Report = Callable[[dict[str, Any]], None]


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


# -- ownership records -----------------------------------------------------

def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", key)


def _starttime(pid: int) -> str | None:
    """Process start time (clock ticks since boot): tells a pid from a reused one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


class Ownership:
    """Records of what workers bound or created, one JSON file per export."""

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir) / "owned"

    def path(self, key: str) -> Path:
        return self.dir / f"{_safe(key)}.json"

    def read(self, key: str) -> dict[str, Any]:
        try:
            data = json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def update(self, key: str, **values: Any) -> None:
        """Merge ``values`` into the record of ``key`` (written atomically)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = {**self.read(key), **values, "key": key, "pid": os.getpid(),
                "starttime": _starttime(os.getpid())}
        tmp = self.path(key).with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.path(key))

    def remove(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def all(self) -> list[dict[str, Any]]:
        out = []
        for f in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(f.read_text())
                if isinstance(data, dict) and isinstance(data.get("key"), str):
                    out.append(data)
        return out


# -- the worker -----------------------------------------------------------------

class Worker:
    """Runs one :class:`Job` until asked to stop.

    ``report`` receives ``{"state": ..., "remote": ..., "error": ...}`` on every
    change; ``sysfs`` and ``rng`` are injectable for tests.  Call
    :meth:`install_signals` in the worker process so SIGTERM stops it at the
    next safe point.
    """

    def __init__(self, job: Job, report: Report, sysfs: Sysfs | None = None,
                 rng: random.Random | None = None) -> None:
        self.job = job
        self.report_fn = report
        self.sysfs = sysfs or Sysfs()
        self.opts = job.options
        self.server = job.server
        self.owned = Ownership(self.opts.state_dir)
        self.backoff = Backoff(self.opts.backoff_initial, self.opts.backoff_max,
                               rng=rng or random.Random())
        self.stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self.busid: str | None = job.busid
        self.driver: DeviceDriver = (VudcDriver(self.sysfs) if job.spec.kind == "gadget"
                                     else HostDriver(self.sysfs))
        self.exported = False
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
                        "busid": self.busid})

    @property
    def keepalive(self) -> Keepalive:
        return self.server.keepalive

    # -- the device ----------------------------------------------------------

    def present(self) -> bool:
        """Whether the device is here to be exported."""
        if self.job.spec.kind == "gadget":
            gadget = self.job.spec.gadget
            assert gadget is not None
            rec = self.owned.read(self.job.key)
            try:
                read_gadget(gadget.name, self.sysfs)
            except UsbipError:
                return True  # no gadget yet: provisioning creates it
            udc = rec.get("udc")
            # A gadget we bound and somebody unbound is an unplugged device.
            return not (udc and gadget_on_udc(udc, self.sysfs) != gadget.name)
        assert self.busid is not None
        return self.sysfs.is_dir(f"/sys/bus/usb/devices/{self.busid}")

    def provision(self) -> None:
        """Bind the stub device, or build and bind the gadget; record ownership first."""
        if self.job.spec.kind == "gadget":
            self._provision_gadget()
            return
        assert isinstance(self.driver, HostDriver) and self.busid is not None
        dev = self.driver.get(self.busid)
        if dev.driver != self.driver.name:
            self.owned.update(self.job.key, kind="stub", busid=self.busid,
                              original_driver=dev.driver, bound_here=True)
            self.driver.bind(self.busid)
        elif not self.owned.read(self.job.key):
            # Bound before we came: it stays bound when we stop.
            self.owned.update(self.job.key, kind="stub", busid=self.busid,
                              original_driver=self.driver.name, bound_here=False)

    def _provision_gadget(self) -> None:
        spec = self.job.spec.gadget
        assert spec is not None
        rec = self.owned.read(self.job.key)
        udc = rec.get("udc") or self.job.spec.udc
        try:
            read_gadget(spec.name, self.sysfs)
            existed = True
        except UsbipError:
            existed = False
        if not existed:
            self.owned.update(self.job.key, kind="gadget", gadget=spec.name, created=True)
        applied = apply_spec(spec, self.sysfs, udc=udc or "auto")
        if applied.udc is None:
            raise UsbipError(f"gadget {spec.name} is not bound to a UDC")
        self.owned.update(self.job.key, kind="gadget", gadget=spec.name, udc=applied.udc,
                          created=rec.get("created", not existed))
        self.busid = applied.udc

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
        remote = f"{self.server.host}:{self.server.port}"
        if self.driver.status(self.busid) == ExportStatus.USED and self._adopt(remote):
            self.log.info("adopting the live export of {}", self.busid)
        else:
            self.report(State.EXPORTING)
            export_device(self.server.host, self.busid, self.driver, self.server.port,
                          self.keepalive, timeout=self.opts.connect_timeout)
            self.owned.update(self.job.key, remote=remote)
        self.exported = True
        self.backoff.reset()
        self.report(State.EXPORTED, remote=remote)
        self._watch()

    def _adopt(self, remote: str) -> bool:
        """A live export: adopt it if a worker of ours made it to ``remote``.

        The kernel keeps an export when its worker is killed; the new worker
        takes it over instead of exporting twice.  One we made to another
        server (the configuration changed) is withdrawn so it can be made
        again; one we did not make is left alone.
        """
        assert self.busid is not None
        made = self.owned.read(self.job.key).get("remote")
        if made == remote:
            return True
        if made is None:
            raise DeviceBusy(f"{self.busid} is exported, but not by this supervisor")
        self.log.info("{} is exported to {} by an earlier configuration; moving it to {}",
                      self.busid, made, remote)
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
                self.report(State.BACKOFF, "export dropped: connection closed")
                return

    def _unexport(self, local: bool) -> None:
        """Best effort: tell usbipa (frees its port at once), then withdraw locally."""
        self.exported = False
        assert self.busid is not None
        try:
            unexport_device(self.server.host, self.busid, self.driver, self.server.port,
                            force=local, keepalive=self.keepalive,
                            timeout=self.opts.connect_timeout, release=local)
        except UsbipError as exc:
            self.log.info("unexport of {}: {}", self.busid, exc)

    def cleanup(self) -> None:
        """Unexport, give a stub device back to its driver, remove a gadget we created."""
        self.report(State.STOPPING)
        rec = self.owned.read(self.job.key)
        if self.busid is not None and self.present():
            with contextlib.suppress(UsbipError):
                live = self.driver.status(self.busid) == ExportStatus.USED
                if self.exported or (live and rec.get("remote")):  # only what we exported
                    self._unexport(local=True)
        if self.job.spec.kind in {"busid", "match"}:
            assert isinstance(self.driver, HostDriver) and self.busid is not None
            with contextlib.suppress(UsbipError):
                if (rec.get("bound_here", True)
                        and self.driver.get(self.busid).driver == self.driver.name):
                    self.driver.unbind(self.busid)
        elif rec.get("created") and self.job.spec.gadget is not None:
            try:
                remove_gadget(self.job.spec.gadget.name, self.sysfs)
            except UsbipError as exc:
                self.log.error("could not remove gadget {}: {}", self.job.spec.gadget.name, exc)
        self.owned.remove(self.job.key)
        self.log.info("worker {} stopped", os.getpid())


def clean_leftovers(state_dir: str | Path, keep: set[str], sysfs: Sysfs | None = None,
                    wait: Callable[[float], None] | None = None) -> list[str]:
    """Undo what workers of a dead supervisor left, except exports in ``keep``
    (their new workers adopt them).  Returns the keys cleaned up.

    A predecessor's worker still alive (it got SIGTERM when its parent died and
    may be cleaning up) is given time to finish, then killed.
    """
    import time

    sysfs = sysfs or Sysfs()
    owned = Ownership(state_dir)
    sleep = wait or time.sleep
    cleaned = []
    for found in owned.all():
        key = found["key"]
        rec = found
        pid = rec.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and _starttime(pid) == rec.get("starttime"):
            for _ in range(50):
                if _starttime(pid) != rec.get("starttime"):
                    break
                sleep(0.1)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            rec = owned.read(key)
            if not rec:
                continue  # it cleaned up after itself
        if key in keep:
            continue
        logger.info("cleaning up after a previous supervisor: {}", key)
        if rec.get("kind") == "stub" and isinstance(rec.get("busid"), str):
            host = HostDriver(sysfs)
            with contextlib.suppress(UsbipError):
                if host.get(rec["busid"]).driver == host.name:
                    host.unbind(rec["busid"])  # also ends a live export
        elif rec.get("kind") == "gadget" and rec.get("created") and isinstance(rec.get("gadget"),
                                                                                  str):
            with contextlib.suppress(UsbipError):
                remove_gadget(rec["gadget"], sysfs)
        owned.remove(key)
        cleaned.append(key)
    return cleaned
