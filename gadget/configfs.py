"""USB gadgets in configfs: build, converge, read back and remove, transactionally.

Everything goes through a :class:`~usbipx.sysfs.Sysfs` (injectable root), at
``/sys/kernel/config/usb_gadget``.  The kernel's rules this module follows:

* a function's attributes are written *before* it is linked into a config:
  libcomposite answers EBUSY once it is (mass_storage LUN ``file``,
  ``removable``, ``nofua`` and ``inquiry_string`` excepted);
* mass_storage ``ro`` and ``cdrom`` are written before ``file`` (EBUSY while
  a backing file is open); ``lun.0`` is created by the kernel and can't be
  removed, ``lun.1``+ are ours;
* binary attributes (HID ``report_desc``) are written as raw bytes; configfs
  refuses empty writes (EFAULT), so "empty" is a lone newline;
* strings hold at most 126 bytes (EOVERFLOW);
* links can't be added while the gadget is bound (EINVAL), and removing one
  unbinds it: a changed gadget is unbound, changed, then bound again;
* teardown order: unbind UDC, unlink functions, remove config strings,
  configs, function sub-directories, functions, gadget strings, gadget.
  ``os_desc`` is a default group and is left alone.

Every change is a step of a :class:`Transaction` that knows how to undo it;
if a step fails, the steps done so far are undone in reverse order, so
configfs is left as it was before the call, and :class:`GadgetApplyError`
says which step failed and the kernel's errno in words.
"""

from __future__ import annotations

import errno as _errno
import functools
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath

from loguru import logger

from usbipx.errors import (
    DeviceBusy,
    DeviceNotFound,
    ModuleNotLoaded,
    UsbipError,
    describe_errno,
)
from usbipx.gadget.functions import (
    CONFIG_ATTRS,
    CONFIG_STRINGS,
    GADGET_ATTRS,
    GADGET_STRINGS,
    Attr,
    AttrValue,
    FunctionType,
    Kind,
    decode,
    encode,
    function_type,
    generic,
    ordered,
    same,
)
from usbipx.gadget.spec import (
    UDC_AUTO,
    UDC_NONE,
    ConfigSpec,
    FunctionSpec,
    GadgetSpec,
    Strings,
    check_bindable,
)
from usbipx.names import is_vudc_busid
from usbipx.sysfs import Sysfs

CONFIGFS = "/sys/kernel/config"
GADGET_ROOT = f"{CONFIGFS}/usb_gadget"
UDC_CLASS = "/sys/class/udc"
_LANG_DIR = re.compile(r"^0x[0-9a-fA-F]+$")
_CONFIG_DIR = re.compile(r"^(.+)\.([0-9]+)$")
_LUN_DIR = re.compile(r"^lun\.([0-9]+)$")


class GadgetApplyError(UsbipError):
    """A configfs step failed; what was done before it has been undone.

    ``step`` describes the failed step (``write functions/hid.kbd/protocol``),
    ``errno`` is the kernel's error number (None if not from the kernel) and
    ``rollback_errors`` lists undo steps that failed (empty: configfs is as before).
    """

    def __init__(self, gadget: str, number: int, step: str, cause: UsbipError,
                 rollback_errors: list[str]) -> None:
        self.gadget = gadget
        self.step = step
        self.step_number = number
        self.cause = cause
        self.errno: int | None = getattr(cause, "errno", None)
        if self.errno is None and isinstance(cause, DeviceNotFound):
            self.errno = _errno.ENOENT
        self.rollback_errors = rollback_errors
        self.exit_code = cause.exit_code
        reason = describe_errno(self.errno) if self.errno is not None else str(cause)
        hint = ""
        m = re.match(r"mkdir functions/([^./]+)\.", step)
        if m and self.errno == _errno.ENOENT:
            hint = f" (no kernel module usb_f_{m.group(1)} for function type {m.group(1)!r}?)"
        elif step.startswith("bind UDC") and self.errno == _errno.EBUSY:
            # libcomposite answers EBUSY for every bind failure, not only a held UDC.
            hint = " (the UDC is taken, or a function refused to bind: see dmesg)"
        if rollback_errors:
            tail = "; rollback incomplete: " + "; ".join(rollback_errors)
        else:
            tail = "; rolled back, configfs is as before"
        super().__init__(f"gadget {gadget}: step {number} ({step}) failed: {reason}{hint}{tail}")


@dataclass(frozen=True)
class AppliedGadget:
    """What :func:`apply_spec` did: the gadget, its UDC and the steps taken."""

    name: str
    path: str
    udc: str | None
    created: bool
    changed: bool
    steps: tuple[str, ...] = ()


@dataclass(frozen=True)
class UdcInfo:
    """A UDC from /sys/class/udc and what holds it.

    ``gadget`` is the configfs gadget bound to it; ``holder`` is the gadget
    driver's name even when not a configfs gadget (a legacy g_* module).
    """

    name: str
    gadget: str | None
    holder: str | None
    state: str

    @property
    def free(self) -> bool:
        return self.holder is None

    @property
    def is_vudc(self) -> bool:
        return is_vudc_busid(self.name)


