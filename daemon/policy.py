"""What a usbipa accepts: peer networks and identities, device rules, per-peer limits.

The policy file is TOML::

    allow = ["10.0.0.0/8", "fd00::/8"]   # peer addresses allowed to connect (default: any)
    identities = ["board-*"]             # TLS peers allowed to export (default: any
                                         #   certificate the CA signed)
    max_devices_per_peer = 4             # default: no limit
    default = "allow"                    # device verdict when no rule matches

    [[rule]]                             # first matching rule wins
    action = "deny"
    vendor = 0x0403
    product = 0x6001

    [[rule]]
    action = "allow"
    identity = "lab-*"                   # this rule is for these TLS peers only
    class = 0x03

    [[rule]]
    action = "deny"
    class = 0x09                         # bDeviceClass (hubs)

    [[rule]]
    action = "allow"
    vendor = 0x1d6b
    product = 0x0104
    serial = "A1B2C3"                    # only the device with this serial number

    [[limit]]                            # per-identity limits, first match wins
    identity = "kiosk-*"
    max_devices = 1

A rule matches when every field it gives (``vendor``, ``product``,
``class``, ``identity``, ``serial``) matches.  An export's record carries no
serial number: a rule naming one can only be checked once the device has
enumerated here, so when such a rule could decide, usbipa attaches the device,
reads its serial number from sysfs and detaches it again if the verdict for
that serial is a refusal (:mod:`usbipx.daemon.serialcheck`).  ``class`` is the device class of the
exported record: an export carries no interface records, so interface
classes cannot be matched.  ``identity`` is a certificate identity pattern
(``*`` stands for part of one label, see :func:`usbipx.identity.identity_matches`);
a rule or limit naming one never applies to a plain TCP peer, who has no
identity.  Over TLS a peer *is* its identity: limits count per identity, and
two boards behind one NAT address are two peers.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from usbipx.deviceid import MAX_SERIAL, is_serial
from usbipx.errors import ConfigError
from usbipx.identity import identity_matches, is_identity_pattern
from usbipx.tomlfile import read_toml, toml_int
from usbipx.usbdevice import UsbDevice

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Action = Literal["allow", "deny"]


def parse_network(text: str) -> Network:
    """``10.0.0.0/8`` or a single address; :class:`ConfigError` if neither."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ConfigError(f"bad network {text!r}: {exc}") from None


def _for(pattern: str | None, identity: str | None) -> bool:
    """Whether a rule for ``pattern`` (None: everyone) applies to ``identity``."""
    return pattern is None or (identity is not None and identity_matches(pattern, identity))


@dataclass(frozen=True)
class DeviceRule:
    """Allow or deny devices matching all the given ids (for some identities only)."""

    action: Action
    vendor: int | None = None
    product: int | None = None
    device_class: int | None = None
    identity: str | None = None
    serial: str | None = None

    def matches_record(self, dev: UsbDevice, identity: str | None = None) -> bool:
        """Whether the rule matches what the export's record says (all but the serial)."""
        return ((self.vendor is None or self.vendor == dev.id_vendor)
                and (self.product is None or self.product == dev.id_product)
                and (self.device_class is None or self.device_class == dev.device_class)
                and _for(self.identity, identity))

    def matches(self, dev: UsbDevice, identity: str | None = None,
                serial: str | None = None) -> bool:
        """Whether the rule matches the device (``serial``: its serial number, if known)."""
        return (self.matches_record(dev, identity)
                and (self.serial is None or serial == self.serial))

    def __str__(self) -> str:
        parts = []
        if self.vendor is not None:
            parts.append(f"vendor {self.vendor:04x}")
        if self.product is not None:
            parts.append(f"product {self.product:04x}")
        if self.device_class is not None:
            parts.append(f"class {self.device_class:02x}")
        if self.serial is not None:
            parts.append(f"serial {self.serial}")
        who = f" for {self.identity}" if self.identity is not None else ""
        return f"{self.action} {' '.join(parts) or 'any'}{who}"


@dataclass(frozen=True)
class Limit:
    """At most ``max_devices`` exported by each peer whose identity matches."""

    identity: str
    max_devices: int


