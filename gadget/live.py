"""A live gadget read back from configfs as a spec (``gadget show``, ``gadget save``).

:func:`read_gadget` gives what is there, every value the kernel shows;
:func:`save_gadget` leaves out the values equal to the kernel's defaults,
which applying converges to anyway.  Applying either to a tree without the
gadget rebuilds the same directories, links and attribute values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace

from usbipx.errors import DeviceNotFound
from usbipx.gadget.attrs import Attr, AttrValue, Kind, generic, same
from usbipx.gadget.configfs import GADGET_ROOT, Configfs
from usbipx.gadget.functions import (
    CONFIG_ATTRS,
    CONFIG_STRINGS,
    GADGET_ATTRS,
    GADGET_STRINGS,
    FunctionType,
    function_type,
)
from usbipx.gadget.osdesc import (
    B_VENDOR_CODE,
    COMPATIBLE_ID,
    INTERFACE_DIR,
    QW_SIGN_ATTR,
    SUB_COMPATIBLE_ID,
    USE,
    InterfaceOsDesc,
    OsDescSpec,
)
from usbipx.gadget.spec import ConfigSpec, FunctionSpec, GadgetSpec, validate_gadget_name
from usbipx.sysfs import Sysfs

_LANG_DIR = re.compile(r"0x[0-9a-fA-F]+")
_CONFIG_DIR = re.compile(r"(.+)\.([0-9]+)")
_LUN_DIR = re.compile(r"lun\.([0-9]+)")


def list_gadgets(sysfs: Sysfs) -> list[str]:
    """Names of the gadgets in configfs (empty if configfs/libcomposite is absent)."""
    return Configfs(sysfs).gadgets()


def read_gadget(name: str, sysfs: Sysfs) -> GadgetSpec:
    """A live gadget as a spec (``udc`` = the UDC it is bound to, or None).

    :class:`~usbipx.errors.ValidationError` if ``name`` is not a gadget name,
    :class:`~usbipx.errors.DeviceNotFound` if there is no such gadget.
    """
    validate_gadget_name(name)
    cf = Configfs(sysfs)
    if not cf.exists(name):
        cf.require()
        raise DeviceNotFound(f"no gadget named {name} in {GADGET_ROOT}")
    g = cf.gadget(name)
    attrs: dict[str, AttrValue] = {}
    for ga in GADGET_ATTRS:
        v = cf.read_value(f"{g}/{ga.attr.name}", ga.attr)
        if v is not None:
            attrs[ga.attr.name] = v
    functions: dict[str, FunctionSpec] = {}
    for fname in cf.subdirs(f"{g}/functions", created_order=True):
        functions[fname] = _read_function(cf, f"{g}/functions/{fname}", fname)
    configs = [c for cname in cf.subdirs(f"{g}/configs")
               if (c := _read_config(cf, f"{g}/configs/{cname}", cname)) is not None]
    configs.sort(key=lambda c: c.number)
    return GadgetSpec(name=name, attrs=attrs, strings=_read_strings(cf, f"{g}/strings",
                                                                     GADGET_STRINGS),
                      configs=tuple(configs), functions=functions, udc=cf.udc_of(name),
                      os_desc=_read_os_desc(cf, f"{g}/os_desc"))


def save_gadget(name: str, sysfs: Sysfs) -> GadgetSpec:
    """A live gadget as a compact spec (kernel defaults left out) for ``gadget save``."""
    return compact(read_gadget(name, sysfs))


def _read_config(cf: Configfs, rel: str, cname: str) -> ConfigSpec | None:
    m = _CONFIG_DIR.fullmatch(cname)
    if not m:
        return None
    attrs: dict[str, AttrValue] = {}
    for ca in CONFIG_ATTRS:
        v = cf.read_value(f"{rel}/{ca.attr.name}", ca.attr)
        if v is not None:
            attrs[ca.attr.name] = v
    links = cf.links(rel)
    return ConfigSpec(number=int(m.group(2)), label=m.group(1), attrs=attrs,
                      strings=_read_strings(cf, f"{rel}/strings", CONFIG_STRINGS),
                      functions=tuple(f for _, f in links), links=tuple(n for n, _ in links))


def _read_os_desc(cf: Configfs, rel: str) -> OsDescSpec | None:
    """os_desc/ as a spec; None while it is as the kernel makes it (unused, unlinked)."""
    use = cf.read_value(f"{rel}/use", USE)
    code = cf.read_value(f"{rel}/b_vendor_code", B_VENDOR_CODE)
    qw_sign = cf.read_value(f"{rel}/qw_sign", QW_SIGN_ATTR)
    links = cf.links(rel)
    if not (use or code or qw_sign or links):
        return None
    config = None
    link = ""
    if links:
        link, target = links[0]  # the kernel takes one link (EBUSY for a second)
        m = _CONFIG_DIR.fullmatch(target)
        config = int(m.group(2)) if m else None
    return OsDescSpec(use=bool(use), b_vendor_code=code if isinstance(code, int) else 0,
                      qw_sign=qw_sign if isinstance(qw_sign, str) and qw_sign else None,
                      config=config, link=link)


def _read_interfaces(cf: Configfs, rel: str) -> dict[str, InterfaceOsDesc]:
    """A function's os_desc/interface.<name> directories (rndis, ncm) and their ids."""
    out: dict[str, InterfaceOsDesc] = {}
    for d in cf.subdirs(f"{rel}/os_desc"):
        m = INTERFACE_DIR.fullmatch(d)
        if not m:
            continue
        ids = [cf.read_value(f"{rel}/os_desc/{d}/{a.name}", a)
               for a in (COMPATIBLE_ID, SUB_COMPATIBLE_ID)]
        out[m.group(1)] = InterfaceOsDesc(*(v if isinstance(v, str) else "" for v in ids))
    return out


def _read_strings(cf: Configfs, rel: str, names: tuple[str, ...]) -> dict[int, dict[str, str]]:
    out: dict[int, dict[str, str]] = {}
    for lang in cf.subdirs(rel):
        if not _LANG_DIR.fullmatch(lang):
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
            m = _LUN_DIR.fullmatch(d)
            if not m:
                continue
            lun: dict[str, AttrValue] = {}
            for a in ftype.lun_attrs:
                v = cf.read_value(f"{rel}/{d}/{a.name}", a)
                if v is not None:
                    lun[a.name] = v
            luns[int(m.group(1))] = lun
    return FunctionSpec(name=fname, attrs=attrs, luns=dict(sorted(luns.items())),
                        os_desc=_read_interfaces(cf, rel))


def compact(spec: GadgetSpec) -> GadgetSpec:
    """``spec`` without the values equal to the kernel defaults (they converge to them anyway)."""
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
        # Interfaces without compatible ids are as the kernel makes them.
        os_desc = {n: i for n, i in f.os_desc.items() if i != InterfaceOsDesc()}
        if ftype is None:
            functions[name] = replace(f, os_desc=os_desc)
            continue
        functions[name] = FunctionSpec(
            name=name, attrs=strip(f.attrs, list(ftype.attrs)),
            luns={n: strip(lun, list(ftype.lun_attrs)) for n, lun in f.luns.items()},
            os_desc=os_desc)
    configs = tuple(replace(c, attrs=strip(c.attrs, [x.attr for x in CONFIG_ATTRS]))
                    for c in spec.configs)
    return replace(spec, attrs=strip(spec.attrs, [x.attr for x in GADGET_ATTRS]),
                   configs=configs, functions=functions)


__all__ = ["compact", "list_gadgets", "read_gadget", "save_gadget"]