# ---------------------------------------------------------------- low level

class Configfs:
    """The usb_gadget tree over a :class:`Sysfs`, with configfs' write conventions."""

    def __init__(self, sysfs: Sysfs) -> None:
        self.sysfs = sysfs

    def gadget(self, name: str, *parts: str) -> str:
        return str(PurePosixPath(GADGET_ROOT, name, *parts))

    def require(self) -> None:
        """Raise a clear error unless usb_gadget/ is there (configfs mounted, libcomposite)."""
        if self.sysfs.is_dir(GADGET_ROOT):
            return
        if self.sysfs.is_dir("/sys/module/libcomposite"):
            raise ModuleNotLoaded(
                "configfs", f" (or it is not mounted: mount -t configfs none {CONFIGFS})")
        raise ModuleNotLoaded("libcomposite", f" (and configfs mounted at {CONFIGFS})")

    def gadgets(self) -> list[str]:
        return [n for n in self.sysfs.listdir(GADGET_ROOT) if self.sysfs.is_dir(
            f"{GADGET_ROOT}/{n}")]

    def exists(self, name: str) -> bool:
        return self.sysfs.is_dir(self.gadget(name))

    def is_link(self, rel: str) -> bool:
        return os.path.islink(self.sysfs.path(rel))

    def mode(self, rel: str) -> int:
        return os.lstat(self.sysfs.path(rel)).st_mode

    def attr_files(self, rel: str) -> list[str]:
        """Regular files of a directory that are both readable and writable."""
        out = []
        for n in self.sysfs.listdir(rel):
            m = self.mode(f"{rel}/{n}")
            if stat.S_ISREG(m) and m & 0o444 and m & 0o222:
                out.append(n)
        return out

    def created_order(self, rel: str) -> list[str]:
        """Entries of a configfs directory, oldest first.

        configfs lists a directory newest entry first; that order is the only
        record of the order links were made, which is the order of the
        config's interfaces, so it is kept (``gadget save`` relies on it).
        """
        try:
            return list(reversed(os.listdir(self.sysfs.path(rel))))
        except FileNotFoundError:
            return []

    def subdirs(self, rel: str, created_order: bool = False) -> list[str]:
        names = self.created_order(rel) if created_order else self.sysfs.listdir(rel)
        return [n for n in names
                if not self.is_link(f"{rel}/{n}") and self.sysfs.is_dir(f"{rel}/{n}")]

    def links(self, rel: str) -> list[tuple[str, str]]:
        """(link name, function name) of a config directory's symlinks, oldest first."""
        out = []
        for n in self.created_order(rel):
            target = self.sysfs.readlink_name(f"{rel}/{n}") if self.is_link(f"{rel}/{n}") else None
            if target is not None:
                out.append((n, target))
        return out

    def read_value(self, rel: str, attr: Attr) -> AttrValue | None:
        if not self.sysfs.exists(rel):
            return None
        return decode(attr, self.sysfs.read_bytes(rel))

    def write_value(self, rel: str, attr: Attr, value: AttrValue) -> None:
        self.sysfs.write(rel, encode(attr, value))

    def udc_of(self, name: str) -> str | None:
        udc = self.sysfs.read_optional(self.gadget(name, "UDC"))
        return udc or None

    def bind(self, name: str, udc: str) -> None:
        self.sysfs.write(self.gadget(name, "UDC"), udc)

    def unbind(self, name: str) -> None:
        # An empty write is EFAULT; a lone newline unbinds.
        self.sysfs.write(self.gadget(name, "UDC"), "\n")


# ---------------------------------------------------------------- reading

def list_gadgets(sysfs: Sysfs) -> list[str]:
    """Names of the gadgets in configfs (empty if configfs/libcomposite is absent)."""
    return Configfs(sysfs).gadgets()


def read_gadget(name: str, sysfs: Sysfs) -> GadgetSpec:
    """A live gadget as a spec (``udc`` = the UDC it is bound to, or None).

    Applying the result to a tree without the gadget rebuilds the same
    directories, links and attribute values.
    """
    cf = Configfs(sysfs)
    if not cf.exists(name):
        cf.require()
        raise DeviceNotFound(f"no gadget named {name} in {GADGET_ROOT}")
    g = cf.gadget(name)
    udc = cf.udc_of(name)
    attrs: dict[str, AttrValue] = {}
    for ga in GADGET_ATTRS:
        v = cf.read_value(f"{g}/{ga.attr.name}", ga.attr)
        if v is not None:
            attrs[ga.attr.name] = v
    strings = _read_strings(cf, f"{g}/strings", GADGET_STRINGS)
    functions: dict[str, FunctionSpec] = {}
    for fname in cf.subdirs(f"{g}/functions", created_order=True):
        functions[fname] = _read_function(cf, f"{g}/functions/{fname}", fname)
    configs = []
    for cname in cf.subdirs(f"{g}/configs"):
        m = _CONFIG_DIR.match(cname)
        if not m:
            continue
        c = f"{g}/configs/{cname}"
        cattrs: dict[str, AttrValue] = {}
        for ca in CONFIG_ATTRS:
            v = cf.read_value(f"{c}/{ca.attr.name}", ca.attr)
            if v is not None:
                cattrs[ca.attr.name] = v
        configs.append(ConfigSpec(
            number=int(m.group(2)), label=m.group(1), attrs=cattrs,
            strings=_read_strings(cf, f"{c}/strings", CONFIG_STRINGS),
            functions=tuple(f for _, f in cf.links(c)),
        ))
    configs.sort(key=lambda c: c.number)
    return GadgetSpec(name=name, attrs=attrs, strings=strings, configs=tuple(configs),
                      functions=functions, udc=udc)


