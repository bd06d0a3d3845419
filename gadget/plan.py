"""Planning gadget changes: a pure list of configfs steps, no I/O (sans-IO).

:func:`plan_apply` turns a desired spec and the live gadget (as
:func:`~usbipx.gadget.live.read_gadget` gives it) into the steps that build
or converge it; :func:`plan_remove` into the steps that tear it down.
Neither touches a tree: a step (:mod:`usbipx.gadget.steps`) is a small
frozen dataclass that carries what it needs to do and to undo, with paths
relative to the gadget's directory.  :mod:`usbipx.gadget.transaction`
carries a plan out and rolls it back.

The kernel's rules the plans follow:

* a function's attributes are written *before* it is linked into a config:
  libcomposite answers EBUSY once it is (mass_storage LUN ``file``,
  ``removable``, ``nofua`` and ``inquiry_string`` excepted);
* mass_storage ``ro`` and ``cdrom`` are written before ``file`` (EBUSY while
  a backing file is open: an open file is closed first and reopened last);
  ``lun.0`` is created by the kernel and can't be removed, ``lun.1``+ are ours;
* strings hold at most 126 bytes (EOVERFLOW; the spec checks it);
* links can't be added while the gadget is bound (EINVAL), and removing one
  unbinds it: a changed gadget is unbound, changed, then bound again;
* ``os_desc/`` (Microsoft OS descriptors, :mod:`usbipx.gadget.osdesc`) is
  read when the gadget binds: it changes while unbound, ``use`` after the
  other attributes; its link to a config is made once the config exists and
  its functions are linked, and removed before that config goes (EBUSY);
* teardown order: unbind UDC, unlink os_desc/, unlink functions, remove
  config strings, configs, function sub-directories, functions, gadget
  strings, gadget.  ``os_desc`` itself is a default group and goes with the
  gadget.

Links are removed newest first, so that undoing the removal makes them
again oldest first: their order is the order of the config's interfaces.
A language directory is addressed as ``0x<lang>`` in lower-case hex, as
usbipx and libusbgx make it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from usbipx.gadget.attrs import Attr, AttrValue, generic, same
from usbipx.gadget.functions import (
    CONFIG_ATTRS,
    CONFIG_STRINGS,
    GADGET_ATTRS,
    GADGET_STRINGS,
    FunctionType,
    function_type,
    ordered,
)
from usbipx.gadget.osdesc import B_VENDOR_CODE, INTERFACE_ATTRS, USE, InterfaceOsDesc
from usbipx.gadget.spec import ConfigSpec, FunctionSpec, GadgetSpec, Strings
from usbipx.gadget.steps import (
    TEXT,
    BindUdc,
    Link,
    Mkdir,
    OsDescLink,
    OsDescUnlink,
    Rmdir,
    Step,
    UnbindUdc,
    Unlink,
    Write,
)

# ---------------------------------------------------------------- plans

def plan_apply(desired: GadgetSpec, actual: GadgetSpec | None, udc: str | None) -> list[Step]:
    """The steps that make the live gadget ``actual`` (None: there is none) ``desired``,
    bound to ``udc`` (a UDC name, already resolved; None: unbound).

    Empty when the gadget already is as desired.  Otherwise a bound gadget is
    unbound first (links can't change while bound, function attributes can't
    change while linked) and bound again last.
    """
    steps = _create(desired) if actual is None else _converge(desired, actual)
    current = actual.udc if actual is not None else None
    unbound = any(isinstance(s, UnbindUdc) for s in steps)
    if udc != current:
        if current is not None and not unbound:
            steps.append(UnbindUdc(current))
        if udc is not None:
            steps.append(BindUdc(udc))
    elif current is not None and unbound:
        steps.append(BindUdc(current))
    return steps


def plan_remove(actual: GadgetSpec) -> list[Step]:
    """The steps that tear the live gadget ``actual`` down, in the kernel's order."""
    steps: list[Step] = []
    if actual.udc is not None:
        steps.append(UnbindUdc(actual.udc))
    steps += _os_desc_unlink(actual)
    for c in actual.configs:
        steps += _remove_config(c)
    for f in actual.functions.values():
        steps += _remove_function(f)
    steps += _remove_strings("strings", actual.strings)
    restore: list[Step] = [Mkdir("")]
    restore += [Write(ga.attr.name, ga.attr, actual.attrs[ga.attr.name])
                for ga in GADGET_ATTRS if ga.attr.name in actual.attrs]
    if actual.os_desc is not None:
        restore += [Write(f"os_desc/{a.name}", a, v) for a, v in actual.os_desc.attrs()]
    steps.append(Rmdir("", tuple(restore)))
    return steps


