"""Test doubles for the supervisor: the injected OS (spawner, clock) and config builders.

    clock = FakeClock()
    spawner = FakeSpawner()
    sup = Supervisor(config(busid("1-1")), spawner, clock)
    sup.start()
    pid = spawner.pid_of("busid:1-1")
    spawner.exit(sup, pid, -9)          # what the runner does when the process ends
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import select as _select
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from fakeconfigfs import GADGETS, FakeConfigfs
from fakekernel import PLATFORM, USB_DEVICES, FakeKernel, FakeKernelSysfs

from usbipx.daemon.config import ExportSpec, Options, ServerSpec, SupervisorConfig
from usbipx.daemon.supervisor import Device, Job, Supervisor
from usbipx.daemon.worker import Worker
from usbipx.gadget.spec import GadgetSpec, loads_spec

GADGET_SPEC = """name = "{name}"
id_vendor = 0x1d6b
id_product = 0x{product:04x}

[strings]
manufacturer = "usbipx test"
product = "supervised {name}"

[[configs]]
number = 1
functions = ["acm.tty"]

[functions."acm.tty"]
"""


def gadget_spec(name: str = "sup", product: int = 0x0104) -> GadgetSpec:
    return loads_spec(GADGET_SPEC.format(name=name, product=product))


def busid(b: str) -> ExportSpec:
    return ExportSpec("busid", busid=b)


def match(vendor: int, product: int | None = None) -> ExportSpec:
    return ExportSpec("match", vendor=vendor, product=product)


def gadget(name: str = "sup", udc: str | None = None) -> ExportSpec:
    return ExportSpec("gadget", gadget=gadget_spec(name), gadget_path=f"/specs/{name}.toml",
                      udc=udc)


OPTIONS = Options(control_socket="/tmp/sup-test/sup.sock", state_dir="/tmp/sup-test/state",
                  backoff_initial=0.5, backoff_max=2.0, restart_limit=5, restart_window=60.0)


def config(*exports: ExportSpec, host: str = "10.0.0.1", port: int = 3240,
           options: Options = OPTIONS) -> SupervisorConfig:
    return SupervisorConfig(ServerSpec(host, port), tuple(exports), options, "<test>")


def device(b: str, vendor: int = 0x1234, product: int = 0x5678) -> Device:
    return Device(b, vendor, product)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@dataclass
class FakeSpawner:
    """Records spawns and signals; pids count up from 100.  ``live`` maps the pid of
    every process not yet reported exited to its job's key.  ``fail`` makes the
    next ``spawn`` raise it (as a failed fork does)."""

    next_pid: int = 100
    spawned: list[tuple[int, Job]] = field(default_factory=list)
    signals: list[tuple[int, int]] = field(default_factory=list)
    live: dict[int, str] = field(default_factory=dict)
    fail: list[OSError] = field(default_factory=list)

    def spawn(self, job: Job) -> int:
        if self.fail:
            raise self.fail.pop(0)
        pid = self.next_pid
        self.next_pid += 1
        self.spawned.append((pid, job))
        self.live[pid] = job.key
        return pid

    def signal(self, pid: int, sig: int) -> None:
        self.signals.append((pid, sig))

    # -- what the runner does -------------------------------------------------

    def exit(self, sup: Supervisor, pid: int, code: int = 0) -> None:
        """The process ``pid`` ended: tell the supervisor, as the runner does."""
        key = self.live.pop(pid)
        sup.on_exit(key, pid, code)

    def job_of(self, pid: int) -> Job:
        return next(j for p, j in self.spawned if p == pid)

    def pid_of(self, key: str) -> int:
        """The live pid of ``key`` (exactly one)."""
        pids = [p for p, k in self.live.items() if k == key]
        assert len(pids) == 1, (key, pids)
        return pids[0]

    def signalled(self, pid: int) -> list[int]:
        return [s for p, s in self.signals if p == pid]


def fork_failure() -> OSError:
    return BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")


# ---------------------------------------------------------------- worker tests

UDC_CLASS = "/sys/class/udc"


class SerialSysfs(FakeKernelSysfs):
    """The fake kernel's sysfs, one call at a time: a test thread changing the
    machine (:func:`unplug`, :func:`replug`, :func:`drop_export` under
    ``kernel.atomic``) is seen by a worker thread as one event, not half done."""

    def __init__(self, kernel: FakeKernel) -> None:
        super().__init__(kernel, kernel.root)
        self.lock = threading.RLock()
        kernel.atomic = self.lock  # type: ignore[attr-defined]


def _serialised(name: str) -> Any:
    def method(self: SerialSysfs, *args: Any, **kw: Any) -> Any:
        with self.lock:
            return getattr(FakeKernelSysfs, name)(self, *args, **kw)
    method.__name__ = name
    return method


for _name in ("exists", "is_dir", "listdir", "read_bytes", "read", "read_optional", "read_int",
              "write", "readlink_name", "realpath", "mkdir", "rmdir", "symlink", "unlink"):
    setattr(SerialSysfs, _name, _serialised(_name))


def atomic(kernel: FakeKernel) -> Any:
    """The lock of the kernel's :class:`SerialSysfs` (a no-op without one)."""
    return getattr(kernel, "atomic", None) or contextlib.nullcontext()