def _read_strings(cf: Configfs, rel: str, names: tuple[str, ...]) -> dict[int, dict[str, str]]:
    out: dict[int, dict[str, str]] = {}
    for lang in cf.subdirs(rel):
        if not _LANG_DIR.match(lang):
            continue
        table: dict[str, str] = {}
        for n in names:
            p = f"{rel}/{lang}/{n}"
            if cf.sysfs.exists(p):
                raw = cf.sysfs.read_bytes(p).decode("utf-8", "replace")
                table[n] = raw[:-1] if raw.endswith("\n") else raw
        out[int(lang, 16)] = table
    return out


def _function_attrs(ftype: FunctionType | None, cf: Configfs, rel: str) -> list[Attr]:
    """The attributes of a live function to read: the catalogue's or every writable file."""
    if ftype is not None:
        return [a for a in ftype.attrs if cf.sysfs.exists(f"{rel}/{a.name}")]
    return [generic(n) for n in cf.attr_files(rel) if n != "ifname"]


def _read_function(cf: Configfs, rel: str, fname: str) -> FunctionSpec:
    ftype = function_type(fname.split(".", 1)[0])
    attrs: dict[str, AttrValue] = {}
    for a in _function_attrs(ftype, cf, rel):
        v = cf.read_value(f"{rel}/{a.name}", a)
        if v is None or (a.kind is Kind.IFNAME and v == ""):
            continue
        attrs[a.name] = v
    luns: dict[int, dict[str, AttrValue]] = {}
    if ftype is not None and ftype.lun_attrs:
        for d in cf.subdirs(rel):
            m = _LUN_DIR.match(d)
            if not m:
                continue
            lun: dict[str, AttrValue] = {}
            for a in ftype.lun_attrs:
                v = cf.read_value(f"{rel}/{d}/{a.name}", a)
                if v is not None:
                    lun[a.name] = v
            luns[int(m.group(1))] = lun
    return FunctionSpec(name=fname, attrs=attrs, luns=dict(sorted(luns.items())))


def _compact(spec: GadgetSpec) -> GadgetSpec:
    """Drop values equal to the kernel defaults (they converge to them anyway)."""
    def strip(attrs: Mapping[str, AttrValue], catalogue: list[Attr]) -> dict[str, AttrValue]:
        out = {}
        for k, v in attrs.items():
            a = next((x for x in catalogue if x.name == k), None)
            if a is not None and a.default is not None and same(a, a.default, v):
                continue
            if a is not None and a.kernel_managed and v == 0:
                continue
            out[k] = v
        return out

    functions = {}
    for name, f in spec.functions.items():
        ftype = function_type(f.type)
        if ftype is None:
            functions[name] = f
            continue
        functions[name] = FunctionSpec(
            name=name, attrs=strip(f.attrs, list(ftype.attrs)),
            luns={n: strip(lun, list(ftype.lun_attrs)) for n, lun in f.luns.items()})
    configs = tuple(replace(c, attrs=strip(c.attrs, [x.attr for x in CONFIG_ATTRS]))
                    for c in spec.configs)
    return replace(spec, attrs=strip(spec.attrs, [x.attr for x in GADGET_ATTRS]),
                   configs=configs, functions=functions)


def save_gadget(name: str, sysfs: Sysfs) -> GadgetSpec:
    """A live gadget as a compact spec (kernel defaults left out) for ``gadget save``."""
    return _compact(read_gadget(name, sysfs))


# ---------------------------------------------------------------- UDCs

def gadget_on_udc(udc: str, sysfs: Sysfs) -> str | None:
    """Name of the configfs gadget bound to ``udc``, or None."""
    cf = Configfs(sysfs)
    for g in cf.gadgets():
        if cf.udc_of(g) == udc:
            return g
    return None