# ---------------------------------------------------------------- create

def _create(spec: GadgetSpec) -> list[Step]:
    steps: list[Step] = [Mkdir("")]
    steps += [Write(ga.attr.name, ga.attr, spec.attrs[ga.attr.name])
              for ga in GADGET_ATTRS if ga.attr.name in spec.attrs]
    steps += _write_strings("strings", spec.strings, None, GADGET_STRINGS)
    for f in spec.functions.values():
        steps += _create_function(f)
    for c in spec.configs:
        steps += _create_config(c)
    for c in spec.configs:
        steps += [Link(c.dirname, fname) for fname in c.functions]
    if spec.os_desc is not None:
        steps += [Write(f"os_desc/{a.name}", a, v) for a, v in spec.os_desc.attrs()]
        linked = spec.os_desc_config()
        if linked is not None:
            steps.append(OsDescLink(linked.dirname))
    return steps


def _create_function(f: FunctionSpec) -> list[Step]:
    """mkdir a function and write its attributes (it is not linked yet)."""
    ftype = function_type(f.type)
    catalogue = ftype.attrs if ftype is not None else ()
    steps: list[Step] = [Mkdir(_fpath(f.name))]
    steps += [Write(_fpath(f.name, k), _attr_for(ftype, k), f.attrs[k])
              for k in ordered(f.attrs, catalogue)]
    steps += _write_interfaces(f.name, f.os_desc, None)
    for n, lun in sorted(f.luns.items()):
        if n != 0:  # lun.0 comes with the function
            steps.append(Mkdir(_fpath(f.name, f"lun.{n}")))
        steps += _write_lun(f.name, n, lun, ftype, None)
    return steps


def _create_config(c: ConfigSpec) -> list[Step]:
    d = f"configs/{c.dirname}"
    steps: list[Step] = [Mkdir(d)]
    steps += [Write(f"{d}/{ca.attr.name}", ca.attr, c.attrs[ca.attr.name])
              for ca in CONFIG_ATTRS if ca.attr.name in c.attrs]
    steps += _write_strings(f"{d}/strings", c.strings, None, CONFIG_STRINGS)
    return steps


def _write_strings(base: str, desired: Strings, actual: Strings | None,
                   names: tuple[str, ...]) -> list[Step]:
    """Converge a strings/ directory: languages added, changed or removed.

    ``actual`` None: the directory was just made (nothing to restore, nothing to remove).
    """
    steps: list[Step] = []
    for lang, table in desired.items():
        d = f"{base}/0x{lang:x}"
        have = actual.get(lang) if actual is not None else None
        if have is None:
            steps.append(Mkdir(d))
        for n in names:
            want = table.get(n, "")
            now = have.get(n, "") if have is not None else ""  # a new directory's are ""
            if now != want:
                steps.append(Write(f"{d}/{n}", TEXT, want, now if have is not None else None))
    if actual is not None:
        steps += _remove_strings(base, {k: v for k, v in actual.items() if k not in desired})
    return steps


def _remove_strings(base: str, strings: Strings) -> list[Step]:
    steps: list[Step] = []
    for lang, table in strings.items():
        d = f"{base}/0x{lang:x}"
        restore: list[Step] = [Mkdir(d)]
        restore += [Write(f"{d}/{n}", TEXT, text) for n, text in table.items()]
        steps.append(Rmdir(d, tuple(restore)))
    return steps


