"""``usbipx supervisor run``: the asyncio shell around :class:`Supervisor`.

It owns every OS interaction the state machine does not: forking workers
with ``multiprocess`` (fork start method), their pipes and exit sentinels,
signals (SIGHUP reloads, SIGTERM/SIGINT stop), the control socket, kernel
uevents through pyudev (no udevd needed), and systemd's notify protocol.

Workers log through the parent: each worker's loguru sink forwards records
over its own pipe, and the parent writes them to the one real sink with the
export and pid bound.  A pipe per worker (not one shared queue with a lock)
means a worker killed mid-write cannot wedge the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import os
import signal
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger

from usbipx import log
from usbipx.daemon import sdnotify
from usbipx.daemon.config import SupervisorConfig, load_config
from usbipx.daemon.supervisor import Device, Job, Supervisor
from usbipx.daemon.worker import Worker, clean_leftovers
from usbipx.errors import UsbipError
from usbipx.stubmode.host import HostDriver
from usbipx.sysfs import Sysfs

PR_SET_PDEATHSIG = 1
TICK = 0.25


# Resolved once in the parent: creating it in each worker would cost every
# worker a megabyte of private memory.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
_prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE: a harmless first call sets up ctypes' call path


def _set_pdeathsig(sig: int) -> None:
    if _prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def worker_main(job: Job, conn: Any, parent: int) -> None:
    """Entry point of a worker process (runs in the forked child)."""
    # Die with the parent: SIGTERM makes the worker unexport and clean up.
    _set_pdeathsig(signal.SIGTERM)
    if os.getppid() != parent:
        return  # the parent died before prctl took effect
    signal.set_wakeup_fd(-1)  # the parent's event loop's, not ours
    _close_inherited(keep={0, 1, 2, conn.fileno()})

    def send(msg: Any) -> None:
        try:
            conn.send_bytes(json.dumps(msg).encode())
        except OSError:
            os._exit(0)  # the parent is gone

    log.worker_pipe = conn  # see usbipx.log.configure_supervisor
    worker = Worker(job, lambda state: send(("state", state)))
    worker.install_signals()
    worker.run()


def _close_inherited(keep: set[int]) -> None:
    """Close the sockets the fork copied from the parent, except ``keep``.

    A worker must not hold the parent's listening and accepted sockets or
    its netlink socket open: a control-socket client would never see EOF.
    Pipes stay: one of them is multiprocess's sentinel, whose EOF tells the
    parent that this worker has ended.
    """
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep:
            continue
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                os.close(fd)


class ProcessSpawner:
    """Forks workers and feeds their messages and exits to the supervisor."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        import multiprocess

        self.ctx = multiprocess.get_context("fork")
        self.loop = loop
        self.sup: Supervisor | None = None
        self.procs: dict[int, Any] = {}

    def spawn(self, job: Job) -> int:
        r, w = self.ctx.Pipe(duplex=False)
        # Objects alive now are shared with the child copy-on-write; frozen,
        # the garbage collector does not touch (and so copy) their pages.
        if not self.procs and not gc.get_freeze_count():
            gc.collect()  # once: fewer half-empty pages to be copied
        gc.freeze()
        proc = self.ctx.Process(target=worker_main, args=(job, w, os.getpid()),
                                name=f"usbipx worker {job.key}")
        proc.start()
        w.close()
        pid = int(proc.pid)
        self.procs[pid] = proc
        self.loop.add_reader(r.fileno(), self._readable, job.key, pid, r)
        self.loop.add_reader(proc.sentinel, self._exited, job.key, pid, r)
        return pid

    def signal(self, pid: int, sig: int) -> None:
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
        elif msg[0] == "state" and len(msg) == 2 and isinstance(msg[1], dict):
            st = msg[1]
            self.sup.on_report(key, pid, str(st.get("state")), st.get("remote"), st.get("error"),
                               st.get("busid"))

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


def present_devices(sysfs: Sysfs) -> list[Device]:
    """USB devices plugged in now, except those imported through vhci_hcd."""
    out = []
    for d in HostDriver(sysfs).list_devices():
        if not is_imported(d.record.path):
            out.append(Device(d.busid, d.record.id_vendor, d.record.id_product))
    return out


def is_imported(syspath: str) -> bool:
    """Whether a USB device sits on vhci_hcd: imported, never to be exported again
    (on a host that is both sides, it has the ids of the device it mirrors)."""
    return "/vhci_hcd." in syspath