def list_udcs(sysfs: Sysfs) -> list[UdcInfo]:
    """UDCs in /sys/class/udc (vUDCs first, then by name) and what holds each."""
    cf = Configfs(sysfs)
    bound = {u: g for g in cf.gadgets() if (u := cf.udc_of(g))}
    out = []
    for name in sysfs.listdir(UDC_CLASS):
        holder = sysfs.read_optional(f"{UDC_CLASS}/{name}/function") or None
        gadget = bound.get(name)
        out.append(UdcInfo(name=name, gadget=gadget, holder=holder or gadget,
                           state=sysfs.read_optional(f"{UDC_CLASS}/{name}/state")))
    return sorted(out, key=_udc_order)


def _udc_order(u: UdcInfo) -> tuple[int, str, int]:
    m = re.match(r"^(.*?)([0-9]+)$", u.name)
    base, num = (m.group(1), int(m.group(2))) if m else (u.name, 0)
    return (0 if u.is_vudc else 1, base, num)


def choose_udc(sysfs: Sysfs) -> str:
    """A free UDC for ``--udc auto``: a free usbip-vudc.N first, else any free UDC."""
    udcs = list_udcs(sysfs)
    for u in udcs:  # already ordered vUDCs first
        if u.free:
            return u.name
    if not udcs:
        raise DeviceNotFound("no UDC in /sys/class/udc (modprobe usbip-vudc num=N, or dummy_hcd)")
    raise DeviceBusy("every UDC is held: " + ", ".join(f"{u.name} by {u.holder}" for u in udcs))


def _resolve_udc(sysfs: Sysfs, gadget: str, want: str | None, current: str | None) -> str | None:
    """The UDC the gadget should end up on (None = unbound), checked before any change."""
    if want is None:
        return current
    if want == UDC_NONE:
        return None
    if want == UDC_AUTO:
        return current or choose_udc(sysfs)
    udcs = {u.name: u for u in list_udcs(sysfs)}
    if want not in udcs:
        known = ", ".join(udcs) or "none"
        raise DeviceNotFound(f"no UDC named {want} in {UDC_CLASS} (present: {known})")
    u = udcs[want]
    if u.holder is not None and u.gadget != gadget:
        raise DeviceBusy(f"UDC {want} is held by {u.holder}")
    return want


# ---------------------------------------------------------------- transactions

@dataclass
class _Step:
    what: str
    undo: Callable[[], None] | None


class _StepFailed(Exception):
    def __init__(self, number: int, what: str, cause: UsbipError) -> None:
        super().__init__(what)
        self.number = number
        self.what = what
        self.cause = cause


@dataclass
class Transaction:
    """Configfs changes with their undo actions, for rollback in reverse order.

    Writes inside directories created by this transaction need no undo: the
    directory goes away.  Step descriptions are relative to the gadget.
    """

    cf: Configfs
    name: str
    done: list[_Step] = field(default_factory=list)
    created: set[str] = field(default_factory=set)

    def _rel(self, path: str) -> str:
        base = self.cf.gadget(self.name)
        return path[len(base) + 1:] if path.startswith(base + "/") else path

    def step(self, what: str, do: Callable[[], None], undo: Callable[[], None] | None) -> None:
        logger.debug("gadget {}: {}", self.name, what)
        try:
            do()
        except UsbipError as exc:
            raise _StepFailed(len(self.done) + 1, what, exc) from exc
        self.done.append(_Step(what, undo))

    def _in_created(self, path: str) -> bool:
        return any(path == c or path.startswith(c + "/") for c in self.created)

    def mkdir(self, path: str) -> None:
        self.step(f"mkdir {self._rel(path)}", lambda: self.cf.sysfs.mkdir(path),
                  lambda: self.cf.sysfs.rmdir(path))
        self.created.add(path)

    def rmdir(self, path: str, restore: Callable[[], None] | None) -> None:
        self.step(f"rmdir {self._rel(path)}", lambda: self.cf.sysfs.rmdir(path), restore)

    def write(self, path: str, attr: Attr, value: AttrValue) -> None:
        undo: Callable[[], None] | None = None
        if not self._in_created(path):
            old = self.cf.read_value(path, attr)
            # An unset interface name can't be written back; nothing to restore.
            if old is not None and not (attr.kind is Kind.IFNAME and old == ""):
                undo = functools.partial(self.cf.write_value, path, attr, old)
        self.step(f"write {self._rel(path)}", lambda: self.cf.write_value(path, attr, value), undo)

    def write_string(self, path: str, text: str) -> None:
        undo: Callable[[], None] | None = None
        if not self._in_created(path):
            old = self.cf.sysfs.read_bytes(path) if self.cf.sysfs.exists(path) else b""
            undo = functools.partial(self.cf.sysfs.write, path, old or b"\n")
        self.step(f"write {self._rel(path)}",
                  lambda: self.cf.sysfs.write(path, text.encode() or b"\n"), undo)

    def link(self, function: str, config: str) -> None:
        target = self.cf.gadget(self.name, "functions", function)
        link = self.cf.gadget(self.name, "configs", config, function)
        self.step(f"link configs/{config}/{function}",
                  lambda: self.cf.sysfs.symlink(target, link),
                  lambda: self.cf.sysfs.unlink(link))

    def unlink(self, config: str, link_name: str, function: str) -> None:
        target = self.cf.gadget(self.name, "functions", function)
        link = self.cf.gadget(self.name, "configs", config, link_name)
        self.step(f"unlink configs/{config}/{link_name}",
                  lambda: self.cf.sysfs.unlink(link),
                  lambda: self.cf.sysfs.symlink(target, link))

    def bind(self, udc: str) -> None:
        self.step(f"bind UDC {udc}", lambda: self.cf.bind(self.name, udc),
                  lambda: self.cf.unbind(self.name))

    def unbind(self, old_udc: str) -> None:
        self.step(f"unbind UDC {old_udc}", lambda: self.cf.unbind(self.name),
                  lambda: self.cf.bind(self.name, old_udc))

    def rollback(self) -> list[str]:
        """Undo the steps done, newest first; the descriptions of undo steps that failed."""
        errors = []
        for s in reversed(self.done):
            if s.undo is None:
                continue
            try:
                s.undo()
            except _StepFailed as exc:
                logger.warning("gadget {}: undo of {!r} failed at {}: {}", self.name, s.what,
                               exc.what, exc.cause)
                errors.append(f"undo {s.what}: {exc.what}: {exc.cause}")
            except UsbipError as exc:
                logger.warning("gadget {}: undo of {!r} failed: {}", self.name, s.what, exc)
                errors.append(f"undo {s.what}: {exc}")
        self.done.clear()
        return errors