# ---------------------------------------------------------------- functions and LUNs

def _fpath(fname: str, *parts: str) -> str:
    return "/".join(("functions", fname, *parts))


def _attr_for(ftype: FunctionType | None, name: str) -> Attr:
    a = ftype.attr(name) if ftype is not None else None
    return a or generic(name)


def _lun_attr(ftype: FunctionType | None, name: str) -> Attr:
    a = ftype.lun_attr(name) if ftype is not None else None
    return a or generic(name)


def _write_interfaces(fname: str, desired: Mapping[str, InterfaceOsDesc],
                      actual: Mapping[str, InterfaceOsDesc] | None) -> list[Step]:
    """Converge a function's ``os_desc/interface.<name>`` compatible ids.

    ``actual`` None: the function was just made (what is given is written);
    otherwise an interface the spec leaves out converges to empty ids.
    """
    names = [*desired, *(n for n in actual or {} if n not in desired)]
    steps: list[Step] = []
    for n in names:
        want = desired.get(n, InterfaceOsDesc()).values()
        have = actual[n].values() if actual is not None and n in actual else None
        for a in INTERFACE_ATTRS:
            old = have[a.name] if have is not None else None
            if old != want[a.name]:
                steps.append(Write(_fpath(fname, "os_desc", f"interface.{n}", a.name), a,
                                   want[a.name], old))
    return steps


def _with_defaults(values: Mapping[str, AttrValue],
                   catalogue: tuple[Attr, ...]) -> dict[str, AttrValue]:
    """Values plus the kernel default of every catalogued attribute not given."""
    out = {a.name: a.default for a in catalogue if a.default is not None}
    out.update(values)
    return out


def _write_lun(fname: str, n: int, lun: Mapping[str, AttrValue], ftype: FunctionType | None,
               current: Mapping[str, AttrValue] | None) -> list[Step]:
    """Write a LUN's attributes: ro/cdrom first, the backing file last.

    ``current`` is the LUN's live state (None for a new LUN, which has the
    kernel defaults already); ro/cdrom are EBUSY while a file is open, so an
    open file is closed before they change and reopened last.
    """
    catalogue = ftype.lun_attrs if ftype is not None else ()
    base = _fpath(fname, f"lun.{n}")
    if current is None:
        changes = dict(lun)
        return [Write(f"{base}/{k}", _lun_attr(ftype, k), changes[k])
                for k in ordered(changes, catalogue)]
    desired = _with_defaults(lun, catalogue)
    changes = {k: v for k, v in desired.items()
               if not same(_lun_attr(ftype, k), v, current.get(k))}
    old = dict(current)
    steps: list[Step] = []
    if current.get("file") and any(_lun_attr(ftype, k).early for k in changes):
        steps.append(Write(f"{base}/file", _lun_attr(ftype, "file"), "", current["file"]))
        old["file"] = ""
        changes.setdefault("file", desired.get("file", ""))
    steps += [Write(f"{base}/{k}", _lun_attr(ftype, k), changes[k], old.get(k))
              for k in ordered(changes, catalogue)]
    return steps


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


def _wanted_luns(f: FunctionSpec) -> dict[int, Mapping[str, AttrValue]]:
    """The LUNs a function should have: lun.0 always exists for mass_storage."""
    ftype = function_type(f.type)
    if ftype is not None and ftype.lun_attrs:
        return {0: {}, **f.luns}
    return dict(f.luns)


def _function_differs(desired: FunctionSpec, actual: FunctionSpec) -> bool:
    if _function_changes(desired, actual):
        return True
    if _write_interfaces(desired.name, desired.os_desc, actual.os_desc):
        return True
    want_luns = _wanted_luns(desired)
    if set(want_luns) != set(actual.luns):
        return True
    ftype = function_type(desired.type)
    return any(_lun_differs(ftype, lun, actual.luns[n]) for n, lun in want_luns.items())


