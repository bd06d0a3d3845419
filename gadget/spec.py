"""Declarative gadget specs (TOML): parsing, validation and writing back.

A spec describes one gadget under ``/sys/kernel/config/usb_gadget/<name>``::

    name = "demo"
    udc = "dummy_udc.0"            # optional: a UDC, "auto" or "none"
    id_vendor = 0x1d6b
    id_product = 0x0104

    [strings]                      # language 0x409; [strings."0x407"] for others
    manufacturer = "Example"

    [[configs]]
    number = 1
    max_power = 250
    functions = ["mass_storage.disk", "acm.tty", "hid.kbd"]

    [functions."mass_storage.disk".lun.0]
    file = "/var/lib/usbipx/disk.img"

    [functions."acm.tty"]

    [functions."hid.kbd"]
    preset = "keyboard"

Microsoft OS descriptors (``[os_desc]`` and ``os_desc.interface.<name>`` of a
function) are described in :mod:`usbipx.gadget.osdesc`.

:func:`parse_spec` checks everything that can be checked without the kernel
(names, ranges, backing files, references between configs and functions)
and raises :class:`~usbipx.errors.ConfigError` naming the key at fault, so a
bad spec never touches configfs.  :func:`usbipx.gadget.dump.dump_spec` writes
the same format back (``gadget save``).
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from usbipx.errors import ConfigError, ValidationError
from usbipx.gadget import hid
from usbipx.gadget.attrs import Attr, AttrValue, Kind, coerce, generic
from usbipx.gadget.functions import (
    CONFIG_ATTRS,
    CONFIG_STRINGS,
    GADGET_ATTRS,
    GADGET_STRINGS,
    MAX_FUNCTION_NAME,
    MAX_LUNS,
    MAX_STRING_BYTES,
    FunctionType,
    GadgetAttr,
    function_type,
)
from usbipx.gadget.osdesc import (
    INTERFACE_NAME,
    InterfaceOsDesc,
    OsDescSpec,
    parse_interfaces,
    parse_os_desc,
)
from usbipx.names import GADGET_NAME
from usbipx.tomlfile import read_toml

LANG_EN_US = 0x409
# Names that end up in configfs paths.  Always used with fullmatch: ``re.match``
# with ``$`` accepts a trailing newline.
FUNCTION_NAME = re.compile(r"([A-Za-z0-9_]+)\.([A-Za-z0-9_-]+)")
CONFIG_LABEL = re.compile(r"[A-Za-z0-9_-]{1,32}")
UDC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_ATTR_NAME = re.compile(r"[A-Za-z0-9_]+")
_LINK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
UDC_AUTO = "auto"
UDC_NONE = "none"
_GADGET_NAME_RULE = "letters, digits, _ and -, at most 64"


def is_gadget_name(name: object) -> TypeGuard[str]:
    """Whether ``name`` can name a gadget (its directory under usb_gadget/)."""
    return isinstance(name, str) and GADGET_NAME.fullmatch(name) is not None


def validate_gadget_name(name: str) -> str:
    """Return ``name`` if it is a gadget name, else raise :class:`ValidationError`.

    Every function that builds a configfs path from a gadget name calls this
    first, so ``/srv/x`` or ``../x`` never becomes a path.
    """
    if not is_gadget_name(name):
        raise ValidationError(f"{name!r} is not a gadget name ({_GADGET_NAME_RULE})")
    return name


def validate_udc_name(name: str) -> str:
    """Return ``name`` if it can name a UDC (``dummy_udc.0``); :class:`ValidationError` if not."""
    if not isinstance(name, str) or UDC_NAME.fullmatch(name) is None:
        raise ValidationError(f"{name!r} is not a UDC name (e.g. dummy_udc.0 or usbip-vudc.0)")
    return name

Strings = Mapping[int, Mapping[str, str]]
"""Language id -> string name -> text, as under a ``strings/`` directory."""


@dataclass(frozen=True)
class FunctionSpec:
    """One function directory ``functions/<type>.<instance>``.

    ``attrs`` maps configfs attribute names to values (HID presets already
    expanded); ``luns`` holds mass_storage's ``lun.N`` sub-directories;
    ``os_desc`` the compatible ids of its ``os_desc/interface.<name>``.
    """

    name: str
    attrs: Mapping[str, AttrValue] = field(default_factory=dict)
    luns: Mapping[int, Mapping[str, AttrValue]] = field(default_factory=dict)
    os_desc: Mapping[str, InterfaceOsDesc] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def instance(self) -> str:
        return self.name.split(".", 1)[1]


@dataclass(frozen=True)
class ConfigSpec:
    """One configuration ``configs/<label>.<number>`` and its linked functions, in order.

    ``links`` are the names of the symlinks in a live config, parallel to
    ``functions`` (another tool may name them ``f1``, ``f2`` ...); empty means
    named after the functions, as usbipx makes them.  They say nothing about
    the device, so they take no part in comparing specs.
    """

    number: int
    label: str = "c"
    attrs: Mapping[str, AttrValue] = field(default_factory=dict)
    strings: Strings = field(default_factory=dict)
    functions: tuple[str, ...] = ()
    links: tuple[str, ...] = field(default=(), compare=False)

    @property
    def dirname(self) -> str:
        return f"{self.label}.{self.number}"

    def linked(self) -> list[tuple[str, str]]:
        """(link name, function name) of each link, oldest first."""
        names = self.links or self.functions
        return list(zip(names, self.functions, strict=True))


@dataclass(frozen=True)
class GadgetSpec:
    """A whole gadget: device attributes (configfs names), strings, configs, functions.

    ``udc`` is the UDC to bind to: a name, ``"auto"``, ``"none"`` (unbound) or
    None (no preference: a new gadget stays unbound, a bound one stays bound).
    ``os_desc`` None: no Microsoft OS descriptors (``os_desc/use`` 0, no link).
    """

    name: str
    attrs: Mapping[str, AttrValue] = field(default_factory=dict)
    strings: Strings = field(default_factory=dict)
    configs: tuple[ConfigSpec, ...] = ()
    functions: Mapping[str, FunctionSpec] = field(default_factory=dict)
    udc: str | None = None
    os_desc: OsDescSpec | None = None

    def config(self, dirname: str) -> ConfigSpec | None:
        return next((c for c in self.configs if c.dirname == dirname), None)

    def os_desc_config(self) -> ConfigSpec | None:
        """The configuration ``os_desc/`` links to, or None."""
        n = self.os_desc.config if self.os_desc is not None else None
        return next((c for c in self.configs if c.number == n), None)


# ---------------------------------------------------------------- parsing

def load_spec(path: str | Path) -> GadgetSpec:
    """Read and validate a TOML spec file; :class:`ConfigError` names the key at fault."""
    return parse_spec(read_toml(path), source=str(path))


def loads_spec(text: str, source: str = "<spec>") -> GadgetSpec:
    """Parse and validate TOML text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    return parse_spec(data, source=source)


