"""A fake Linux kernel for the unit tier: lab-captured sysfs plus the kernel's answers.

:class:`FakeKernel` rebuilds the sysfs snapshots of ``tests/fixtures/sysfs``
(captured from the lab kernel, Debian 6.1) in a pyfakefs filesystem and gives
a :class:`FakeKernelSysfs` -- a real :class:`usbipx.sysfs.Sysfs` whose
``write()`` and ``read_bytes()`` behave like the kernel's stores and shows for
the attributes usbipx touches.  The drivers under test run unmodified on it.

Emulated (each behaviour verified in the lab, see the comments):

* driver core ``/sys/bus/usb/drivers/<drv>/bind|unbind``: ENODEV for an
  unknown device or one not bound to ``<drv>``, EBUSY when it already has a
  driver; ``usb`` configures the device on bind and deconfigures it on unbind
  (``bConfigurationValue``/``bNumInterfaces`` empty, interface directories
  and their ``/sys/bus/usb/devices`` links gone);
* usbip-host: the 16-slot ``match_busid`` table with the kernel's slot states
  (``del`` of an ADDED entry -- added and not bound now -- keeps it listed;
  only ``rebind`` clears it),
  ``bind`` probing (ENODEV if not in the table, a hub or on vhci_hcd),
  ``unbind``, ``rebind`` (ENODEV if never added; an oops -- :class:`KernelOops`
  -- for an entry that was added but never bound, exactly as 6.1 does),
  ``usbip_status``/``usbip_sockfd``/``usbip_debug`` created on bind and
  removed on unbind, ``usbip_sockfd`` (EINVAL unless status 1, ``-1`` drops
  the connection, EINVAL unless status 2);
* vhci_hcd ``attach``/``detach`` over a port table (15 hs + 15 ss ports per
  controller; the hub is chosen by *speed*, the port number only gives the
  controller and the root-hub port, as the kernel does), EINVAL for a bad port
  or speed, EBUSY for a used port, EINVAL on detach of a free port; ``status``
  and ``status.N`` regenerated in the kernel's exact format;
* usbip-vudc ``usbip_sockfd`` (ENODEV without a gadget, EBUSY when
  connected, EINVAL for ``-1`` when not connected) and ``dev_desc`` (ENODEV
  without a gadget);
* kernfs permissions: reading a write-only attribute and opening a
  read-only one for writing fail with EACCES, even for root.

Errors surface exactly as from the real :class:`Sysfs`:
``usbipx.errors.kernel_error(OSError(errno, ...), path)``.

Usage (``tests/unit/conftest.py`` has fixtures)::

    kernel = FakeKernel(fs, "host_unbound", "vhci_free")
    HostDriver(kernel.sysfs).bind("1-1")
    assert kernel.writes == [("/sys/bus/usb/drivers/usb/unbind", "1-1"), ...]
    kernel.fail("/sys/bus/usb/drivers/usbip-host/bind", errno.EIO)      # next write fails
    kernel.before_write(VHCI0 + "/attach", lambda k, w: k.vhci_plug(0))  # a racing process
    kernel.log[-1].errno                                                 # what the kernel said
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import re
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path, PurePosixPath
from typing import Any

from usbipx.errors import kernel_error
from usbipx.sysfs import Sysfs
from usbipx.usbdevice import Speed

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sysfs"

SCENARIOS = {
    "host_unbound": "host-unbound",
    "host_bound": "host-bound",
    "vhci_free": "vhci-free",
    "vhci_attached": "vhci-attached",
    "vudc": "vudc",
}
"""Scenario name -> snapshot file (``tests/fixtures/sysfs/<file>.json``)."""

# Read once at import (before any test activates pyfakefs, which would hide
# the real files): {snapshot: {kernel path: entry}}.
_SNAPSHOTS: dict[str, dict[str, dict[str, Any]]] = {
    p.stem: json.loads(p.read_text()) for p in sorted(FIXTURES.glob("*.json"))
}

USB_DEVICES = "/sys/bus/usb/devices"
USB_DRIVERS = "/sys/bus/usb/drivers"
STUB = "usbip-host"
STUB_DIR = f"{USB_DRIVERS}/{STUB}"
PLATFORM = "/sys/devices/platform"
VHCI0 = f"{PLATFORM}/vhci_hcd.0"
UDC_CLASS = "/sys/class/udc"

MAX_BUSID = 16  # usbip-host's busid_table
BUSID_SIZE = 32
HC_PORTS = 15  # VHCI_HC_PORTS: ports per root hub
CTRL_PORTS = 2 * HC_PORTS  # VHCI_PORTS: hs + ss ports per controller
USB_CLASS_HUB = 0x09
# Attributes that read empty while a USB device is unconfigured.
CONFIG_ATTRS = ("bConfigurationValue", "bNumInterfaces", "bMaxPower", "bmAttributes")
STATUS_HEADER = "hub port sta spd dev      sockfd local_busid\n"

Entry = dict[str, Any]
Tree = dict[str, Entry]


class KernelOops(AssertionError):
    """The real kernel would have crashed (e.g. rebind of an entry never bound)."""


class BusidState(IntEnum):
    """``STUB_BUSID_*`` of a busid_table slot."""

    OTHER = 0
    REMOV = 1
    ADDED = 2
    ALLOC = 3


class VdevStatus(IntEnum):
    """``VDEV_ST_*`` of a vhci port."""

    NULL = 4
    NOTASSIGNED = 5
    USED = 6


@dataclass
class BusidSlot:
    name: str = ""
    state: BusidState = BusidState.OTHER
    udev: str | None = None  # busid of the device this slot last probed (busid_priv->udev)


@dataclass
class Vdev:
    """One root-hub port of a vhci controller."""

    status: VdevStatus = VdevStatus.NULL
    speed: int = 0
    devid: int = 0
    sockfd: int = 0
    local_busid: str = "0-0"

    def line(self, hub: str, port: int) -> str:
        head = f"{hub}  {port:04d} {int(self.status):03d} "
        if self.status == VdevStatus.USED:
            tail = f"{self.speed:03d} {self.devid:08x} {self.sockfd:06d} {self.local_busid}"
        else:
            tail = "000 00000000 000000 0-0"
        return head + tail + "\n"


@dataclass
class Write:
    """One ``Sysfs.write`` call: the path as the caller gave it, the value, the errno (or None)."""

    path: str
    value: str
    errno: int | None = None


@dataclass
class Fault:
    """Make the next ``times`` matching operations fail with ``err`` (None: forever)."""

    path: str
    err: int
    value: str | None = None
    times: int | None = 1
    op: str = "write"
    hits: int = 0


@dataclass
class Hook:
    path: str
    fn: Callable[[FakeKernel, Write], object]
    times: int | None = 1


@dataclass
class _Vudc:
    gadget: bool
    connected: bool = False


class _Errno(Exception):
    """Internal: the kernel store returns ``-err``."""

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.err = err


def _fail(err: int) -> _Errno:
    return _Errno(err)


class FakeKernelSysfs(Sysfs):
    """A :class:`Sysfs` whose kernel attributes answer as the kernel does.

    Everything not emulated goes through the real :class:`Sysfs` code on the
    fake filesystem.
    """

    def __init__(self, kernel: FakeKernel, root: str | os.PathLike[str] = "/") -> None:
        super().__init__(root)
        self.kernel = kernel

    def write(self, rel: str | PurePosixPath, value: str | bytes) -> None:
        self.path(rel)  # ValueError for an unsafe path, as the real one, before any I/O
        self.kernel._write(self, str(rel), value)

    def _real_write(self, rel: str, value: str | bytes) -> None:
        super().write(rel, value)

    def read_bytes(self, rel: str | PurePosixPath) -> bytes:
        self.path(rel)
        err = self.kernel._read_error(str(rel))
        if err is not None:
            raise kernel_error(OSError(err, os.strerror(err)), str(rel), "read")
        return super().read_bytes(rel)


class FakeKernel:
    """The kernel behind a fake sysfs; see the module docstring.

    ``fs`` is pyfakefs's ``fs`` fixture (or None to build the tree in a real
    directory ``root``).  ``scenarios`` are names from :data:`SCENARIOS`,
    loaded in order (later entries win).
    """

    def __init__(self, fs: object | None, *scenarios: str, root: str | os.PathLike[str] = "/"):
        self.fs = fs
        # pyfakefs's FakeFilesystem: build the tree through its API (much faster).
        self._fake: Any = fs if fs is not None and hasattr(fs, "create_file") else None
        self.root = str(root)
        self.sysfs = FakeKernelSysfs(self, root)
        self.log: list[Write] = []
        self.faults: list[Fault] = []
        self.hooks: list[Hook] = []
        self.bad_sockfds: set[int] = set()
        """Socket fds the kernel's ``sockfd_lookup`` refuses (EINVAL); others are TCP sockets."""
        self.vhci_enumerates = True
        """Attached vhci ports show USED with a local bus id at once (else NOTASSIGNED)."""
        self.busid_table = [BusidSlot() for _ in range(MAX_BUSID)]
        self.stub_status: dict[str, int] = {}  # busid -> usbip_status of devices on usbip-host
        self.stub_sockfd: dict[str, int] = {}
        self.read_errors: dict[str, int] = {}  # canonical kernel path -> errno on read
        self.vhci: list[dict[str, list[Vdev]]] = []  # per controller: {"hs": [...], "ss": [...]}
        self.vhci_buses: list[tuple[int, int]] = []  # per controller: (hs bus, ss bus)
        self.vudc: dict[str, _Vudc] = {}
        self._config_stash: dict[str, Tree] = {}
        self._paths: set[str] = set()  # kernel paths this kernel created (may exist)
        self.load(*scenarios)

    # -- public: the write log -------------------------------------------

    @property
    def writes(self) -> list[tuple[str, str]]:
        """Every ``Sysfs.write`` call as ``(path, value)``, failed ones included (like strace)."""
        return [(w.path, w.value) for w in self.log]

    def clear_log(self) -> None:
        self.log.clear()

    # -- public: faults and races ----------------------------------------

    def fail(self, path: str, err: int, *, value: str | None = None, times: int | None = 1,
             op: str = "write") -> Fault:
        """The next ``times`` (None: every) ``op`` ("write" or "read") on ``path`` fail with ``err``.

        ``path`` is matched as given by the caller or as its canonical path
        (symlinks resolved); ``value`` optionally restricts to one written
        value.  A failing write has no effect in the kernel.
        """
        fault = Fault(path, err, value, times, op)
        self.faults.append(fault)
        return fault

    def before_write(self, path: str, fn: Callable[[FakeKernel, Write], object], *,
                     times: int | None = 1) -> None:
        """Run ``fn(kernel, write)`` just before the kernel handles the next ``times``
        (None: every) writes to ``path`` -- another process acting between the
        caller's read and its write.  ``write`` is the :class:`Write` being handled."""
        self.hooks.append(Hook(path, fn, times))

    # -- public: inspecting the state ------------------------------------

    def read(self, rel: str) -> str:
        """Content of a file of the fake tree (no faults, no emulation)."""
        return self._host(rel).read_text()

    def exists(self, rel: str) -> bool:
        return os.path.lexists(self._host(rel))

    def driver_of(self, busid: str) -> str | None:
        """Name of the driver bound to USB device or interface ``busid``."""
        d = self._usb_dir(busid)
        if d is None:
            return None
        try:
            return posixpath.basename(os.readlink(self._host(f"{d}/driver")))
        except OSError:
            return None

    def match_busid(self) -> list[str]:
        """Names usbip-host lists in ``match_busid``."""
        return [s.name for s in self.busid_table if s.name]

    def busid_state(self, busid: str) -> BusidState | None:
        """State of ``busid``'s slot in usbip-host's table, None if not listed."""
        slot = self._slot(busid)
        return slot.state if slot else None

    def vhci_port(self, port: int) -> Vdev:
        """The vhci port with global number ``port`` (as ``status`` numbers it)."""
        ctrl, rest = divmod(port, CTRL_PORTS)
        hub, rh = divmod(rest, HC_PORTS)
        return self.vhci[ctrl]["ss" if hub else "hs"][rh]

    # -- public: changing the machine ------------------------------------

    def set_attr(self, rel: str, text: str | bytes) -> None:
        """Replace an attribute's content (keeps its mode)."""
        self._put(self._canonical(rel), text)

    def unload(self, module: str) -> None:
        """``rmmod`` a driver: ``usbip-host``, ``vhci-hcd`` or ``usbip-vudc``."""
        if module == "usbip-host":
            for busid in list(self.stub_status):
                self._release(busid, STUB)
            self.busid_table = [BusidSlot() for _ in range(MAX_BUSID)]
            self._rmtree(STUB_DIR)
        elif module == "vhci-hcd":
            for name in self._listdir(PLATFORM):
                if name.startswith("vhci_hcd."):
                    self._rmtree(f"{PLATFORM}/{name}")
            self.vhci.clear()
            self.vhci_buses.clear()
        elif module == "usbip-vudc":
            for name in list(self.vudc):
                self._rmtree(f"{PLATFORM}/{name}")
                self._rmtree(f"{UDC_CLASS}/{name}")
            self.vudc.clear()
        else:
            raise ValueError(f"FakeKernel cannot unload {module!r}")

    def vhci_plug(self, port: int, *, speed: Speed = Speed.HIGH, devid: int = 0x00020003,
                  sockfd: int = 99) -> None:
        """Another process attaches a device at ``port`` (not logged; kernel rules apply,
        so the device lands on the hub of its speed and a used port is a KernelError)."""
        self._internal(self._vhci_attach, f"{VHCI0}/attach", f"{port} {sockfd} {devid} {speed:d}")

    def vhci_unplug(self, port: int) -> None:
        """The remote side of ``port`` goes away (the port becomes free)."""
        self._internal(self._vhci_detach, f"{VHCI0}/detach", str(port))

    def _internal(self, handler: Callable[[str], None], path: str, value: str) -> None:
        try:
            handler(value)
        except _Errno as exc:
            raise kernel_error(OSError(exc.err, os.strerror(exc.err)), path) from None

    def vudc_unbind_gadget(self, name: str) -> None:
        """Unbind the configfs gadget from vUDC ``name`` (``echo "" > UDC``)."""
        self.vudc[name] = _Vudc(gadget=False)
        self.read_errors[f"{PLATFORM}/{name}/dev_desc"] = errno.ENODEV
        self._put(f"{PLATFORM}/{name}/udc/{name}/function", "")
        self._put(f"{PLATFORM}/{name}/udc/{name}/current_speed", "UNKNOWN\n")
        self._put(f"{PLATFORM}/{name}/usbip_status", "1\n")

    # -- loading -----------------------------------------------------------

    def load(self, *scenarios: str) -> FakeKernel:
        """Add snapshots (scenario names or snapshot file stems) to the tree."""
        for name in scenarios:
            stem = SCENARIOS.get(name, name)
            if stem not in _SNAPSHOTS:
                raise ValueError(f"unknown scenario {name!r}; have {sorted(SCENARIOS)}")
            self._apply(_SNAPSHOTS[stem])
        self._scan()
        return self

    def _apply(self, tree: Tree) -> None:
        for kpath in sorted(tree, key=lambda p: (p.count("/"), p)):
            entry = tree[kpath]
            host = self._host(kpath)
            if kpath in self._paths and os.path.lexists(host):
                if entry.get("dir") and host.is_dir() and not host.is_symlink():
                    continue
                self._rmtree(kpath)
            self._paths.add(kpath)
            if entry.get("dir"):
                os.makedirs(host, exist_ok=True)
            elif "link" in entry:
                target = entry["link"]
                if target.startswith("/"):
                    target = posixpath.relpath(target, posixpath.dirname(kpath))
                if self._fake is not None:
                    self._fake.create_symlink(host, target)
                else:
                    os.makedirs(host.parent, exist_ok=True)
                    os.symlink(target, host)
            else:
                data = bytes.fromhex(entry["hex"]) if "hex" in entry else entry.get("text", "")
                self._create(kpath, data, entry.get("mode", 0o644), fresh=True)
                if "errno" in entry:
                    self.read_errors[kpath] = entry["errno"]
                else:
                    self.read_errors.pop(kpath, None)

    def _scan(self) -> None:
        """Derive the kernel's internal state from the tree."""
        # usbip-host's table: names listed in match_busid; bound devices hold ALLOC slots.
        if self._isfile(f"{STUB_DIR}/match_busid"):
            names = self.read(f"{STUB_DIR}/match_busid").split()
            listed = {s.name for s in self.busid_table if s.name}
            for name in names:
                if name in listed:
                    continue
                free = next(s for s in self.busid_table if not s.name)
                free.name, free.state = name, BusidState.ADDED
        for name in self._listdir(USB_DEVICES):
            if ":" in name or self.driver_of(name) != STUB:
                continue
            st = self._usb_dir(name)
            status = self._read_int(f"{st}/usbip_status", 1)
            self.stub_status.setdefault(name, status)
            slot = self._slot(name)
            if slot:
                slot.state, slot.udev = BusidState.ALLOC, name
        # vhci_hcd: the port table from status, status.1 ...
        if self._isfile(f"{VHCI0}/status"):
            files = [f"{VHCI0}/status"]
            while self._isfile(f"{VHCI0}/status.{len(files)}"):
                files.append(f"{VHCI0}/status.{len(files)}")
            if len(self.vhci) != len(files):
                self.vhci = [{"hs": [Vdev() for _ in range(HC_PORTS)],
                              "ss": [Vdev() for _ in range(HC_PORTS)]} for _ in files]
            for f in files:
                for line in self.read(f).splitlines()[1:]:
                    hub, port, sta, spd, dev, sockfd, busid = line.split()
                    v = self.vhci_port(int(port))
                    assert ("ss" if (int(port) // HC_PORTS) % 2 else "hs") == hub, line
                    v.status, v.speed, v.devid = VdevStatus(int(sta)), int(spd), int(dev, 16)
                    v.sockfd, v.local_busid = int(sockfd), busid
            self.vhci_buses = []
            for k in range(len(files)):
                buses = sorted(int(n[3:]) for n in self._listdir(f"{PLATFORM}/vhci_hcd.{k}")
                               if re.fullmatch(r"usb\d+", n))
                hs = buses[0] if buses else (self.vhci_buses[0][0] + 2 * k if self.vhci_buses
                                             else 3 + 2 * k)
                self.vhci_buses.append((hs, hs + 1))
        # usbip-vudc instances: a gadget is bound when dev_desc reads.
        for name in self._listdir(PLATFORM):
            if re.fullmatch(r"usbip-vudc\.\d+", name) and name not in self.vudc:
                gadget = f"{PLATFORM}/{name}/dev_desc" not in self.read_errors
                status = self._read_int(f"{PLATFORM}/{name}/usbip_status", 1)
                self.vudc[name] = _Vudc(gadget, connected=status == 2)

    # -- the write path ----------------------------------------------------

    def _write(self, sysfs: FakeKernelSysfs, rel: str, value: str | bytes) -> None:
        text = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
        record = Write(rel, text)
        self.log.append(record)
        kpath = self._canonical(rel)
        for hook in list(self.hooks):
            if hook.path in (rel, kpath):
                if hook.times is not None:
                    hook.times -= 1
                    if hook.times <= 0:
                        self.hooks.remove(hook)
                hook.fn(self, record)
        if not os.path.lexists(self._host(kpath)):
            record.errno = errno.ENOENT
            sysfs._real_write(rel, value)  # raises DeviceNotFound, as for a real missing file
            return
        try:
            fault = self._take_fault("write", rel, kpath, text)
            if fault is not None:
                raise _fail(fault)
            mode = os.stat(self._host(kpath)).st_mode
            if kpath.startswith("/sys/") and stat.S_ISREG(mode) and not mode & 0o222:
                raise _fail(errno.EACCES)  # kernfs: no store method
            handler = self._handler(kpath)
            if handler is None:
                sysfs._real_write(rel, value)
                if kpath.startswith("/sys/"):  # a store replaces the value
                    self._put(kpath, text if text.endswith("\n") else text + "\n")
                return
            handler(text)
        except _Errno as exc:
            record.errno = exc.err
            raise kernel_error(OSError(exc.err, os.strerror(exc.err)), rel) from None
        except Exception as exc:
            record.errno = getattr(exc, "errno", None) or errno.EIO
            raise

    def _take_fault(self, op: str, rel: str, kpath: str, value: str | None) -> int | None:
        for fault in self.faults:
            if fault.op != op or fault.path not in (rel, kpath):
                continue
            if fault.value is not None and fault.value != value:
                continue
            fault.hits += 1
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    self.faults.remove(fault)
            return fault.err
        return None

    def _read_error(self, rel: str) -> int | None:
        kpath = self._canonical(rel)
        if not os.path.lexists(self._host(kpath)):
            return None  # the real read reports the missing file
        fault = self._take_fault("read", rel, kpath, None)
        if fault is not None:
            return fault
        if kpath in self.read_errors:
            return self.read_errors[kpath]
        mode = os.stat(self._host(kpath)).st_mode
        if kpath.startswith("/sys/") and stat.S_ISREG(mode) and not mode & 0o444:
            return errno.EACCES  # kernfs: no show method
        return None

    def _handler(self, kpath: str) -> Callable[[str], None] | None:
        m = re.fullmatch(rf"{USB_DRIVERS}/([^/]+)/(bind|unbind)", kpath)
        if m:
            drv, op = m.groups()
            return (lambda v: self._bind(drv, v)) if op == "bind" else (
                lambda v: self._unbind(drv, v))
        if kpath == f"{STUB_DIR}/match_busid":
            return self._match_busid
        if kpath == f"{STUB_DIR}/rebind":
            return self._rebind
        if kpath == f"{VHCI0}/attach":
            return self._vhci_attach
        if kpath == f"{VHCI0}/detach":
            return self._vhci_detach
        m = re.fullmatch(rf"{PLATFORM}/(usbip-vudc\.\d+)/usbip_sockfd", kpath)
        if m and m.group(1) in self.vudc:
            name = m.group(1)
            return lambda v: self._vudc_sockfd(name, v)
        if kpath.endswith("/usbip_sockfd"):
            busid = self._busid_of_dir(posixpath.dirname(kpath))
            if busid is not None:
                return lambda v: self._stub_sockfd(busid, v)
        return None

    # -- driver core -------------------------------------------------------

    def _find_device(self, buf: str) -> str | None:
        """bus_find_device_by_name on the usb bus (sysfs_streq: one trailing newline ok)."""
        name = buf[:-1] if buf.endswith("\n") else buf
        if not name or "/" in name or name in (".", ".."):
            return None
        return name if self._usb_dir(name) is not None else None

    def _bind(self, drv: str, buf: str) -> None:
        busid = self._find_device(buf)
        # driver_match_device: usb and usbip-host match USB devices, not interfaces;
        # interface drivers are not emulated (no match).
        if busid is None or ":" in busid or drv not in ("usb", STUB):
            raise _fail(errno.ENODEV)
        if self.driver_of(busid) is not None:
            raise _fail(errno.EBUSY)
        self._probe(drv, busid)

    def _probe(self, drv: str, busid: str) -> None:
        d = self._usb_dir(busid)
        assert d is not None
        if drv == STUB:
            slot = self._slot(busid)
            if slot is None or slot.state in (BusidState.REMOV, BusidState.OTHER):
                raise _fail(errno.ENODEV)  # "is not in match_busid table... skip!"
            if self._read_int(f"{d}/bDeviceClass", 0, 16) == USB_CLASS_HUB:
                raise _fail(errno.ENODEV)  # "is a usb hub device... skip!"
            if d.startswith(f"{PLATFORM}/vhci_hcd."):
                raise _fail(errno.ENODEV)  # "is attached on vhci_hcd... skip!"
            slot.state, slot.udev = BusidState.ALLOC, busid
            self._create(f"{d}/usbip_debug", "0\n", 0o644)
            self._create(f"{d}/usbip_sockfd", "", 0o200)
            self._create(f"{d}/usbip_status", "1\n", 0o444)
            self.stub_status[busid] = 1
        elif drv == "usb":
            self._configure(busid)
        self._link(f"{d}/driver", f"{USB_DRIVERS}/{drv}")
        self._link(f"{USB_DRIVERS}/{drv}/{busid}", d)

    def _unbind(self, drv: str, buf: str) -> None:
        busid = self._find_device(buf)
        if busid is None or self.driver_of(busid) != drv:
            raise _fail(errno.ENODEV)
        self._release(busid, drv)

    def _release(self, busid: str, drv: str) -> None:
        d = self._usb_dir(busid)
        assert d is not None
        if drv == STUB:  # stub_disconnect
            for attr in ("usbip_status", "usbip_sockfd", "usbip_debug"):
                self._remove(f"{d}/{attr}")
            self.stub_status.pop(busid, None)
            self.stub_sockfd.pop(busid, None)
            slot = self._slot(busid)
            if slot and slot.state == BusidState.ALLOC:
                slot.state = BusidState.ADDED
        elif drv == "usb":  # generic_disconnect: usb_set_configuration(udev, -1)
            self._deconfigure(busid)
        self._remove(f"{d}/driver")
        self._remove(f"{USB_DRIVERS}/{drv}/{busid}")

    def _device_attach(self, busid: str) -> None:
        """device_attach(): offer a driverless device to the drivers (usbip-host, then usb)."""
        if self.driver_of(busid) is not None:
            return
        if self._isdir(STUB_DIR):
            try:
                self._probe(STUB, busid)
                return
            except _Errno:
                pass
        self._probe("usb", busid)

    def _configure(self, busid: str) -> None:
        d = self._usb_dir(busid)
        assert d is not None
        if self.read(f"{d}/bConfigurationValue").strip():
            return
        tree = self._config_stash.pop(busid, None) or self._config_profile(busid, d)
        self._apply(tree)

    def _deconfigure(self, busid: str) -> None:
        d = self._usb_dir(busid)
        assert d is not None
        if not self.read(f"{d}/bConfigurationValue").strip():
            return
        stash: Tree = {}
        for name in self._listdir(d):
            if name.startswith(f"{busid}:"):
                stash.update(self._capture(f"{d}/{name}"))
                self._rmtree(f"{d}/{name}")
        for name in self._listdir(USB_DEVICES):
            if name.startswith(f"{busid}:"):
                stash.update(self._capture(f"{USB_DEVICES}/{name}"))
                self._remove(f"{USB_DEVICES}/{name}")
        for attr in CONFIG_ATTRS:
            if self._isfile(f"{d}/{attr}"):
                stash.update(self._capture(f"{d}/{attr}"))
                self._put(f"{d}/{attr}", "")
        self._config_stash[busid] = stash

    def _config_profile(self, busid: str, d: str) -> Tree:
        """The configured state of ``busid`` as captured in host-unbound, if it is there."""
        snap = _SNAPSHOTS.get("host-unbound", {})
        link = snap.get(f"{USB_DEVICES}/{busid}", {}).get("link")
        if link and posixpath.normpath(posixpath.join(USB_DEVICES, link)) == d:
            prefixes = (f"{d}/{busid}:", f"{USB_DEVICES}/{busid}:")
            tree = {k: v for k, v in snap.items() if k.startswith(prefixes)}
            tree.update({f"{d}/{a}": snap[f"{d}/{a}"] for a in CONFIG_ATTRS
                         if f"{d}/{a}" in snap})
            return tree
        return {f"{d}/bConfigurationValue": {"mode": 0o644, "text": "1\n"}}

    # -- usbip-host ----------------------------------------------------------

    def _slot(self, name: str) -> BusidSlot | None:
        return next((s for s in self.busid_table if s.name and s.name == name), None)

    def _match_busid(self, buf: str) -> None:
        if len(buf) < 5:
            raise _fail(errno.EINVAL)
        busid = buf[4:].split("\0", 1)[0]
        if len(busid) >= BUSID_SIZE:
            raise _fail(errno.EINVAL)
        if buf.startswith("add "):
            if self._slot(busid):
                return
            slot = next((s for s in self.busid_table if not s.name), None)
            if slot is None:
                raise _fail(errno.ENOMEM)
            slot.name = busid
            if slot.state not in (BusidState.ALLOC, BusidState.REMOV):
                slot.state = BusidState.ADDED
        elif buf.startswith("del "):
            if not self._del_match_busid(busid):
                raise _fail(errno.ENODEV)
        else:
            raise _fail(errno.EINVAL)
        self._sync_match_busid()

    def _del_match_busid(self, busid: str) -> bool:
        slot = self._slot(busid)
        if slot is None:
            return False
        # Kernel 6.1: only an OTHER (rebound) entry is cleared; an ADDED one
        # (added, never bound or already unbound) stays listed (lab-verified).
        if slot.state == BusidState.OTHER:
            slot.name = ""
        if slot.state not in (BusidState.OTHER, BusidState.ADDED):
            slot.state = BusidState.REMOV
        return True

    def _sync_match_busid(self) -> None:
        if self._isfile(f"{STUB_DIR}/match_busid"):
            self._put(f"{STUB_DIR}/match_busid", "".join(f"{n} " for n in self.match_busid())
                      + "\n")

    def _rebind(self, buf: str) -> None:
        if len(buf) >= BUSID_SIZE:
            raise _fail(errno.EINVAL)
        slot = self._slot(buf)
        if slot is None:
            raise _fail(errno.ENODEV)
        slot.state = BusidState.OTHER
        if slot.udev is None:
            raise KernelOops(f"rebind {buf!r}: NULL busid_priv->udev (added, never bound)")
        if self._usb_dir(slot.udev) is not None:
            self._device_attach(slot.udev)
        self._del_match_busid(buf)
        self._sync_match_busid()

    def _stub_sockfd(self, busid: str, buf: str) -> None:
        m = re.match(r"\s*([+-]?\d+)", buf)  # sscanf("%d")
        if not m:
            raise _fail(errno.EINVAL)
        sockfd = int(m.group(1))
        status = self.stub_status.get(busid)
        if sockfd != -1:
            if status != 1 or sockfd < 0 or sockfd in self.bad_sockfds:
                raise _fail(errno.EINVAL)  # "not ready" / "failed to lookup sock"
            self.stub_status[busid], self.stub_sockfd[busid] = 2, sockfd
        else:
            if status != 2:
                raise _fail(errno.EINVAL)
            # SDEV_EVENT_DOWN: the connection is shut down, the device reset.
            self.stub_status[busid] = 1
            self.stub_sockfd.pop(busid, None)
        d = self._usb_dir(busid)
        self._put(f"{d}/usbip_status", f"{self.stub_status[busid]}\n")

    # -- usbip-vudc ----------------------------------------------------------

    def _vudc_sockfd(self, name: str, buf: str) -> None:
        try:
            sockfd = int(buf[:-1] if buf.endswith("\n") else buf, 0)  # kstrtoint(.., 0, ..)
        except ValueError:
            raise _fail(errno.EINVAL) from None
        udc = self.vudc[name]
        if not udc.gadget:
            raise _fail(errno.ENODEV)  # "gadget not bound"
        status = self._read_int(f"{PLATFORM}/{name}/usbip_status", 1)
        if sockfd != -1:
            if udc.connected:
                raise _fail(errno.EBUSY)  # "Device already connected"
            if status != 1 or sockfd < 0 or sockfd in self.bad_sockfds:
                raise _fail(errno.EINVAL)
            udc.connected, status = True, 2
        else:
            if not udc.connected or status != 2:
                raise _fail(errno.EINVAL)  # "Device not connected"
            udc.connected, status = False, 1
        self._put(f"{PLATFORM}/{name}/usbip_status", f"{status}\n")

    # -- vhci_hcd ------------------------------------------------------------

    def _vhci_attach(self, buf: str) -> None:
        m = re.match(r"\s*([+-]?\d+)\s+([+-]?\d+)\s+([+-]?\d+)\s+([+-]?\d+)", buf)
        if not m:
            raise _fail(errno.EINVAL)
        port, sockfd, devid, speed = (int(x) & 0xFFFFFFFF for x in m.groups())  # "%u"
        ctrl, rhport = port // CTRL_PORTS, port % HC_PORTS
        if ctrl >= len(self.vhci) or speed not in (1, 2, 3, 4, 5):
            raise _fail(errno.EINVAL)  # valid_args(): SUPER_PLUS is refused too
        if sockfd in self.bad_sockfds or sockfd > 0x7FFFFFFF:
            raise _fail(errno.EINVAL)
        # The hub is chosen by speed; the port number only gives controller and rhport.
        hub = "ss" if speed == Speed.SUPER else "hs"
        vdev = self.vhci[ctrl][hub][rhport]
        if vdev.status != VdevStatus.NULL:
            raise _fail(errno.EBUSY)  # "port %d already used"
        bus = self.vhci_buses[ctrl][1 if hub == "ss" else 0]
        vdev.devid, vdev.speed, vdev.sockfd = devid, speed, sockfd
        if self.vhci_enumerates:
            vdev.status, vdev.local_busid = VdevStatus.USED, f"{bus}-{rhport + 1}"
        else:
            vdev.status = VdevStatus.NOTASSIGNED
        self._sync_vhci(ctrl)

    def _vhci_detach(self, buf: str) -> None:
        try:
            port = int(buf.strip(), 10)  # kstrtoint(buf, 10, ..)
        except ValueError:
            raise _fail(errno.EINVAL) from None
        port &= 0xFFFFFFFF
        ctrl = port // CTRL_PORTS
        if ctrl >= len(self.vhci):
            raise _fail(errno.EINVAL)
        hub = "ss" if (port // HC_PORTS) % 2 else "hs"
        rhport = port % HC_PORTS
        if self.vhci[ctrl][hub][rhport].status == VdevStatus.NULL:
            raise _fail(errno.EINVAL)  # vhci_port_disconnect: "not connected"
        self.vhci[ctrl][hub][rhport] = Vdev()  # VDEV_EVENT_DOWN, then vhci_device_reset
        self._sync_vhci(ctrl)

    def _sync_vhci(self, ctrl: int) -> None:
        lines = [STATUS_HEADER]
        for hub in ("hs", "ss"):
            base = ctrl * CTRL_PORTS + (HC_PORTS if hub == "ss" else 0)
            lines += [v.line(hub, base + i) for i, v in enumerate(self.vhci[ctrl][hub])]
        name = "status" if ctrl == 0 else f"status.{ctrl}"
        self._put(f"{VHCI0}/{name}", "".join(lines))

    def render_vhci_status(self, ctrl: int = 0) -> str:
        """What the kernel's ``status`` (``status.<ctrl>``) shows for the current table."""
        self._sync_vhci(ctrl)
        return self.read(f"{VHCI0}/status" if ctrl == 0 else f"{VHCI0}/status.{ctrl}")

    # -- the tree ------------------------------------------------------------

    def _host(self, kpath: str) -> Path:
        return self.sysfs.path(kpath)

    def _canonical(self, rel: str) -> str:
        return self.sysfs.realpath(rel)

    def _usb_dir(self, name: str) -> str | None:
        """Canonical directory of USB device/interface ``name``, if it exists."""
        if not name or "/" in name or name in (".", ".."):
            return None
        link = f"{USB_DEVICES}/{name}"
        if not os.path.isdir(self._host(link)):
            return None
        return self._canonical(link)

    def _busid_of_dir(self, d: str) -> str | None:
        name = posixpath.basename(d)
        return name if self._usb_dir(name) == d else None

    def _listdir(self, kpath: str) -> list[str]:
        try:
            return sorted(os.listdir(self._host(kpath)))
        except OSError:
            return []

    def _isfile(self, kpath: str) -> bool:
        return os.path.isfile(self._host(kpath))

    def _isdir(self, kpath: str) -> bool:
        return os.path.isdir(self._host(kpath))

    def _read_int(self, kpath: str, default: int, base: int = 10) -> int:
        try:
            return int(self.read(kpath).strip(), base)
        except (OSError, ValueError):
            return default

    def _create(self, kpath: str, data: str | bytes, mode: int, fresh: bool = False) -> None:
        host = self._host(kpath)
        raw = data.encode() if isinstance(data, str) else data
        if not fresh:
            self._rmtree(kpath)
            self._paths.add(kpath)
        if self._fake is not None:
            self._fake.create_file(host, st_mode=stat.S_IFREG | mode, contents=raw)
            return
        os.makedirs(host.parent, exist_ok=True)
        with open(host, "wb") as fh:
            fh.write(raw)
        os.chmod(host, mode)

    def _put(self, kpath: str, data: str | bytes) -> None:
        host = self._host(kpath)
        raw = data.encode() if isinstance(data, str) else data
        mode = stat.S_IMODE(os.stat(host).st_mode)
        os.chmod(host, mode | 0o200)
        with open(host, "wb") as fh:
            fh.write(raw)
        os.chmod(host, mode)

    def _link(self, kpath: str, target: str) -> None:
        host = self._host(kpath)
        self._paths.add(kpath)
        if os.path.lexists(host):
            os.unlink(host)
        os.symlink(posixpath.relpath(target, posixpath.dirname(kpath)), host)

    def _remove(self, kpath: str) -> None:
        host = self._host(kpath)
        if os.path.lexists(host):
            os.unlink(host)

    def _rmtree(self, kpath: str) -> None:
        """Remove a file, link or directory tree, if there."""
        host = self._host(kpath)
        if os.path.isdir(host) and not os.path.islink(host):
            shutil.rmtree(host)
        elif os.path.lexists(host):
            os.unlink(host)

    def _capture(self, kpath: str) -> Tree:
        """A subtree of the fake tree in snapshot format (to restore it later)."""
        host = self._host(kpath)
        out: Tree = {}
        if os.path.islink(host):
            out[kpath] = {"link": os.readlink(host)}
        elif os.path.isdir(host):
            out[kpath] = {"dir": True}
            for name in sorted(os.listdir(host)):
                out.update(self._capture(f"{kpath}/{name}"))
        else:
            entry: Entry = {"mode": stat.S_IMODE(os.stat(host).st_mode),
                            "hex": host.read_bytes().hex()}
            if kpath in self.read_errors:
                entry["errno"] = self.read_errors[kpath]
            out[kpath] = entry
        return out

    def snapshot(self, *roots: str) -> Tree:
        """The current tree under ``roots`` in the fixtures' format (to compare with them):
        text of readable attributes, ``errno`` of failing ones, nothing for write-only ones."""
        out: Tree = {}
        for r in roots:
            for k, v in self._capture(r).items():
                if "hex" in v:
                    entry: Entry = {"mode": v["mode"]}
                    if "errno" in v:
                        entry["errno"] = v["errno"]
                    elif v["mode"] & 0o444:
                        raw = bytes.fromhex(v["hex"])
                        try:
                            entry["text"] = raw.decode()
                        except UnicodeDecodeError:
                            entry["hex"] = v["hex"]
                    out[k] = entry
                else:
                    out[k] = v
        return out


def snapshot_tree(name: str) -> Tree:
    """A captured snapshot as loaded from ``tests/fixtures/sysfs`` (scenario or file stem)."""
    return _SNAPSHOTS[SCENARIOS.get(name, name)]


__all__ = [
    "FIXTURES", "PLATFORM", "SCENARIOS", "STUB_DIR", "USB_DEVICES", "USB_DRIVERS", "VHCI0",
    "BusidState", "FakeKernel", "FakeKernelSysfs", "Fault", "KernelOops", "VdevStatus",
    "Write", "snapshot_tree",
]