class Hotplug:
    """Kernel uevents for USB devices through pyudev's netlink monitor."""

    def __init__(self, on_device: Callable[[str, Device], None]) -> None:
        import pyudev

        self.on_device = on_device
        self.monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
        self.monitor.start()

    def fileno(self) -> int:
        return int(self.monitor.fileno())

    def readable(self) -> None:
        while (dev := self.monitor.poll(timeout=0)) is not None:
            if (dev.subsystem != "usb" or dev.device_type != "usb_device"
                    or is_imported(str(dev.properties.get("DEVPATH", "")))):
                continue
            product = dev.properties.get("PRODUCT", "")
            try:
                vendor, prod = (int(x, 16) for x in product.split("/")[:2])
            except ValueError:
                continue
            self.on_device(dev.action, Device(dev.sys_name, vendor, prod))


async def _control_server(path: str, sup: Supervisor) -> asyncio.AbstractServer:
    """The status socket: a line ``status`` in, JSON out.  Mode 0600."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(p.lstat().st_mode):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(p))
                except OSError:
                    p.unlink()  # left by a supervisor that is gone
                else:
                    raise UsbipError(f"another supervisor is running (it answers on {path})")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            cmd = line.decode(errors="replace").strip()
            if cmd == "status":
                body: Any = {"summary": sup.summary(), "exports": sup.status()}
            else:
                body = {"error": f"unknown command {cmd!r}"}
            writer.write(json.dumps(body).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()

    old = os.umask(0o177)  # the socket is born 0600: no window for others
    try:
        server = await asyncio.start_unix_server(handle, path=str(p))
    finally:
        os.umask(old)
    return server


async def run(config_path: str, sysfs: Sysfs | None = None) -> None:
    """Run the supervisor until SIGTERM/SIGINT; every worker cleans up before we return."""
    sysfs = sysfs or Sysfs()
    config = load_config(config_path)
    loop = asyncio.get_running_loop()
    for key in clean_leftovers(config.options.state_dir, _keys(config, sysfs), sysfs):
        logger.info("cleaned up {} left by a previous supervisor", key)
    spawner = ProcessSpawner(loop)
    sup = Supervisor(config, spawner)
    spawner.sup = sup

    def reload() -> None:
        try:
            new = load_config(config_path)
        except UsbipError as exc:
            logger.error("reload refused, keeping the running configuration: {}", exc)
            return
        logger.info("reloading {}", config_path)
        if (new.options.control_socket, new.options.state_dir) != (
                sup.config.options.control_socket, sup.config.options.state_dir):
            logger.warning("control_socket and state_dir change only with a restart")
        sup.reload(new)

    def shutdown() -> None:
        if not sup.shutting_down:
            logger.info("stopping every export")
            sdnotify.notify("STOPPING=1")
            sup.shutdown()

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGTERM, shutdown)
    loop.add_signal_handler(signal.SIGINT, shutdown)
    hotplug: Hotplug | None = None
    try:
        hotplug = Hotplug(sup.on_device)
        loop.add_reader(hotplug.fileno(), hotplug.readable)
    except Exception as exc:  # no libudev: vendor/product exports see only present devices
        logger.warning("no hotplug events ({}); devices plugged in later are not seen", exc)
    control = await _control_server(config.options.control_socket, sup)
    sup.start(present_devices(sysfs))
    sdnotify.notify("READY=1")
    logger.info("supervisor {} running {} export(s)", os.getpid(), len(sup.slots))
    watchdog = sdnotify.watchdog_interval()
    last_dog = 0.0
    shown = ""
    try:
        while not sup.done:
            await asyncio.sleep(TICK)
            sup.tick()
            if sup.summary() != shown:  # systemctl status shows it
                shown = sup.summary()
                sdnotify.notify(f"STATUS={shown}")
            now = loop.time()
            if watchdog and now - last_dog >= watchdog:
                # Pinged from the event loop: a wedged loop stops the pings.
                sdnotify.notify("WATCHDOG=1")
                last_dog = now
    finally:
        control.close()
        with contextlib.suppress(OSError):
            os.unlink(config.options.control_socket)
        if hotplug is not None:
            loop.remove_reader(hotplug.fileno())
    logger.info("supervisor stopped")


def _keys(config: SupervisorConfig, sysfs: Sysfs) -> set[str]:
    from usbipx.daemon.supervisor import jobs_for

    return set(jobs_for(config, present_devices(sysfs)))


def query_status(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask a running supervisor for its status over the control socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(b"status\n")
            data = b""
            while not data.endswith(b"\n") and (chunk := s.recv(65536)):
                data += chunk  # one line of JSON
    except FileNotFoundError as exc:
        raise UsbipError(f"no supervisor is running (no control socket at {path})") from exc
    except PermissionError as exc:
        raise UsbipError(f"cannot open {path}: permission denied; are you root?") from exc
    except OSError as exc:
        raise UsbipError(f"cannot query the supervisor at {path}: {exc.strerror or exc}") \
            from exc
    try:
        body = json.loads(data)
    except ValueError as exc:
        raise UsbipError(f"unreadable answer from the supervisor at {path}") from exc
    if not isinstance(body, dict):
        raise UsbipError(f"unreadable answer from the supervisor at {path}")
    return body