# ---------------------------------------------------------------- building blocks

def _fpath(tx: Transaction, fname: str, *parts: str) -> str:
    return tx.cf.gadget(tx.name, "functions", fname, *parts)


def _attr_for(ftype: FunctionType | None, name: str) -> Attr:
    a = ftype.attr(name) if ftype is not None else None
    return a or generic(name)


def _lun_attr(ftype: FunctionType | None, name: str) -> Attr:
    a = ftype.lun_attr(name) if ftype is not None else None
    return a or generic(name)


def _write_lun(tx: Transaction, fname: str, n: int, lun: Mapping[str, AttrValue],
               ftype: FunctionType | None, current: Mapping[str, AttrValue] | None) -> None:
    """Write a LUN's attributes: ro/cdrom first, the backing file last.

    ``current`` is the LUN's live state (None for a new LUN); ro/cdrom are
    EBUSY while a file is open, so an open file is closed before they change.
    """
    catalogue = ftype.lun_attrs if ftype is not None else ()
    desired = _with_defaults(lun, catalogue)
    if current is None:
        changes = dict(lun)  # a new LUN has the kernel defaults already
    else:
        changes = {k: v for k, v in desired.items()
                   if not same(_lun_attr(ftype, k), v, current.get(k))}
    base = _fpath(tx, fname, f"lun.{n}")
    if (current is not None and current.get("file")
            and any(_lun_attr(ftype, k).early for k in changes)):
        # ro/cdrom are EBUSY while the backing file is open: close it, reopen it last.
        tx.write(f"{base}/file", _lun_attr(ftype, "file"), "")
        changes.setdefault("file", desired.get("file", ""))
    for k in ordered(changes, catalogue):
        tx.write(f"{base}/{k}", _lun_attr(ftype, k), changes[k])


def _with_defaults(values: Mapping[str, AttrValue],
                   catalogue: tuple[Attr, ...] | list[Attr]) -> dict[str, AttrValue]:
    """Values plus the kernel default of every catalogued attribute not given."""
    out = {a.name: a.default for a in catalogue if a.default is not None}
    out.update(values)
    return out


def _create_function(tx: Transaction, f: FunctionSpec) -> None:
    """mkdir a function and write its attributes (it is not linked yet)."""
    ftype = function_type(f.type)
    tx.mkdir(_fpath(tx, f.name))
    _write_function_attrs(tx, f, ftype, {k: v for k, v in f.attrs.items()})
    for n, lun in sorted(f.luns.items()):
        if n != 0:  # lun.0 comes with the function
            tx.mkdir(_fpath(tx, f.name, f"lun.{n}"))
        _write_lun(tx, f.name, n, lun, ftype, None)


def _write_function_attrs(tx: Transaction, f: FunctionSpec, ftype: FunctionType | None,
                          changes: Mapping[str, AttrValue]) -> None:
    catalogue = ftype.attrs if ftype is not None else ()
    for k in ordered(changes, catalogue):
        tx.write(_fpath(tx, f.name, k), _attr_for(ftype, k), changes[k])


def _function_changes(desired: FunctionSpec, actual: FunctionSpec) -> dict[str, AttrValue]:
    ftype = function_type(desired.type)
    catalogue = ftype.attrs if ftype is not None else ()
    want = _with_defaults(desired.attrs, catalogue)
    return {k: v for k, v in want.items()
            if not same(_attr_for(ftype, k), v, actual.attrs.get(k))}


