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

:func:`parse_spec` checks everything that can be checked without the kernel
(names, ranges, backing files, references between configs and functions)
and raises :class:`~usbipx.errors.ConfigError` naming the key at fault, so a
bad spec never touches configfs.  :func:`dump_spec` writes the same format
back (``gadget save``).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from usbipx.errors import ConfigError
from usbipx.gadget import hid
from usbipx.gadget.functions import (
    CONFIG_ATTRS,
    CONFIG_STRINGS,
    GADGET_ATTRS,
    GADGET_STRINGS,
    MAX_FUNCTION_NAME,
    MAX_LUNS,
    MAX_STRING_BYTES,
    Attr,
    AttrValue,
    FunctionType,
    GadgetAttr,
    Kind,
    coerce,
    function_type,
    generic,
)
from usbipx.tomlfile import read_toml

LANG_EN_US = 0x409
GADGET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
FUNCTION_NAME = re.compile(r"^([A-Za-z0-9_]+)\.([A-Za-z0-9_-]+)$")
CONFIG_LABEL = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
UDC_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
UDC_AUTO = "auto"
UDC_NONE = "none"

Strings = Mapping[int, Mapping[str, str]]
"""Language id -> string name -> text, as under a ``strings/`` directory."""


@dataclass(frozen=True)
class FunctionSpec:
    """One function directory ``functions/<type>.<instance>``.

    ``attrs`` maps configfs attribute names to values (HID presets already
    expanded); ``luns`` holds mass_storage's ``lun.N`` sub-directories.
    """

    name: str
    attrs: Mapping[str, AttrValue] = field(default_factory=dict)
    luns: Mapping[int, Mapping[str, AttrValue]] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def instance(self) -> str:
        return self.name.split(".", 1)[1]


@dataclass(frozen=True)
class ConfigSpec:
    """One configuration ``configs/<label>.<number>`` and its linked functions, in order."""

    number: int
    label: str = "c"
    attrs: Mapping[str, AttrValue] = field(default_factory=dict)
    strings: Strings = field(default_factory=dict)
    functions: tuple[str, ...] = ()

    @property
    def dirname(self) -> str:
        return f"{self.label}.{self.number}"


@dataclass(frozen=True)
class GadgetSpec:
    """A whole gadget: device attributes (configfs names), strings, configs, functions.

    ``udc`` is the UDC to bind to: a name, ``"auto"``, ``"none"`` (unbound) or
    None (no preference: a new gadget stays unbound, a bound one stays bound).
    """

    name: str
    attrs: Mapping[str, AttrValue] = field(default_factory=dict)
    strings: Strings = field(default_factory=dict)
    configs: tuple[ConfigSpec, ...] = ()
    functions: Mapping[str, FunctionSpec] = field(default_factory=dict)
    udc: str | None = None

    def config(self, dirname: str) -> ConfigSpec | None:
        return next((c for c in self.configs if c.dirname == dirname), None)


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
        out.append(s if re.fullmatch(r"[A-Za-z0-9_-]+(\[[0-9]+\])?", s) else f'"{s}"')
    return ".".join(out)