class GadgetKernelSysfs(SerialSysfs):
    """The fake kernel's sysfs with a fake configfs in it, wired to its vUDCs.

    configfs paths (``/sys/kernel/config/usb_gadget/...``) follow
    :class:`FakeConfigfs`' rules; everything else is the :class:`FakeKernel`.
    Binding a gadget to a ``usbip-vudc.N`` (writing ``UDC``) makes the vUDC
    have a gadget as the kernel does: ``dev_desc`` reads the gadget's device
    descriptor and the UDC runs at high speed; unbinding it (``UDC`` emptied,
    or a link removed while bound) is :meth:`FakeKernel.vudc_unbind_gadget`.
    """

    def __init__(self, kernel: FakeKernel, fs: Any) -> None:
        super().__init__(kernel)
        fs.shuffle_listdir_results = False  # configfs' listing order is modelled
        self.cfs = FakeConfigfs(kernel.root)
        for d in (GADGETS, "/sys/module/libcomposite"):
            os.makedirs(self.path(d), exist_ok=True)

    @staticmethod
    def _in_configfs(rel: str | PurePosixPath) -> bool:
        return PurePosixPath(GADGETS) in PurePosixPath(rel).parents

    def mkdir(self, rel: str | PurePosixPath) -> None:
        if not self._in_configfs(rel):
            return super().mkdir(rel)
        with self.lock:
            self.cfs.mkdir(rel)
        return None

    def rmdir(self, rel: str | PurePosixPath) -> None:
        if not self._in_configfs(rel):
            return super().rmdir(rel)
        with self.lock:
            self.cfs.rmdir(rel)
        return None

    def symlink(self, target: str | PurePosixPath, rel: str | PurePosixPath) -> None:
        if not self._in_configfs(rel):
            return super().symlink(target, rel)
        with self.lock:
            self.cfs.symlink(target, rel)
        return None

    def unlink(self, rel: str | PurePosixPath) -> None:
        if not self._in_configfs(rel):
            return super().unlink(rel)
        with self.lock:
            self.cfs.unlink(rel)
            self._sync_vudcs()
        return None

    def write(self, rel: str | PurePosixPath, value: str | bytes) -> None:
        if not self._in_configfs(rel):
            return super().write(rel, value)
        with self.lock:
            self.cfs.write(rel, value)
            self._sync_vudcs()
        return None

    def _sync_vudcs(self) -> None:
        k = self.kernel
        for name, vudc in k.vudc.items():
            holder = self.read_optional(f"{UDC_CLASS}/{name}/function")
            if holder and not vudc.gadget and self.is_dir(f"{GADGETS}/{holder}"):
                g = f"{GADGETS}/{holder}"

                def attr(n: str, g: str = g) -> int:
                    return int(self.read(f"{g}/{n}").strip(), 16)

                desc = struct.pack("<BBHBBBBHHHBBBB", 18, 1, 0x0200, attr("bDeviceClass"),
                                   attr("bDeviceSubClass"), attr("bDeviceProtocol"), 64,
                                   attr("idVendor"), attr("idProduct"), attr("bcdDevice"),
                                   1, 2, 3, 1)
                vudc.gadget, vudc.connected = True, False
                k.read_errors.pop(f"{PLATFORM}/{name}/dev_desc", None)
                k.set_attr(f"{PLATFORM}/{name}/dev_desc", desc)
                k.set_attr(f"{PLATFORM}/{name}/udc/{name}/current_speed", "high-speed\n")
                k.set_attr(f"{PLATFORM}/{name}/usbip_status", "1\n")
            elif not holder and vudc.gadget:
                k.vudc_unbind_gadget(name)