def _lun_differs(ftype: FunctionType | None, desired: Mapping[str, AttrValue],
                 actual: Mapping[str, AttrValue]) -> bool:
    catalogue = ftype.lun_attrs if ftype is not None else ()
    want = _with_defaults(desired, catalogue)
    return any(not same(_lun_attr(ftype, k), v, actual.get(k)) for k, v in want.items())


def _function_differs(desired: FunctionSpec, actual: FunctionSpec) -> bool:
    if _function_changes(desired, actual):
        return True
    ftype = function_type(desired.type)
    want_luns = {0: {}, **desired.luns} if ftype is not None and ftype.lun_attrs else desired.luns
    if set(want_luns) != set(actual.luns):
        return True
    return any(_lun_differs(ftype, lun, actual.luns[n]) for n, lun in want_luns.items())


def _restore_function(cf: Configfs, name: str, f: FunctionSpec) -> Callable[[], None]:
    """Undo of removing a function: recreate it with its attributes and lun.0."""
    def undo() -> None:
        tx = Transaction(cf, name)
        _create_function(tx, replace(f, luns={n: v for n, v in f.luns.items() if n == 0}))
    return undo


def _restore_lun(cf: Configfs, name: str, fname: str, n: int,
                 lun: Mapping[str, AttrValue]) -> Callable[[], None]:
    def undo() -> None:
        tx = Transaction(cf, name)
        tx.mkdir(_fpath(tx, fname, f"lun.{n}"))
        _write_lun(tx, fname, n, lun, function_type(fname.split(".", 1)[0]), None)
    return undo


def _restore_dir(cf: Configfs, path: str, values: Mapping[str, bytes]) -> Callable[[], None]:
    """Undo of removing a strings or config directory: mkdir and rewrite its files."""
    def undo() -> None:
        cf.sysfs.mkdir(path)
        for n, raw in values.items():
            cf.sysfs.write(f"{path}/{n}", raw or b"\n")
    return undo


def _snapshot_files(cf: Configfs, path: str) -> dict[str, bytes]:
    return {n: cf.sysfs.read_bytes(f"{path}/{n}") for n in cf.attr_files(path)}


def _write_strings(tx: Transaction, base: str, desired: Strings, actual: Strings,
                   names: tuple[str, ...]) -> None:
    """Converge a strings/ directory: languages added, changed or removed."""
    for lang, table in desired.items():
        d = f"{base}/0x{lang:x}"
        have = actual.get(lang)
        if have is None:
            tx.mkdir(d)
            have = {}
        for n in names:
            want = table.get(n, "")
            if have.get(n, "") != want:
                tx.write_string(f"{d}/{n}", want)
    for lang in actual:
        if lang not in desired:
            d = f"{base}/0x{lang:x}"
            tx.rmdir(d, _restore_dir(tx.cf, d, _snapshot_files(tx.cf, d)))


def _remove_config(tx: Transaction, cname: str) -> None:
    c = tx.cf.gadget(tx.name, "configs", cname)
    for link_name, fname in tx.cf.links(c):
        tx.unlink(cname, link_name, fname)
    for lang in tx.cf.subdirs(f"{c}/strings"):
        d = f"{c}/strings/{lang}"
        tx.rmdir(d, _restore_dir(tx.cf, d, _snapshot_files(tx.cf, d)))
    tx.rmdir(c, _restore_dir(tx.cf, c, _snapshot_files(tx.cf, c)))


def _remove_function(tx: Transaction, f: FunctionSpec) -> None:
    """rmdir a function (already unlinked): its lun.1+ first, then the function."""
    for n in sorted(f.luns, reverse=True):
        if n != 0:
            tx.rmdir(_fpath(tx, f.name, f"lun.{n}"),
                     _restore_lun(tx.cf, tx.name, f.name, n, f.luns[n]))
    tx.rmdir(_fpath(tx, f.name), _restore_function(tx.cf, tx.name, f))


# ---------------------------------------------------------------- public API

def apply_spec(spec: GadgetSpec, sysfs: Sysfs, udc: str | None = None) -> AppliedGadget:
    """Create the gadget of ``spec``, or converge the existing one to it.

    ``udc`` (a UDC name, ``"auto"`` or ``"none"``) overrides ``spec.udc``;
    with neither, a new gadget stays unbound and a bound one keeps its UDC.
    Idempotent: a gadget that already matches is not touched.  A changed
    gadget is unbound, changed and bound again.  On any failure every step
    is undone and :class:`GadgetApplyError` names the failed step.
    """
    cf = Configfs(sysfs)
    cf.require()
    want = udc if udc is not None else spec.udc
    exists = cf.exists(spec.name)
    actual = read_gadget(spec.name, sysfs) if exists else None
    current_udc = actual.udc if actual is not None else None
    target = _resolve_udc(sysfs, spec.name, want, current_udc)
    if target is not None:
        check_bindable(spec.configs, f"binding to {target}")
    tx = Transaction(cf, spec.name)
    try:
        if actual is None:
            _create(tx, spec)
        else:
            _converge(tx, spec, actual)
        unbound = any(s.what.startswith("unbind UDC") for s in tx.done)
        if target != current_udc:
            if current_udc is not None and not unbound:
                tx.unbind(current_udc)
            if target is not None:
                tx.bind(target)
        elif current_udc is not None and unbound:
            tx.bind(current_udc)
    except _StepFailed as failed:
        errors = tx.rollback()
        raise GadgetApplyError(spec.name, failed.number, failed.what, failed.cause,
                               errors) from failed.cause
    steps = tuple(s.what for s in tx.done)
    if steps:
        logger.debug("gadget {}: {} ({} steps)", spec.name,
                    "created" if actual is None else "updated", len(steps))
    return AppliedGadget(name=spec.name, path=cf.gadget(spec.name), udc=target,
                         created=actual is None, changed=bool(steps), steps=steps)