def _table(value: object, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a table, got {value!r}")
    return value


def _parse(data: Mapping[str, Any]) -> GadgetSpec:
    data = _table(data, "spec")
    name = data.get("name")
    if not isinstance(name, str) or not GADGET_NAME.match(name):
        raise ConfigError(
            f"name: {name!r} is not a gadget name (letters, digits, _ and -, at most 64)"
            if name is not None else "name: missing (the directory under usb_gadget/)"
        )
    udc = data.get("udc")
    if udc is not None and (not isinstance(udc, str) or not UDC_NAME.match(udc)):
        raise ConfigError(f"udc: {udc!r} is not a UDC name (e.g. dummy_udc.0), auto or none")

    attrs = _parse_attrs(data, GADGET_ATTRS, (), {"name", "udc", "strings", "configs",
                                                    "functions"})
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

    if udc is not None and udc != UDC_NONE:
        check_bindable(configs, f"udc = {udc!r}")
    return GadgetSpec(name=name, attrs=attrs, strings=strings, configs=tuple(configs),
                      functions=functions, udc=udc)


def check_bindable(configs: tuple[ConfigSpec, ...] | list[ConfigSpec], why: str) -> None:
    """A gadget binds only with at least one config and a function in every config."""
    if not configs:
        raise ConfigError(f"configs: {why} needs at least one [[configs]] with functions")
    for i, c in enumerate(configs):
        if not c.functions:
            raise ConfigError(f"configs[{i}].functions: {why} needs at least one function "
                              "in every configuration (the kernel refuses to bind)")


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


_LANG = re.compile(r"^0x[0-9a-fA-F]{1,4}$")


def _parse_strings(body: object, names: tuple[str, ...],
                   prefix: tuple[str | int, ...]) -> dict[int, dict[str, str]]:
    """``{manufacturer = ...}`` for 0x409 and ``{"0x407" = {...}}`` for other languages."""
    table = _table(body, _key(*prefix))
    out: dict[int, dict[str, str]] = {}
    for k, v in table.items():
        if isinstance(v, Mapping):
            if not _LANG.match(k) or int(k, 16) == 0:
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
    if not isinstance(label, str) or not CONFIG_LABEL.match(label):
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


_LUN_KEY = re.compile(r"^lun\.([0-9]+)$")


def _parse_function(name: str, body: object) -> FunctionSpec:
    prefix = ("functions", name)
    key = _key(*prefix)
    m = FUNCTION_NAME.match(name)
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

    raw_luns: dict[int, tuple[tuple[str | int, ...], object]] = {}
    for k in list(table):
        lm = _LUN_KEY.match(k)
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

    if ftype is not None:
        if ftype.extra_check is not None:
            ftype.extra_check(attrs, luns, key)
        for a in ftype.attrs:
            if a.required and a.name not in attrs:
                raise ConfigError(f"{_key(*prefix, a.name)}: missing (required)")
    return FunctionSpec(name=name, attrs=attrs, luns=luns)


def _function_attr(ftype: FunctionType | None, name: str, path: tuple[str | int, ...]) -> Attr:
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
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


# ---------------------------------------------------------------- writing back

def spec_to_dict(spec: GadgetSpec, *, binary: str = "hex") -> dict[str, Any]:
    """The spec as plain data in the TOML layout (bytes as hex text), for TOML or JSON."""
    out: dict[str, Any] = {"name": spec.name}
    if spec.udc is not None:
        out["udc"] = spec.udc
    for g in GADGET_ATTRS:
        if g.attr.name in spec.attrs:
            out[g.key] = spec.attrs[g.attr.name]
    if spec.strings:
        out["strings"] = _strings_to_dict(spec.strings)
    if spec.configs:
        out["configs"] = [_config_to_dict(c) for c in spec.configs]
    if spec.functions:
        out["functions"] = {f.name: _function_to_dict(f) for f in spec.functions.values()}
    return out


def _strings_to_dict(strings: Strings) -> dict[str, Any]:
    out: dict[str, Any] = dict(strings.get(LANG_EN_US, {}))
    for lang, table in sorted(strings.items()):
        if lang != LANG_EN_US:
            out[f"0x{lang:04x}"] = dict(table)
    return out


def _config_to_dict(c: ConfigSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"number": c.number}
    if c.label != "c":
        out["label"] = c.label
    for g in CONFIG_ATTRS:
        if g.attr.name in c.attrs:
            out[g.key] = c.attrs[g.attr.name]
    strings = {k: dict(v) for k, v in c.strings.items()}
    en = strings.pop(LANG_EN_US, {})
    if "configuration" in en:
        out["configuration"] = en["configuration"]
    out["functions"] = list(c.functions)
    if strings:
        out["strings"] = {f"0x{lang:04x}": t for lang, t in sorted(strings.items())}
    return out


def _value(v: AttrValue) -> Any:
    return " ".join(f"{b:02x}" for b in v) if isinstance(v, bytes) else v


def _function_to_dict(f: FunctionSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    attrs = dict(f.attrs)
    if f.type == "hid":
        preset = hid.preset_matching(attrs)
        if preset is not None:
            out["preset"] = preset.name
            for k in preset.attrs():
                attrs.pop(k)
    out.update({k: _value(v) for k, v in attrs.items()})
    if f.luns:
        out["lun"] = {str(n): {k: _value(v) for k, v in lun.items()}
                      for n, lun in sorted(f.luns.items())}
    return out


def dump_spec(spec: GadgetSpec) -> str:
    """The spec as TOML text that :func:`loads_spec` reads back to an equal spec."""
    d = spec_to_dict(spec)
    lines: list[str] = []
    scalars = {k: v for k, v in d.items() if k not in ("strings", "configs", "functions")}
    lines += [f"{k} = {_toml(k, v)}" for k, v in scalars.items()]
    if "strings" in d:
        _table_lines(lines, "strings", d["strings"])
    for c in d.get("configs", []):
        lines += ["", "[[configs]]"]
        nested = {k: v for k, v in c.items() if isinstance(v, dict)}
        lines += [f"{k} = {_toml(k, v)}" for k, v in c.items() if k not in nested]
        for k, v in nested.items():
            _table_lines(lines, f"configs.{k}", v)
    for fname, fbody in d.get("functions", {}).items():
        header = f"functions.{_tkey(fname)}"
        luns = fbody.pop("lun", {})
        _table_lines(lines, header, fbody, always=True)
        for n, lbody in luns.items():
            _table_lines(lines, f"{header}.lun.{n}", lbody, always=True)
    return "\n".join(lines).lstrip("\n") + "\n"


_HEX_KEYS = {"id_vendor", "id_product", "bcd_device", "bcd_usb", "device_class",
             "device_subclass", "device_protocol", "bm_attributes", "class", "subclass",
             "protocol"}


def _table_lines(lines: list[str], header: str, body: Mapping[str, Any],
                 always: bool = False) -> None:
    scalars = {k: v for k, v in body.items() if not isinstance(v, Mapping)}
    if scalars or always:
        lines += ["", f"[{header}]"]
        lines += [f"{_tkey(k)} = {_toml(k, v)}" for k, v in scalars.items()]
    for k, v in body.items():
        if isinstance(v, Mapping):
            _table_lines(lines, f"{header}.{_tkey(k)}", v, always=True)


def _tkey(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_str(k)


def _toml(key: str, v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        if key in _HEX_KEYS and v >= 0:
            return f"0x{v:04x}" if key.startswith(("id_", "bcd_")) else f"0x{v:02x}"
        return str(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(key, x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


# Attribute kinds exported for callers that format values (show, JSON).
__all__ = [
    "LANG_EN_US", "UDC_AUTO", "UDC_NONE", "ConfigSpec", "FunctionSpec", "GadgetSpec",
    "Kind", "check_bindable", "dump_spec", "load_spec", "loads_spec", "parse_spec",
    "spec_to_dict",
]