def _change_function(f: FunctionSpec, have: FunctionSpec) -> list[Step]:
    """Change an (unlinked) function's attributes and LUNs from ``have`` to ``f``."""
    ftype = function_type(f.type)
    catalogue = ftype.attrs if ftype is not None else ()
    changes = _function_changes(f, have)
    steps: list[Step] = [Write(_fpath(f.name, k), _attr_for(ftype, k), changes[k],
                               have.attrs.get(k))
                         for k in ordered(changes, catalogue)]
    steps += _write_interfaces(f.name, f.os_desc, have.os_desc)
    want_luns = _wanted_luns(f)
    for n in sorted(set(have.luns) - set(want_luns), reverse=True):
        steps.append(_remove_lun(f.name, n, have.luns[n], ftype))
    for n, lun in sorted(want_luns.items()):
        if n in have.luns:
            if _lun_differs(ftype, lun, have.luns[n]):
                steps += _write_lun(f.name, n, lun, ftype, have.luns[n])
        else:
            steps.append(Mkdir(_fpath(f.name, f"lun.{n}")))
            steps += _write_lun(f.name, n, lun, ftype, None)
    return steps


def _remove_lun(fname: str, n: int, lun: Mapping[str, AttrValue],
                ftype: FunctionType | None) -> Rmdir:
    d = _fpath(fname, f"lun.{n}")
    return Rmdir(d, (Mkdir(d), *_write_lun(fname, n, lun, ftype, None)))


def _remove_function(f: FunctionSpec) -> list[Step]:
    """rmdir a function (already unlinked): its lun.1+ first, then the function."""
    ftype = function_type(f.type)
    steps: list[Step] = [_remove_lun(f.name, n, f.luns[n], ftype)
                         for n in sorted(f.luns, reverse=True) if n != 0]
    restore = _create_function(replace(f, luns={n: v for n, v in f.luns.items() if n == 0}))
    steps.append(Rmdir(_fpath(f.name), tuple(restore)))
    return steps


# ---------------------------------------------------------------- configs

def _unlink_all(c: ConfigSpec) -> list[Step]:
    """Unlink a live config's functions, newest first (undone oldest first)."""
    return [Unlink(c.dirname, link, fname) for link, fname in reversed(c.linked())]


def _remove_config(c: ConfigSpec) -> list[Step]:
    d = f"configs/{c.dirname}"
    steps = _unlink_all(c)
    steps += _remove_strings(f"{d}/strings", c.strings)
    restore: list[Step] = [Mkdir(d)]
    restore += [Write(f"{d}/{ca.attr.name}", ca.attr, c.attrs[ca.attr.name])
                for ca in CONFIG_ATTRS if ca.attr.name in c.attrs]
    steps.append(Rmdir(d, tuple(restore)))
    return steps


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


# ---------------------------------------------------------------- os_desc

def _os_desc_unlink(actual: GadgetSpec) -> list[Step]:
    """Remove os_desc/'s link to a config (before that config can go)."""
    c = actual.os_desc_config()
    if actual.os_desc is None or c is None:
        return []
    return [OsDescUnlink(actual.os_desc.link or c.dirname, c.dirname)]


def _os_desc_changes(spec: GadgetSpec,
                     actual: GadgetSpec) -> tuple[list[Step], list[Step], list[Step]]:
    """(unlink, writes, link) that take os_desc/ from ``actual`` to ``spec``.

    No ``[os_desc]`` in the spec means ``use`` 0 and no link; the vendor code
    and signature are then left as they are (they do nothing without ``use``).
    """
    want, have = spec.os_desc, actual.os_desc
    writes: list[Step] = []
    if want is not None:
        # A gadget read back without os_desc has the kernel's: code 0, use 0, no signature.
        old = ({a.name: v for a, v in have.attrs()} if have is not None
               else {B_VENDOR_CODE.name: 0, USE.name: False})
        writes = [Write(f"os_desc/{a.name}", a, v, old.get(a.name))
                  for a, v in want.attrs() if not same(a, v, old.get(a.name))]
    elif have is not None and have.use:
        writes = [Write(f"os_desc/{USE.name}", USE, False, True)]
    want_c, have_c = spec.os_desc_config(), actual.os_desc_config()
    if (want_c.dirname if want_c else None) == (have_c.dirname if have_c else None):
        return [], writes, []
    link: list[Step] = [OsDescLink(want_c.dirname)] if want_c is not None else []
    return _os_desc_unlink(actual), writes, link