def _create(tx: Transaction, spec: GadgetSpec) -> None:
    cf = tx.cf
    g = cf.gadget(spec.name)
    tx.mkdir(g)
    for ga in GADGET_ATTRS:
        if ga.attr.name in spec.attrs:
            tx.write(f"{g}/{ga.attr.name}", ga.attr, spec.attrs[ga.attr.name])
    _write_strings(tx, f"{g}/strings", spec.strings, {}, GADGET_STRINGS)
    for f in spec.functions.values():
        _create_function(tx, f)
    for c in spec.configs:
        _create_config(tx, c)
    for c in spec.configs:
        for fname in c.functions:
            tx.link(fname, c.dirname)


def _create_config(tx: Transaction, c: ConfigSpec) -> None:
    d = tx.cf.gadget(tx.name, "configs", c.dirname)
    tx.mkdir(d)
    for ca in CONFIG_ATTRS:
        if ca.attr.name in c.attrs:
            tx.write(f"{d}/{ca.attr.name}", ca.attr, c.attrs[ca.attr.name])
    _write_strings(tx, f"{d}/strings", c.strings, {}, CONFIG_STRINGS)


def _gadget_attr_changes(spec: GadgetSpec, actual: GadgetSpec) -> dict[str, AttrValue]:
    bound = actual.udc is not None
    out: dict[str, AttrValue] = {}
    for ga in GADGET_ATTRS:
        a = ga.attr
        want = spec.attrs.get(a.name, a.default)
        if want is None or (a.kernel_managed and bound):
            continue
        if not same(a, want, actual.attrs.get(a.name)):
            out[a.name] = want
    return out


def _config_changes(c: ConfigSpec, have: ConfigSpec) -> dict[str, AttrValue]:
    out: dict[str, AttrValue] = {}
    for ca in CONFIG_ATTRS:
        want = c.attrs.get(ca.attr.name, ca.attr.default)
        if want is not None and not same(ca.attr, want, have.attrs.get(ca.attr.name)):
            out[ca.attr.name] = want
    return out


def _strings_differ(desired: Strings, actual: Strings, names: tuple[str, ...]) -> bool:
    if set(desired) != set(actual):
        return True
    return any(desired[lang].get(n, "") != actual[lang].get(n, "")
               for lang in desired for n in names)


