"""Forking supervisor workers: :class:`ProcessSpawner` and the worker's entry point.

Workers are forked with ``multiprocess`` (fork start method): a worker shares
the parent's memory copy-on-write, so what the parent set up before the fork
(prctl through ctypes, loguru's sinks) must not be redone in the child.  Each
worker gets its own pipe: its state reports and its log records travel on it
as JSON, and a worker killed mid-write cannot wedge the others.

Only the supervisor's run loop imports this module; ``supervisor status`` and
the state machine never load ctypes or multiprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import os
import signal
import stat
from typing import Any

from usbipx import log, transport
from usbipx.daemon.supervisor import Job, Supervisor
from usbipx.daemon.worker import Worker
from usbipx.log import logger
from usbipx.procfs import Proc
from usbipx.sysfs import Sysfs

PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3

_prctl: Any = None
"""prctl(2), resolved by :func:`load_prctl` in the parent before the first fork."""


def load_prctl() -> None:
    """Resolve prctl(2) once, in the parent, before forking.

    Resolved in each worker instead, ctypes' call machinery would be built
    after the fork and cost every worker a megabyte of private memory.
    """
    global _prctl
    if _prctl is None:
        fn = ctypes.CDLL(None, use_errno=True).prctl
        fn(PR_GET_DUMPABLE, 0, 0, 0, 0)  # a harmless first call sets up ctypes' call path
        _prctl = fn


def _set_pdeathsig(sig: int) -> None:
    load_prctl()  # a no-op in a worker: the parent did it before forking
    if _prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def preload(job: Job) -> None:
    """Import in the parent what ``job``'s worker would import after the fork.

    A module imported in a worker is that worker's own memory; imported in the
    parent before the fork, it is shared copy-on-write by every worker.
    """
    for endpoint in job.server.endpoints:
        transport.preload(endpoint)
    if job.spec.gadget is not None:
        # A vUDC worker builds its gadget with the plan (loaded lazily elsewhere,
        # so that gadget-less commands stay light).
        import usbipx.gadget.transaction  # noqa: F401


def worker_main(job: Job, conn: Any, parent: int, sysfs: Sysfs, proc: Proc) -> None:
    """Entry point of a worker process (runs in the forked child).

    ``sysfs`` is the parent's: a supervisor run against a fake tree has
    workers that act on that tree.  ``proc`` lists the descriptors to close.
    """
    # Die with the parent: SIGTERM makes the worker unexport and clean up.
    _set_pdeathsig(signal.SIGTERM)
    if os.getppid() != parent:
        return  # the parent died before prctl took effect
    signal.set_wakeup_fd(-1)  # the parent's event loop's, not ours
    close_inherited(keep={0, 1, 2, conn.fileno()}, proc=proc)

    def send(msg: Any) -> None:
        try:
            conn.send_bytes(json.dumps(msg).encode())
        except OSError:
            os._exit(0)  # the parent is gone

    log.worker_pipe = conn  # see usbipx.log.configure_supervisor
    worker = Worker(job, lambda state: send(("state", state)), sysfs=sysfs,
                    relayed=lambda net, kernel: send(("relayed", net, kernel)))
    worker.install_signals()
    worker.run()


def close_inherited(keep: set[int], proc: Proc | None = None) -> list[int]:
    """Close the sockets the fork copied from the parent, except ``keep``;
    return the descriptors closed.

    A worker must not hold the parent's listening and accepted sockets or
    its netlink socket open: a control-socket client would never see EOF.
    Pipes stay: one of them is multiprocess's sentinel, whose EOF tells the
    parent that this worker has ended.
    """
    closed = []
    for fd in (proc or Proc()).fds():
        if fd in keep:
            continue
        with contextlib.suppress(OSError):  # e.g. the listing's own, already closed
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.close(fd)
                closed.append(fd)
    return closed


def _text(value: Any) -> str | None:
    """A string field of a worker's report, or None if it is not one."""
    return value if isinstance(value, str) else None


class ProcessSpawner:
    """Forks workers and feeds their messages and exits to the supervisor.

    ``sysfs`` is handed to every worker; ``proc`` is what a worker lists its
    inherited descriptors from.  Set :attr:`sup` before the first spawn.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sysfs: Sysfs | None = None,
                 proc: Proc | None = None) -> None:
        import multiprocess

        load_prctl()
        self.ctx = multiprocess.get_context("fork")
        self.loop = loop
        self.sysfs = sysfs or Sysfs()
        self.proc = proc or Proc()
        self.sup: Supervisor | None = None
        self.procs: dict[int, Any] = {}

    def spawn(self, job: Job) -> int:
        """Fork a worker for ``job``; return its pid."""
        preload(job)
        r, w = self.ctx.Pipe(duplex=False)
        # Objects alive now are shared with the child copy-on-write; frozen,
        # the garbage collector does not touch (and so copy) their pages.
        if not self.procs and not gc.get_freeze_count():
            gc.collect()  # once: fewer half-empty pages to be copied
        gc.freeze()
        proc = self.ctx.Process(target=worker_main,
                                args=(job, w, os.getpid(), self.sysfs, self.proc),
                                name=f"usbipx worker {job.key}")
        proc.start()
        w.close()
        pid = int(proc.pid)
        self.procs[pid] = proc
        self.loop.add_reader(r.fileno(), self._readable, job.key, pid, r)
        self.loop.add_reader(proc.sentinel, self._exited, job.key, pid, r)
        return pid

    def signal(self, pid: int, sig: int) -> None:
        """Send ``sig`` to a worker; no error if it is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def _readable(self, key: str, pid: int, conn: Any) -> None:
        while True:
            try:
                if not conn.poll():
                    return
                msg = json.loads(conn.recv_bytes())
            except (EOFError, OSError):
                self.loop.remove_reader(conn.fileno())
                return
            except Exception as exc:  # a truncated message from a killed worker
                logger.debug("{}: unreadable message from worker {}: {}", key, pid, exc)
                self.loop.remove_reader(conn.fileno())
                return
            try:
                self._message(key, pid, msg)
            except Exception as exc:  # keep draining: a full pipe would stall the worker
                logger.exception("{}: message from worker {} not handled: {}", key, pid, exc)

    def _message(self, key: str, pid: int, msg: Any) -> None:
        assert self.sup is not None
        if not isinstance(msg, list) or not msg:
            return
        if msg[0] == "log" and len(msg) == 3:
            logger.bind(export=key, worker=pid).log(msg[1], msg[2])
        elif msg[0] == "relayed" and len(msg) == 3:
            if self.sup.metrics is not None:
                for direction, n in zip(("to_network", "to_kernel"), msg[1:], strict=True):
                    if type(n) is int and n > 0:  # not a bool, not negative
                        self.sup.metrics.relayed(direction, n)
        elif msg[0] == "state" and len(msg) == 2 and isinstance(msg[1], dict):
            st = msg[1]
            self.sup.on_report(key, pid, str(st.get("state")), _text(st.get("remote")),
                               _text(st.get("error")), _text(st.get("busid")),
                               _text(st.get("transport")))

    def _exited(self, key: str, pid: int, conn: Any) -> None:
        proc = self.procs.pop(pid)
        self.loop.remove_reader(proc.sentinel)
        with contextlib.suppress(Exception):
            self._readable(key, pid, conn)  # what it said before it died
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(conn.fileno())
        conn.close()
        proc.join(1)
        code = proc.exitcode if proc.exitcode is not None else -9
        assert self.sup is not None
        self.sup.on_exit(key, pid, code)
