"""Microsoft OS descriptors: a gadget's ``os_desc/`` and its functions' ``interface.<name>/``.

Windows asks a new device for string descriptor 0xEE; a device that answers
with the signature ``MSFT100`` and a vendor code is then asked, with that
vendor code as bRequest, which compatible id each interface has (``RNDIS``,
``WINUSB`` ...) and installs the matching in-box driver.  libcomposite serves
both when ``os_desc/use`` is 1 and ``os_desc/`` links to the configuration
whose interfaces carry them.  In a spec::

    [os_desc]
    use = true                     # default true
    b_vendor_code = 0xcd           # required: the bRequest Windows will use
    qw_sign = "MSFT100"            # default "MSFT100", the only one Windows knows
    config = 1                     # default (with use): the first [[configs]]

    [functions."rndis.usb0".os_desc.interface.rndis]
    compatible_id = "RNDIS"
    sub_compatible_id = "5162001"

What the kernel does (Linux 6.1, seen on the lab kernel):

* ``use``, ``b_vendor_code`` and ``qw_sign`` are taken when the gadget binds:
  writes while bound are accepted but change nothing until the next bind, so a
  plan unbinds first (:mod:`usbipx.gadget.plan`).  Compatible ids are served
  as they are, but a host asks for them only when it enumerates: a plan
  changes them as any function attribute, unlinked, and binds again;
* ``b_vendor_code`` is a C char: 0xcd reads back ``0xffffffcd``;
* ``qw_sign`` takes at most 7 bytes and keeps the rest of the old value ("AB"
  over "MSFT100" reads "ABFT100"; a lone newline is a write of 0 bytes), so a
  spec gives exactly 7 ASCII characters (and a rollback cannot take a
  signature back to never written: the kernel takes no empty one);
* ``os_desc/`` links to one config (a second link is EBUSY); a config it links
  to can't be removed (EBUSY); removing the link unbinds a bound gadget;
* ``compatible_id`` and ``sub_compatible_id`` are 8 raw bytes each, shown
  NUL-padded without a newline; a shorter write replaces only its length, so
  they are written NUL-padded to 8 (:attr:`~usbipx.gadget.attrs.Kind.PADDED`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from usbipx.errors import ConfigError
from usbipx.gadget.attrs import Attr, AttrValue, Kind, coerce
from usbipx.gadget.functions import FunctionType

QW_SIGN = "MSFT100"
# Names that end up in configfs paths; always used with fullmatch.
INTERFACE_NAME = re.compile(r"[A-Za-z0-9_]{1,32}")
INTERFACE_DIR = re.compile(r"interface\.([A-Za-z0-9_]{1,32})")
_QW_SIGN = re.compile(r"[\x21-\x7e]{7}")
# Microsoft's compatible ids: upper-case letters, digits and underscore, 8 bytes at most.
_COMPAT_ID = re.compile(r"[A-Z0-9_]{0,8}")


def _check_qw_sign(value: AttrValue, key: str) -> None:
    if not isinstance(value, str) or _QW_SIGN.fullmatch(value) is None:
        raise ConfigError(f"{key}: {value!r} is not 7 printable ASCII characters (Windows "
                          f"expects {QW_SIGN!r}; the kernel keeps the tail of a shorter one)")


def _check_compat_id(value: AttrValue, key: str) -> None:
    if not isinstance(value, str) or _COMPAT_ID.fullmatch(value) is None:
        raise ConfigError(f"{key}: {value!r} is not a compatible id (at most 8 of A-Z, 0-9 "
                          "and _, e.g. \"RNDIS\" or \"WINUSB\")")


USE = Attr("use", Kind.BOOL, default=False)
B_VENDOR_CODE = Attr("b_vendor_code", Kind.CHAR8, default=0)
QW_SIGN_ATTR = Attr("qw_sign", Kind.STR, max_len=7, check=_check_qw_sign)
COMPATIBLE_ID = Attr("compatible_id", Kind.PADDED, default="", max_len=8,
                     check=_check_compat_id)
SUB_COMPATIBLE_ID = Attr("sub_compatible_id", Kind.PADDED, default="", max_len=8,
                         check=_check_compat_id)
INTERFACE_ATTRS = (COMPATIBLE_ID, SUB_COMPATIBLE_ID)


@dataclass(frozen=True)
class InterfaceOsDesc:
    """A function interface's ``os_desc/interface.<name>/``: its compatible ids."""

    compatible_id: str = ""
    sub_compatible_id: str = ""

    def values(self) -> dict[str, str]:
        """By configfs attribute name."""
        return {"compatible_id": self.compatible_id, "sub_compatible_id": self.sub_compatible_id}


