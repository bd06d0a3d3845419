"""Gadget specs written back as TOML (``gadget save``) or plain data (``--json``).

:func:`dump_spec` writes the format :mod:`usbipx.gadget.spec` reads, so that
``loads_spec(dump_spec(spec)) == spec``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from usbipx.gadget import hid
from usbipx.gadget.attrs import AttrValue
from usbipx.gadget.functions import CONFIG_ATTRS, GADGET_ATTRS
from usbipx.gadget.spec import LANG_EN_US, ConfigSpec, FunctionSpec, GadgetSpec, Strings


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
    if spec.os_desc is not None:
        od = spec.os_desc
        out["os_desc"] = {"use": od.use, "b_vendor_code": od.b_vendor_code}
        if od.qw_sign is not None:
            out["os_desc"]["qw_sign"] = od.qw_sign
        if od.config is not None:
            out["os_desc"]["config"] = od.config
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
    if f.os_desc:
        out["os_desc"] = {"interface": {n: i.values() for n, i in f.os_desc.items()}}
    return out


def dump_spec(spec: GadgetSpec) -> str:
    """The spec as TOML text that :func:`loads_spec` reads back to an equal spec."""
    d = spec_to_dict(spec)
    lines: list[str] = []
    tables = ("strings", "os_desc", "configs", "functions")
    scalars = {k: v for k, v in d.items() if k not in tables}
    lines += [f"{k} = {_toml(k, v)}" for k, v in scalars.items()]
    if "strings" in d:
        _table_lines(lines, "strings", d["strings"])
    if "os_desc" in d:
        _table_lines(lines, "os_desc", d["os_desc"])
    for c in d.get("configs", []):
        lines += ["", "[[configs]]"]
        nested = {k: v for k, v in c.items() if isinstance(v, dict)}
        lines += [f"{k} = {_toml(k, v)}" for k, v in c.items() if k not in nested]
        for k, v in nested.items():
            _table_lines(lines, f"configs.{k}", v)
    for fname, fbody in d.get("functions", {}).items():
        header = f"functions.{_tkey(fname)}"
        luns = fbody.pop("lun", {})
        interfaces = fbody.pop("os_desc", {}).get("interface", {})
        _table_lines(lines, header, fbody, always=True)
        for n, lbody in luns.items():
            _table_lines(lines, f"{header}.lun.{n}", lbody, always=True)
        for n, ibody in interfaces.items():
            _table_lines(lines, f"{header}.os_desc.interface.{_tkey(n)}", ibody, always=True)
    return "\n".join(lines).lstrip("\n") + "\n"


_HEX_KEYS = {"id_vendor", "id_product", "bcd_device", "bcd_usb", "device_class",
             "device_subclass", "device_protocol", "bm_attributes", "class", "subclass",
             "protocol", "b_vendor_code"}


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


__all__ = ["dump_spec", "spec_to_dict"]