def unplug(kernel: FakeKernel, busid: str) -> dict[str, Any]:
    """The USB device ``busid`` is pulled out: its driver lets go (usbip-host's
    disconnect: the export ends, its match_busid entry stays), then the device is
    gone from sysfs.  Returns what :func:`replug` needs to bring it back."""
    with atomic(kernel):
        d = kernel._usb_dir(busid)
        assert d is not None, f"{busid} is not plugged in"
        drv = kernel.driver_of(busid)
        if drv is not None:
            kernel._release(busid, drv)
        saved = {**kernel._capture(d), **kernel._capture(f"{USB_DEVICES}/{busid}")}
        kernel._rmtree(d)
        kernel._remove(f"{USB_DEVICES}/{busid}")
    return {"busid": busid, "tree": saved}


def replug(kernel: FakeKernel, saved: dict[str, Any]) -> None:
    """Plug the device back in: it reappears and the drivers are offered it (usbip-host
    first, which takes it if its bus id is still in match_busid, as on Linux)."""
    with atomic(kernel):
        kernel._apply(saved["tree"])
        kernel._device_attach(saved["busid"])


def drop_export(kernel: FakeKernel, busid: str) -> None:
    """The connection of an exported stub device dies (peer gone): usbip_status 2 -> 1."""
    with atomic(kernel):
        assert kernel.stub_status.get(busid) == 2
        kernel.stub_status[busid] = 1
        kernel.stub_sockfd.pop(busid, None)
        kernel.set_attr(f"{USB_DEVICES}/{busid}/usbip_status", "1\n")


class PipeSelect:
    """``select`` for code running under pyfakefs: its ``os.pipe`` hands out fake
    descriptors (wrappers of a real pipe); map them to the real ones."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def select(self, r: list[int], w: list[int], x: list[int], timeout: float | None = None,
               ) -> tuple[list[int], list[int], list[int]]:
        real = {self.fs.get_open_file(fd).fd: fd for fd in r}
        ready, _, _ = _select.select(list(real), [], [], timeout)
        return [real[f] for f in ready], [], []


class WorkerThread:
    """A :class:`Worker` run in a thread; its reports collected in order."""

    def __init__(self, job: Job, sysfs: Any, seed: int = 0) -> None:
        self.reports: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.worker = Worker(job, self._report, sysfs, random.Random(seed))
        self.thread = threading.Thread(target=self._run, name=f"worker {job.key}", daemon=True)
        self.error: BaseException | None = None

    def _report(self, msg: dict[str, Any]) -> None:
        with self.cond:
            self.reports.append(dict(msg))
            self.cond.notify_all()

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
        finally:
            with self.cond:
                self.cond.notify_all()

    def start(self) -> WorkerThread:
        self.thread.start()
        return self

    def states(self) -> list[str]:
        with self.cond:
            return [r["state"] for r in self.reports]

    def wait_for(self, state: str, after: int = 0, timeout: float = 5.0) -> int:
        """Index of the first report of ``state`` at or after index ``after``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(after, len(self.reports)):
                    if self.reports[i]["state"] == state:
                        return i
                left = deadline - time.monotonic()
                if left <= 0 or not self.thread.is_alive():
                    raise AssertionError(f"no {state!r} report after #{after}: {self.reports}"
                                         + (f"; worker died: {self.error!r}" if self.error
                                            else ""))
                self.cond.wait(left)

    def stop(self, timeout: float = 5.0) -> None:
        self.worker.request_stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker did not stop"
        os.close(self.worker._wake_r)
        os.close(self.worker._wake_w)
        if self.error is not None:
            raise self.error

    def __enter__(self) -> WorkerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.thread.is_alive() or self.error is not None:
            self.stop()


def read_record(state_dir: str, key: str) -> dict[str, Any] | None:
    """The ownership record of ``key`` (file name as the worker makes it), or None."""
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)
    try:
        with open(f"{state_dir}/owned/{name}.json") as fh:
            data: dict[str, Any] = json.load(fh)
    except FileNotFoundError:
        return None
    return data