@dataclass(frozen=True)
class Policy:
    """The usbipa's admission rules; the default admits everything."""

    networks: tuple[Network, ...] = ()
    rules: tuple[DeviceRule, ...] = ()
    default: Action = "allow"
    max_devices_per_peer: int | None = None
    identities: tuple[str, ...] = ()
    limits: tuple[Limit, ...] = ()

    def refuse_peer(self, host: str) -> str | None:
        """Why ``host`` may not export, or None if it may."""
        if not self.networks:
            return None
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return f"peer address {host!r} is not an IP address"
        if any(addr in net for net in self.networks if net.version == addr.version):
            return None
        return "peer is outside the allowed networks"

    def refuse_identity(self, identity: str) -> str | None:
        """Why the TLS peer ``identity`` may not export at all, or None if it may."""
        if not self.identities or any(identity_matches(p, identity) for p in self.identities):
            return None
        return f"identity {identity} is not among the allowed identities"

    def refuse_device(self, dev: UsbDevice, identity: str | None = None,
                      serial: str | None = None) -> str | None:
        """Why ``dev`` (with serial number ``serial``, None: none or not known) may not be
        attached for ``identity``, or None if it may."""
        for rule in self.rules:
            if rule.matches(dev, identity, serial):
                return None if rule.action == "allow" else f"denied by rule '{rule}'"
        return None if self.default == "allow" else "denied by default policy"

    def serials_named(self, dev: UsbDevice, identity: str | None = None) -> tuple[str, ...]:
        """The serial numbers of the rules that may decide on ``dev`` before a rule
        without one does: if there are any, the verdict depends on the serial number."""
        named = []
        for rule in self.rules:
            if rule.matches_record(dev, identity):
                if rule.serial is None:
                    break
                named.append(rule.serial)
        return tuple(named)

    def refuse_count(self, held: int, identity: str | None = None) -> str | None:
        """Why a peer already holding ``held`` devices may not add one."""
        limit = self.max_devices_per_peer
        for lim in self.limits:
            if _for(lim.identity, identity):
                limit = lim.max_devices
                break
        if limit is not None and held >= limit:
            return f"peer already has {held} devices (limit {limit})"
        return None

    def with_networks(self, extra: list[str]) -> Policy:
        """This policy with more allowed networks (``--allow``)."""
        if not extra:
            return self
        return replace(self, networks=self.networks + tuple(parse_network(n) for n in extra))


MAX_LIMIT = 65535
"""Largest ``max_devices_per_peer`` (vhci_hcd has at most 8 x 30 ports anyway)."""


def _int_field(rule: dict[str, Any], key: str, bits: int, where: str) -> int | None:
    if key not in rule:
        return None
    return toml_int(rule[key], f"{where}: {key}", 0, (1 << bits) - 1)


def policy_from_dict(data: dict[str, Any], source: str = "policy") -> Policy:
    """Validate a parsed policy document completely; :class:`ConfigError` names the key."""
    known = {"allow", "identities", "max_devices_per_peer", "default", "rule", "limit"}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
    allow = data.get("allow", [])
    if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
        raise ConfigError(f"{source}: allow must be a list of CIDR strings")
    default = data.get("default", "allow")
    if default not in ("allow", "deny"):
        raise ConfigError(f"{source}: default must be 'allow' or 'deny', got {default!r}")
    limit = data.get("max_devices_per_peer")
    if limit is not None:
        limit = toml_int(limit, f"{source}: max_devices_per_peer", 1, MAX_LIMIT)
    rules = []
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise ConfigError(f"{source}: rule must be an array of tables ([[rule]])")
    for n, r in enumerate(raw_rules):
        where = f"{source}: rule {n + 1}"
        if not isinstance(r, dict):
            raise ConfigError(f"{where}: must be a table")
        bad = set(r) - {"action", "vendor", "product", "class", "identity", "serial"}
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(bad))}")
        action = r.get("action")
        if action not in ("allow", "deny"):
            raise ConfigError(f"{where}: action must be 'allow' or 'deny'")
        serial = r.get("serial")
        if serial is not None and (not isinstance(serial, str) or not is_serial(serial)):
            raise ConfigError(f"{where}: serial must be 1 to {MAX_SERIAL} printable "
                              "characters without spaces")
        rules.append(DeviceRule(action, _int_field(r, "vendor", 16, where),
                                _int_field(r, "product", 16, where),
                                _int_field(r, "class", 8, where),
                                _pattern(r.get("identity"), f"{where}: identity"), serial))
    identities = data.get("identities", [])
    if not isinstance(identities, list):
        raise ConfigError(f"{source}: identities must be a list of identity patterns")
    patterns = tuple(_pattern(i, f"{source}: identities") or "" for i in identities)
    limits = []
    raw_limits = data.get("limit", [])
    if not isinstance(raw_limits, list):
        raise ConfigError(f"{source}: limit must be an array of tables ([[limit]])")
    for n, lim in enumerate(raw_limits):
        where = f"{source}: limit {n + 1}"
        if not isinstance(lim, dict) or set(lim) != {"identity", "max_devices"}:
            raise ConfigError(f"{where}: needs exactly identity and max_devices")
        limits.append(Limit(_pattern(lim["identity"], f"{where}: identity") or "",
                            toml_int(lim["max_devices"], f"{where}: max_devices", 0,
                                     MAX_LIMIT)))
    try:
        networks = tuple(parse_network(a) for a in allow)
    except ConfigError as exc:
        raise ConfigError(f"{source}: allow: {exc}") from None
    return Policy(networks, tuple(rules), default, limit, patterns, tuple(limits))


def _pattern(value: object, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not is_identity_pattern(value):
        raise ConfigError(f"{where}: {value!r} is not an identity pattern "
                          "(letters, digits, . _ : @ / + = - and *)")
    return value


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file."""
    data = read_toml(path, "policy")
    return policy_from_dict(data, str(path))