# ---------------------------------------------------------------- converge

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


def _converge(spec: GadgetSpec, actual: GadgetSpec) -> list[Step]:
    """The steps that change the live gadget ``actual`` into ``spec`` (UDC aside).

    None when they already match.  Otherwise the gadget is unbound first:
    links can't change while bound, and function attributes can't change
    while linked.
    """
    attr_changes = _gadget_attr_changes(spec, actual)
    strings_change = _strings_differ(spec.strings, actual.strings, GADGET_STRINGS)
    removed_f = [f for n, f in actual.functions.items() if n not in spec.functions]
    added_f = [f for n, f in spec.functions.items() if n not in actual.functions]
    changed_f = [f for n, f in spec.functions.items()
                 if n in actual.functions and _function_differs(f, actual.functions[n])]
    touched = {f.name for f in removed_f} | {f.name for f in changed_f}
    relink: list[tuple[ConfigSpec, ConfigSpec]] = []  # links all redone, in spec order
    removed_c = [c for c in actual.configs if spec.config(c.dirname) is None]
    added_c = [c for c in spec.configs if actual.config(c.dirname) is None]
    changed_c: list[tuple[ConfigSpec, ConfigSpec]] = []
    for c in spec.configs:
        have = actual.config(c.dirname)
        if have is None:
            continue
        # Link order can't be read back reliably (another tool's links): compare sets.
        links_differ = set(have.functions) != set(c.functions)
        if links_differ or touched & set(have.functions):
            relink.append((c, have))
        if (_config_changes(c, have) or _strings_differ(c.strings, have.strings, CONFIG_STRINGS)
                or links_differ):
            changed_c.append((c, have))
    os_unlink, os_writes, os_link = _os_desc_changes(spec, actual)
    if not (attr_changes or strings_change or removed_f or added_f or changed_f or relink
            or removed_c or added_c or changed_c or os_unlink or os_writes or os_link):
        return []  # already as specified: not a single write

    steps: list[Step] = []
    if actual.udc is not None:
        steps.append(UnbindUdc(actual.udc))
    by_name = {ga.attr.name: ga.attr for ga in GADGET_ATTRS}
    steps += [Write(k, by_name[k], v, actual.attrs.get(k)) for k, v in attr_changes.items()]
    if strings_change:
        steps += _write_strings("strings", spec.strings, actual.strings, GADGET_STRINGS)
    steps += os_unlink + os_writes

    # Unlink what must change, then remove what goes away.
    for _, have in relink:
        steps += _unlink_all(have)
    for c in removed_c:
        steps += _remove_config(c)
    for f in removed_f:
        steps += _remove_function(f)

    # Change functions (now unlinked) and create new ones.
    for f in changed_f:
        steps += _change_function(f, actual.functions[f.name])
    for f in added_f:
        steps += _create_function(f)

    # Configs: change attributes and strings in place, create new ones, link.
    config_attrs = {ca.attr.name: ca.attr for ca in CONFIG_ATTRS}
    for c, have in changed_c:
        d = f"configs/{c.dirname}"
        steps += [Write(f"{d}/{k}", config_attrs[k], v, have.attrs.get(k))
                  for k, v in _config_changes(c, have).items()]
        steps += _write_strings(f"{d}/strings", c.strings, have.strings, CONFIG_STRINGS)
    for c in added_c:
        steps += _create_config(c)
    redo = {c.dirname for c, _ in relink} | {c.dirname for c in added_c}
    for c in spec.configs:
        if c.dirname in redo:
            steps += [Link(c.dirname, fname) for fname in c.functions]
    return steps + os_link


__all__ = ["plan_apply", "plan_remove"]