@dataclass(frozen=True)
class OsDescSpec:
    """The gadget's ``os_desc/``: whether it answers Windows, how, and in which config.

    ``qw_sign`` None: not set (a live gadget whose signature was never
    written); left as it is.  ``config`` is the number of the configuration
    ``os_desc/`` links to (None: no link).  ``link`` is the name of that link
    in a live gadget (another tool may name it otherwise); empty means named
    after the config, as usbipx makes it.
    """

    use: bool = True
    b_vendor_code: int = 0
    qw_sign: str | None = QW_SIGN
    config: int | None = None
    link: str = field(default="", compare=False)

    def attrs(self) -> list[tuple[Attr, AttrValue]]:
        """(attribute, value) to write, in order: ``use`` last, once the rest is set."""
        out: list[tuple[Attr, AttrValue]] = [(B_VENDOR_CODE, self.b_vendor_code)]
        if self.qw_sign is not None:
            out.append((QW_SIGN_ATTR, self.qw_sign))
        out.append((USE, self.use))
        return out


# ---------------------------------------------------------------- parsing

def parse_os_desc(body: object, configs: Sequence[int]) -> OsDescSpec:
    """The ``[os_desc]`` table; ``configs`` are the numbers of the spec's [[configs]]."""
    if not isinstance(body, Mapping):
        raise ConfigError(f"os_desc: expected a table, got {body!r}")
    known = ("use", "b_vendor_code", "qw_sign", "config")
    for k in body:
        if k not in known:
            raise ConfigError(f"os_desc.{_name(k)}: unknown key (known: {', '.join(known)})")
    use = coerce(USE, body.get("use", True), "os_desc.use")
    if "b_vendor_code" not in body:
        raise ConfigError("os_desc.b_vendor_code: missing (the bRequest Windows sends to ask "
                          "for the OS feature descriptors, 0x00..0xff)")
    code = coerce(B_VENDOR_CODE, body["b_vendor_code"], "os_desc.b_vendor_code")
    qw_sign = coerce(QW_SIGN_ATTR, body.get("qw_sign", QW_SIGN), "os_desc.qw_sign")
    config = body.get("config")
    if config is None:
        if use and not configs:
            raise ConfigError("os_desc: use = true needs a [[configs]] to carry the OS "
                              "descriptors (os_desc.config)")
        config = configs[0] if use else None
    elif isinstance(config, bool) or not isinstance(config, int) or config not in configs:
        numbers = ", ".join(map(str, configs)) or "none"
        raise ConfigError(f"os_desc.config: {config!r} is not the number of one of the "
                          f"[[configs]] ({numbers})")
    assert isinstance(use, bool) and isinstance(code, int) and isinstance(qw_sign, str)
    return OsDescSpec(use=use, b_vendor_code=code, qw_sign=qw_sign, config=config)


def parse_interfaces(ftype: FunctionType | None, body: object,
                     key: str) -> dict[str, InterfaceOsDesc]:
    """A function's ``os_desc.interface.<name>`` tables; ``key`` names the function."""
    where = f"{key}.os_desc"
    if not isinstance(body, Mapping):
        raise ConfigError(f"{where}: expected a table, got {body!r}")
    for k in body:
        if k != "interface":
            raise ConfigError(f"{where}.{_name(k)}: unknown key (known: interface)")
    interfaces = body.get("interface", {})
    if not isinstance(interfaces, Mapping):
        raise ConfigError(f"{where}.interface: expected a table, got {interfaces!r}")
    out: dict[str, InterfaceOsDesc] = {}
    for name, ibody in interfaces.items():
        ikey = f"{where}.interface.{_name(name)}"
        if INTERFACE_NAME.fullmatch(name) is None:
            raise ConfigError(f"{ikey}: not an interface name (letters, digits and _)")
        if ftype is not None and name not in ftype.os_desc_interfaces:
            if ftype.os_desc_interfaces:
                known = ", ".join(ftype.os_desc_interfaces)
                raise ConfigError(f"{ikey}: {ftype.name} names its interface "
                                  f"os_desc/interface.{known}, not interface.{name}")
            raise ConfigError(f"{ikey}: {ftype.name} has no OS descriptor interface "
                              "(rndis and ncm have)")
        if not isinstance(ibody, Mapping):
            raise ConfigError(f"{ikey}: expected a table, got {ibody!r}")
        values: dict[str, str] = {}
        for k, v in ibody.items():
            attr = next((a for a in INTERFACE_ATTRS if a.name == k), None)
            if attr is None:
                raise ConfigError(f"{ikey}.{_name(k)}: unknown key (known: compatible_id, "
                                  "sub_compatible_id)")
            values[k] = str(coerce(attr, v, f"{ikey}.{k}"))
        out[name] = InterfaceOsDesc(**values)
    return out


def _name(k: object) -> str:
    s = str(k)
    return s if re.fullmatch(r"[A-Za-z0-9_-]+", s) else json.dumps(s, ensure_ascii=False)


__all__ = ["B_VENDOR_CODE", "COMPATIBLE_ID", "INTERFACE_ATTRS", "INTERFACE_DIR",
           "INTERFACE_NAME", "QW_SIGN", "QW_SIGN_ATTR", "SUB_COMPATIBLE_ID", "USE",
           "InterfaceOsDesc", "OsDescSpec", "parse_interfaces", "parse_os_desc"]