def _converge(tx: Transaction, spec: GadgetSpec, actual: GadgetSpec) -> None:
    """Change the live gadget ``actual`` into ``spec`` (the UDC is handled by the caller).

    Nothing is written when they already match.  Otherwise the gadget is
    unbound first: links can't change while bound, and function attributes
    can't change while linked.
    """
    cf = tx.cf
    g = cf.gadget(spec.name)
    attr_changes = _gadget_attr_changes(spec, actual)
    strings_change = _strings_differ(spec.strings, actual.strings, GADGET_STRINGS)
    removed_f = [f for n, f in actual.functions.items() if n not in spec.functions]
    added_f = [f for n, f in spec.functions.items() if n not in actual.functions]
    changed_f = [f for n, f in spec.functions.items()
                 if n in actual.functions and _function_differs(f, actual.functions[n])]
    touched = {f.name for f in removed_f} | {f.name for f in changed_f}
    relink: list[ConfigSpec] = []  # configs whose links are all redone, in spec order
    removed_c = [c for c in actual.configs if spec.config(c.dirname) is None]
    added_c = [c for c in spec.configs if actual.config(c.dirname) is None]
    changed_c: list[tuple[ConfigSpec, ConfigSpec]] = []
    for c in spec.configs:
        have = actual.config(c.dirname)
        if have is None:
            continue
        # Link order can't be read back (configfs lists entries its own way): compare sets.
        links_differ = set(have.functions) != set(c.functions)
        if links_differ or touched & set(have.functions):
            relink.append(c)
        if (_config_changes(c, have) or _strings_differ(c.strings, have.strings, CONFIG_STRINGS)
                or links_differ):
            changed_c.append((c, have))
    if not (attr_changes or strings_change or removed_f or added_f or changed_f or relink
            or removed_c or added_c or changed_c):
        return  # already as specified: not a single write (the caller handles the UDC)

    if actual.udc is not None:
        tx.unbind(actual.udc)
    for k, v in attr_changes.items():
        tx.write(f"{g}/{k}", next(ga.attr for ga in GADGET_ATTRS if ga.attr.name == k), v)
    if strings_change:
        _write_strings(tx, f"{g}/strings", spec.strings, actual.strings, GADGET_STRINGS)

    # Unlink what must change, then remove what goes away.
    for c in relink:
        for link_name, fname in cf.links(cf.gadget(spec.name, "configs", c.dirname)):
            tx.unlink(c.dirname, link_name, fname)
    for c in removed_c:
        _remove_config(tx, c.dirname)
    for f in removed_f:
        _remove_function(tx, f)

    # Change functions (now unlinked) and create new ones.
    for f in changed_f:
        have_f = actual.functions[f.name]
        ftype = function_type(f.type)
        _write_function_attrs(tx, f, ftype, _function_changes(f, have_f))
        want_luns = {0: {}, **f.luns} if ftype is not None and ftype.lun_attrs else dict(f.luns)
        for n in sorted(set(have_f.luns) - set(want_luns), reverse=True):
            tx.rmdir(_fpath(tx, f.name, f"lun.{n}"),
                     _restore_lun(cf, spec.name, f.name, n, have_f.luns[n]))
        for n, lun in sorted(want_luns.items()):
            if n in have_f.luns:
                if _lun_differs(ftype, lun, have_f.luns[n]):
                    _write_lun(tx, f.name, n, lun, ftype, have_f.luns[n])
            else:
                tx.mkdir(_fpath(tx, f.name, f"lun.{n}"))
                _write_lun(tx, f.name, n, lun, ftype, None)
    for f in added_f:
        _create_function(tx, f)

    # Configs: change attributes and strings in place, create new ones, link.
    for c, have in changed_c:
        d = cf.gadget(spec.name, "configs", c.dirname)
        for k, v in _config_changes(c, have).items():
            tx.write(f"{d}/{k}", next(ca.attr for ca in CONFIG_ATTRS if ca.attr.name == k), v)
        _write_strings(tx, f"{d}/strings", c.strings, have.strings, CONFIG_STRINGS)
    for c in added_c:
        _create_config(tx, c)
    for c in spec.configs:
        if c in relink or c in added_c:
            for fname in c.functions:
                tx.link(fname, c.dirname)


def remove_gadget(name: str, sysfs: Sysfs) -> None:
    """Tear a gadget down in the kernel's order; on failure, rebuild what was removed.

    Order: unbind UDC, unlink functions, remove config strings, configs,
    function sub-directories (lun.1+), functions, gadget strings, gadget.
    """
    cf = Configfs(sysfs)
    actual = read_gadget(name, sysfs)
    tx = Transaction(cf, name)
    g = cf.gadget(name)
    try:
        if actual.udc is not None:
            tx.unbind(actual.udc)
        for c in actual.configs:
            _remove_config(tx, c.dirname)
        for f in actual.functions.values():
            _remove_function(tx, f)
        for lang in cf.subdirs(f"{g}/strings"):
            d = f"{g}/strings/{lang}"
            tx.rmdir(d, _restore_dir(cf, d, _snapshot_files(cf, d)))
        tx.rmdir(g, _restore_gadget_dir(cf, g, actual))
    except _StepFailed as failed:
        errors = tx.rollback()
        raise GadgetApplyError(name, failed.number, failed.what, failed.cause,
                               errors) from failed.cause
    logger.debug("gadget {}: removed", name)


def _restore_gadget_dir(cf: Configfs, g: str, actual: GadgetSpec) -> Callable[[], None]:
    def undo() -> None:
        cf.sysfs.mkdir(g)
        for ga in GADGET_ATTRS:
            if ga.attr.name in actual.attrs:
                cf.write_value(f"{g}/{ga.attr.name}", ga.attr, actual.attrs[ga.attr.name])
    return undo


def bind_gadget(name: str, sysfs: Sysfs, udc: str = UDC_AUTO) -> str:
    """Bind an existing gadget to ``udc`` (a name or ``"auto"``); returns the UDC."""
    spec = replace(read_gadget(name, sysfs), udc=udc)
    return apply_spec(spec, sysfs).udc or ""


def unbind_gadget(name: str, sysfs: Sysfs) -> None:
    """Unbind a gadget from its UDC (nothing if it is not bound)."""
    spec = replace(read_gadget(name, sysfs), udc=UDC_NONE)
    apply_spec(spec, sysfs)


__all__ = [
    "GADGET_ROOT", "UDC_CLASS", "AppliedGadget", "Configfs", "GadgetApplyError",
    "Transaction", "UdcInfo", "apply_spec", "bind_gadget", "choose_udc", "gadget_on_udc",
    "list_gadgets", "list_udcs", "read_gadget", "remove_gadget", "save_gadget", "unbind_gadget",
]