def parse_spec(data: Mapping[str, Any], source: str = "<spec>") -> GadgetSpec:
    """Validate a decoded spec (a dict as from TOML) into a :class:`GadgetSpec`."""
    try:
        return _parse(data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _key(*parts: str | int) -> str:
    """A TOML key path for error messages: functions."hid.kbd".report_desc."""
    out = []
    for p in parts:
        s = str(p)
        # Quoted as a TOML basic string, escapes and all: an error stays one line.
        out.append(s if re.fullmatch(r"[A-Za-z0-9_-]+(\[[0-9]+\])?", s)
                   else json.dumps(s, ensure_ascii=False))
    return ".".join(out)


def _table(value: object, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a table, got {value!r}")
    return value


def _parse(data: Mapping[str, Any]) -> GadgetSpec:
    data = _table(data, "spec")
    name = data.get("name")
    if not is_gadget_name(name):
        raise ConfigError(
            f"name: {name!r} is not a gadget name ({_GADGET_NAME_RULE})"
            if name is not None else "name: missing (the directory under usb_gadget/)"
        )
    udc = data.get("udc")
    if udc is not None and (not isinstance(udc, str) or not UDC_NAME.fullmatch(udc)):
        raise ConfigError(f"udc: {udc!r} is not a UDC name (e.g. dummy_udc.0), auto or none")

    attrs = _parse_attrs(data, GADGET_ATTRS, (), {"name", "udc", "strings", "configs",
                                                    "functions", "os_desc"})
    strings = _parse_strings(data.get("strings", {}), GADGET_STRINGS, ("strings",))

    functions: dict[str, FunctionSpec] = {}
    for fname, fbody in _table(data.get("functions", {}), "functions").items():
        functions[fname] = _parse_function(fname, fbody)

    raw_configs = data.get("configs", [])
    if not isinstance(raw_configs, list):
        raise ConfigError("configs: expected an array of tables ([[configs]])")
    configs: list[ConfigSpec] = []
    for i, cbody in enumerate(raw_configs):
        cfg = _parse_config(cbody, i, functions)
        if any(c.number == cfg.number for c in configs):
            raise ConfigError(f"configs[{i}].number: configuration {cfg.number} is given twice")
        configs.append(cfg)

    os_desc = None
    if "os_desc" in data:
        os_desc = parse_os_desc(data["os_desc"], [c.number for c in configs])

    if udc is not None and udc != UDC_NONE:
        check_bindable(configs, f"udc = {udc!r}")
    return GadgetSpec(name=name, attrs=attrs, strings=strings, configs=tuple(configs),
                      functions=functions, udc=udc, os_desc=os_desc)


def check_bindable(configs: tuple[ConfigSpec, ...] | list[ConfigSpec], why: str) -> None:
    """A gadget binds only with at least one config and a function in every config."""
    if not configs:
        raise ConfigError(f"configs: {why} needs at least one [[configs]] with functions")
    for i, c in enumerate(configs):
        if not c.functions:
            raise ConfigError(f"configs[{i}].functions: {why} needs at least one function "
                              "in every configuration (the kernel refuses to bind)")


def check_names(spec: GadgetSpec) -> None:
    """Raise :class:`ValidationError` unless every name in ``spec`` that becomes part of a
    configfs path is valid: the gadget, its functions, configs, LUNs, OS descriptor
    interfaces and links, and UDC.

    :func:`parse_spec` checks all of this with the key at fault; this is for specs
    built in code, checked again before anything reaches configfs.
    """
    validate_gadget_name(spec.name)
    if spec.udc is not None and spec.udc not in (UDC_AUTO, UDC_NONE):
        validate_udc_name(spec.udc)
    for key, f in spec.functions.items():
        if key != f.name or FUNCTION_NAME.fullmatch(f.name) is None:
            raise ValidationError(f"gadget {spec.name}: {f.name!r} is not a function name "
                                  "(<type>.<instance>)")
        if any(not 0 <= n < MAX_LUNS for n in f.luns):
            raise ValidationError(f"gadget {spec.name}: {f.name} has a LUN out of 0..15")
        for attrs in (f.attrs, *f.luns.values()):
            for k in attrs:
                if _ATTR_NAME.fullmatch(k) is None:
                    raise ValidationError(f"gadget {spec.name}: {f.name}: {k!r} is not "
                                          "a configfs attribute name")
        for i in f.os_desc:
            if INTERFACE_NAME.fullmatch(i) is None:
                raise ValidationError(f"gadget {spec.name}: {f.name}: {i!r} is not an "
                                      "interface name")
    for c in spec.configs:
        if CONFIG_LABEL.fullmatch(c.label) is None or not 1 <= c.number <= 255:
            raise ValidationError(f"gadget {spec.name}: {c.dirname!r} is not a config "
                                  "(<label>.<1..255>)")
        for fname in c.functions:
            if fname not in spec.functions:
                raise ValidationError(f"gadget {spec.name}: config {c.dirname} links "
                                      f"{fname!r}, which is not one of its functions")
    od = spec.os_desc
    if od is not None:
        if od.config is not None and spec.os_desc_config() is None:
            raise ValidationError(f"gadget {spec.name}: os_desc links configuration "
                                  f"{od.config}, which it does not have")
        if od.link and _LINK_NAME.fullmatch(od.link) is None:
            raise ValidationError(f"gadget {spec.name}: {od.link!r} is not a link name")


def _parse_attrs(body: Mapping[str, Any], catalogue: tuple[GadgetAttr, ...],
                 prefix: tuple[str | int, ...], other_keys: set[str]) -> dict[str, AttrValue]:
    """Device or config attributes by spec key (id_vendor) or configfs name (idVendor)."""
    out: dict[str, AttrValue] = {}
    by_key = {g.key: g.attr for g in catalogue}
    by_cfs = {g.attr.name: g.attr for g in catalogue}
    for k, v in body.items():
        if k in other_keys:
            continue
        attr = by_key.get(k) or by_cfs.get(k)
        if attr is None:
            known = ", ".join([*other_keys, *by_key])
            raise ConfigError(f"{_key(*prefix, k)}: unknown key (known: {known})")
        if attr.name in out:
            raise ConfigError(f"{_key(*prefix, k)}: {attr.name} is given twice")
        out[attr.name] = coerce(attr, v, _key(*prefix, k))
    for g in catalogue:
        if g.attr.required and g.attr.name not in out:
            raise ConfigError(f"{_key(*prefix, g.key)}: missing (required)")
    return out


_LANG = re.compile(r"0x[0-9a-fA-F]{1,4}")


def _parse_strings(body: object, names: tuple[str, ...],
                   prefix: tuple[str | int, ...]) -> dict[int, dict[str, str]]:
    """``{manufacturer = ...}`` for 0x409 and ``{"0x407" = {...}}`` for other languages."""
    table = _table(body, _key(*prefix))
    out: dict[int, dict[str, str]] = {}
    for k, v in table.items():
        if isinstance(v, Mapping):
            if not _LANG.fullmatch(k) or int(k, 16) == 0:
                raise ConfigError(f"{_key(*prefix, k)}: not a language id like \"0x409\"")
            lang = int(k, 16)
            for sk, sv in v.items():
                out.setdefault(lang, {})[sk] = _string(sv, names, (*prefix, k, sk))
        else:
            out.setdefault(LANG_EN_US, {})[k] = _string(v, names, (*prefix, k))
    return out


def _string(value: object, names: tuple[str, ...], path: tuple[str | int, ...]) -> str:
    key = _key(*path)
    if path[-1] not in names:
        raise ConfigError(f"{key}: unknown string (known: {', '.join(names)})")
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if "\n" in value or "\0" in value:
        raise ConfigError(f"{key}: must not contain a newline or NUL")
    if len(value.encode()) > MAX_STRING_BYTES:
        raise ConfigError(f"{key}: {len(value.encode())} bytes is longer than the "
                          f"{MAX_STRING_BYTES} a USB string descriptor holds")
    return value


def _parse_config(body: object, i: int, functions: Mapping[str, FunctionSpec]) -> ConfigSpec:
    where = f"configs[{i}]"
    prefix: tuple[str | int, ...] = (where,)
    table = _table(body, where)
    number = table.get("number")
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 255:
        raise ConfigError(f"{_key(*prefix, 'number')}: "
                          + ("missing" if number is None else f"{number!r} is not 1..255"))
    label = table.get("label", "c")
    if not isinstance(label, str) or not CONFIG_LABEL.fullmatch(label):
        raise ConfigError(f"{_key(*prefix, 'label')}: {label!r} is not a config label "
                          "(letters, digits, _ and -)")
    attrs = _parse_attrs(table, CONFIG_ATTRS, prefix,
                         {"number", "label", "functions", "strings", "configuration"})
    strings = _parse_strings(table.get("strings", {}), CONFIG_STRINGS, (*prefix, "strings"))
    if "configuration" in table:
        if LANG_EN_US in strings and "configuration" in strings[LANG_EN_US]:
            raise ConfigError(f"{_key(*prefix, 'configuration')}: also given under strings")
        text = _string(table["configuration"], CONFIG_STRINGS, (*prefix, "configuration"))
        strings.setdefault(LANG_EN_US, {})["configuration"] = text
    funcs = table.get("functions", [])
    if not isinstance(funcs, list) or not all(isinstance(f, str) for f in funcs):
        raise ConfigError(f"{_key(*prefix, 'functions')}: expected a list of function names")
    for f in funcs:
        if f not in functions:
            raise ConfigError(f"{_key(*prefix, 'functions')}: {f!r} is not declared "
                              f"as [functions.\"{f}\"]")
        if funcs.count(f) > 1:
            raise ConfigError(f"{_key(*prefix, 'functions')}: {f!r} is listed twice")
    return ConfigSpec(number=number, label=label, attrs=attrs, strings=strings,
                      functions=tuple(funcs))


_LUN_KEY = re.compile(r"lun\.([0-9]+)")


def _parse_function(name: str, body: object) -> FunctionSpec:
    prefix = ("functions", name)
    key = _key(*prefix)
    m = FUNCTION_NAME.fullmatch(name)
    if not m:
        raise ConfigError(f"{key}: a function is named <type>.<instance> as in configfs "
                          "(e.g. \"acm.usb0\"; letters, digits, _ and -)")
    if len(name) > MAX_FUNCTION_NAME:
        raise ConfigError(f"{key}: longer than the kernel's {MAX_FUNCTION_NAME} characters")
    table = dict(_table(body, key))
    ftype = function_type(m.group(1))
    attrs: dict[str, AttrValue] = {}
    luns: dict[int, dict[str, AttrValue]] = {}

    if ftype is not None and ftype.name == "hid" and "preset" in table:
        preset_name = table.pop("preset")
        preset = hid.PRESETS.get(preset_name) if isinstance(preset_name, str) else None
        if preset is None:
            raise ConfigError(f"{_key(*prefix, 'preset')}: {preset_name!r} is not a HID preset "
                              f"(known: {', '.join(hid.PRESETS)})")
        attrs.update(preset.attrs())  # explicit keys below override the preset

    raw_os_desc = table.pop("os_desc", None)
    raw_luns: dict[int, tuple[tuple[str | int, ...], object]] = {}
    for k in list(table):
        lm = _LUN_KEY.fullmatch(k)
        if k == "lun" and isinstance(table[k], Mapping):
            for n, lbody in table.pop(k).items():
                if not str(n).isdigit():
                    raise ConfigError(f"{_key(*prefix, 'lun', n)}: LUNs are numbered lun.0 ..")
                raw_luns[int(n)] = ((*prefix, "lun", n), lbody)
        elif lm:
            raw_luns[int(lm.group(1))] = ((*prefix, k), table.pop(k))

    for k, v in table.items():
        attr = _function_attr(ftype, k, (*prefix, k))
        attrs[k] = coerce(attr, v, _key(*prefix, k))

    if raw_luns and (ftype is None or not ftype.lun_attrs):
        raise ConfigError(f"{key}: only mass_storage has lun.N sub-directories")
    for n, (lpath, lbody) in sorted(raw_luns.items()):
        if n >= MAX_LUNS:
            raise ConfigError(f"{_key(*lpath)}: at most {MAX_LUNS} LUNs (lun.0 .. lun.15)")
        assert ftype is not None
        lun: dict[str, AttrValue] = {}
        for k, v in _table(lbody, _key(*lpath)).items():
            lattr = ftype.lun_attr(k)
            if lattr is None:
                known = ", ".join(a.name for a in ftype.lun_attrs)
                raise ConfigError(f"{_key(*lpath, k)}: not a LUN attribute (known: {known})")
            lun[k] = coerce(lattr, v, _key(*lpath, k))
        luns[n] = lun

    os_desc = parse_interfaces(ftype, raw_os_desc, key) if raw_os_desc is not None else {}
    if ftype is not None:
        if ftype.extra_check is not None:
            ftype.extra_check(attrs, luns, key)
        for a in ftype.attrs:
            if a.required and a.name not in attrs:
                raise ConfigError(f"{_key(*prefix, a.name)}: missing (required)")
    return FunctionSpec(name=name, attrs=attrs, luns=luns, os_desc=os_desc)


def _function_attr(ftype: FunctionType | None, name: str, path: tuple[str | int, ...]) -> Attr:
    if not _ATTR_NAME.fullmatch(name):
        raise ConfigError(f"{_key(*path)}: not a configfs attribute name")
    if ftype is None:
        return generic(name)
    attr: Attr | None = ftype.attr(name)
    if attr is not None:
        return attr
    if name in ftype.read_only:
        raise ConfigError(f"{_key(*path)}: read-only; the kernel sets it")
    known = ", ".join(a.name for a in ftype.attrs) or "none"
    extra = ", preset" if ftype.name == "hid" else ""
    raise ConfigError(f"{_key(*path)}: {ftype.name} has no attribute {name!r} "
                      f"(known: {known}{extra})")


# Attribute kinds exported for callers that format values (show, JSON).
__all__ = [
    "LANG_EN_US", "UDC_AUTO", "UDC_NONE", "ConfigSpec", "FunctionSpec", "GadgetSpec",
    "InterfaceOsDesc", "Kind", "OsDescSpec", "check_bindable", "check_names", "is_gadget_name",
    "load_spec", "loads_spec", "parse_spec", "validate_gadget_name", "validate_udc_name",
]
