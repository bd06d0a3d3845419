"""The usbipa policy: the TOML file, validation that names the culprit, and the verdicts."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usbipx.daemon.policy import DeviceRule, Policy, load_policy, parse_network, policy_from_dict
from usbipx.errors import ConfigError, ValidationError
from usbipx.usbdevice import Speed, UsbDevice

VALID = """\
allow = ["10.0.0.0/8", "fd00::/8", "192.0.2.7"]
max_devices_per_peer = 4
default = "deny"

[[rule]]
action = "deny"
vendor = 0x0403
product = 0x6001

[[rule]]
action = "deny"
class = 0x09

[[rule]]
action = "allow"
vendor = 0x0403
"""


def dev(vendor: int = 0x1D6B, product: int = 0x0104, dclass: int = 0) -> UsbDevice:
    return UsbDevice("/sys/devices/x/1-1", "1-1", 1, 2, Speed.HIGH, vendor, product, 0x100,
                     device_class=dclass)


def write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "policy.toml"
    f.write_text(text)
    return f


# -- the file -------------------------------------------------------------------------

def test_valid_file(tmp_path: Path) -> None:
    pol = load_policy(write(tmp_path, VALID))
    assert pol == Policy(
        networks=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"),
                  ipaddress.ip_network("192.0.2.7/32")),
        rules=(DeviceRule("deny", 0x0403, 0x6001), DeviceRule("deny", device_class=9),
               DeviceRule("allow", 0x0403)),
        default="deny",
        max_devices_per_peer=4,
    )
    assert [str(r) for r in pol.rules] == ["deny vendor 0403 product 6001", "deny class 09",
                                           "allow vendor 0403"]


def test_empty_file_admits_everything(tmp_path: Path) -> None:
    pol = load_policy(write(tmp_path, ""))
    assert pol == Policy()
    assert pol.refuse_peer("203.0.113.9") is None
    assert pol.refuse_device(dev(dclass=9)) is None
    assert pol.refuse_count(10_000) is None


def test_config_error_is_a_validation_error_with_exit_code_2() -> None:
    assert issubclass(ConfigError, ValidationError)
    assert ConfigError("x").exit_code == 2


@pytest.mark.parametrize("text,names", [
    ('allow = "10.0.0.0/8"', ["allow"]),
    ("allow = [10]", ["allow"]),
    ('allow = ["10.0.0.0/33"]', ["allow", "10.0.0.0/33"]),
    ('allow = ["not-a-net"]', ["allow", "not-a-net"]),
    ('allow = ["10.0.0.0/8", "fd00::/129"]', ["allow", "fd00::/129"]),
    ('default = "maybe"', ["default", "maybe"]),
    ("default = 1", ["default"]),
    ("max_devices_per_peer = 0", ["max_devices_per_peer"]),
    ("max_devices_per_peer = -1", ["max_devices_per_peer"]),
    ('max_devices_per_peer = "4"', ["max_devices_per_peer"]),
    ("max_devices_per_peer = true", ["max_devices_per_peer"]),
    ("max_devices_per_peer = 1.5", ["max_devices_per_peer"]),
    ("max_devices_per_peer = 65536", ["max_devices_per_peer", "1..65535"]),
    ("maxdevices = 3", ["maxdevices"]),
    ('[rule]\naction = "deny"', ["rule"]),
    ('rule = ["deny"]', ["rule 1", "table"]),
    ('[[rule]]\nvendor = 1', ["rule 1", "action"]),
    ('[[rule]]\naction = "block"', ["rule 1", "action"]),
    ('[[rule]]\naction = "deny"\n[[rule]]\naction = "deny"\nvendr = 1', ["rule 2", "vendr"]),
    ('[[rule]]\naction = "deny"\nvendor = 0x10000', ["rule 1", "vendor"]),
    ('[[rule]]\naction = "deny"\nvendor = -1', ["rule 1", "vendor"]),
    ('[[rule]]\naction = "deny"\nproduct = "0x6001"', ["rule 1", "product"]),
    ('[[rule]]\naction = "deny"\nproduct = true', ["rule 1", "product"]),
    ('[[rule]]\naction = "deny"\nclass = 256', ["rule 1", "class"]),
    ('[[rule]]\naction = "deny"\ninterface_class = 8', ["rule 1", "interface_class"]),
])
def test_invalid_file_names_the_key(tmp_path: Path, text: str, names: list[str]) -> None:
    f = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_policy(f)
    msg = str(info.value)
    assert msg.startswith(f"{f}: "), msg  # the file is named
    for name in names:
        assert name in msg, msg
    assert "\n" not in msg


def test_toml_syntax_error(tmp_path: Path) -> None:
    f = write(tmp_path, "allow = [\n")
    with pytest.raises(ConfigError, match=str(f)):
        load_policy(f)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read policy .*nope\.toml"):
        load_policy(tmp_path / "nope.toml")


def test_dict_source_is_named() -> None:
    with pytest.raises(ConfigError, match=r"^cli: unknown key"):
        policy_from_dict({"nope": 1}, "cli")


# -- networks -------------------------------------------------------------------------

def test_parse_network() -> None:
    assert parse_network("10.1.2.3/8") == ipaddress.ip_network("10.0.0.0/8")  # host bits ok
    assert parse_network("2001:db8::1") == ipaddress.ip_network("2001:db8::1/128")
    with pytest.raises(ConfigError, match="bad network 'nope'"):
        parse_network("nope")


@pytest.mark.parametrize("host,refused", [
    ("10.200.0.1", False),
    ("192.168.1.1", False),
    ("192.168.2.1", True),
    ("fd12:3456::1", False),
    ("fe80::1", True),
    ("::ffff:10.0.0.1", True),  # the server strips the mapped prefix before asking
    ("peer.example", True),
])
def test_refuse_peer(host: str, refused: bool) -> None:
    pol = Policy(networks=(ipaddress.ip_network("10.0.0.0/8"),
                           ipaddress.ip_network("192.168.1.0/24"),
                           ipaddress.ip_network("fd00::/8")))
    reason = pol.refuse_peer(host)
    assert (reason is not None) == refused, reason
    if host == "peer.example":
        assert reason == "peer address 'peer.example' is not an IP address"


def test_no_networks_admits_any_peer() -> None:
    assert Policy().refuse_peer("203.0.113.1") is None
    assert Policy().refuse_peer("2001:db8::1") is None


def test_with_networks() -> None:
    base = Policy(networks=(ipaddress.ip_network("10.0.0.0/8"),), max_devices_per_peer=2,
                  default="deny", rules=(DeviceRule("allow", 1),))
    assert base.with_networks([]) is base
    more = base.with_networks(["192.0.2.0/24", "2001:db8::/32"])
    assert more.networks == (*base.networks, ipaddress.ip_network("192.0.2.0/24"),
                             ipaddress.ip_network("2001:db8::/32"))
    assert (more.rules, more.default, more.max_devices_per_peer) == (base.rules, "deny", 2)
    assert more.refuse_peer("192.0.2.9") is None
    assert more.refuse_peer("2001:db8::5") is None
    assert more.refuse_peer("198.51.100.1") is not None
    with pytest.raises(ConfigError, match=r"bad network '300\.0\.0\.0/8'"):
        base.with_networks(["300.0.0.0/8"])
    # --allow on a policy without networks restricts it to those networks.
    assert Policy().with_networks(["127.0.0.1"]).refuse_peer("127.0.0.2") is not None


ipv4_nets = st.builds(lambda a, n: ipaddress.IPv4Network((a, n), strict=False),
                      st.integers(0, 2**32 - 1), st.integers(0, 32))
ipv6_nets = st.builds(lambda a, n: ipaddress.IPv6Network((a, n), strict=False),
                      st.integers(0, 2**128 - 1), st.integers(0, 128))


@settings(max_examples=60, deadline=None)
@given(nets=st.lists(st.one_of(ipv4_nets, ipv6_nets), min_size=1, max_size=4),
       addr=st.one_of(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
                      st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)))
def test_refuse_peer_is_membership(nets: list[Any], addr: Any) -> None:
    pol = policy_from_dict({"allow": [str(n) for n in nets]})
    assert pol.networks == tuple(nets)
    inside = any(addr in n for n in nets if n.version == addr.version)
    assert (pol.refuse_peer(str(addr)) is None) == inside
    # Every network admits its own first and last address.
    for n in nets:
        assert pol.refuse_peer(str(n.network_address)) is None
        assert pol.refuse_peer(str(n.broadcast_address)) is None


# -- device rules -----------------------------------------------------------------------

def test_first_matching_rule_wins() -> None:
    pol = Policy(rules=(DeviceRule("allow", 0x0403, 0x6001),
                        DeviceRule("deny", 0x0403),
                        DeviceRule("allow", device_class=9)),
                 default="deny")
    assert pol.refuse_device(dev(0x0403, 0x6001)) is None
    assert pol.refuse_device(dev(0x0403, 0x6010)) == "denied by rule 'deny vendor 0403'"
    assert pol.refuse_device(dev(0x0403, 0x6001, dclass=9)) is None  # rule 1 before rule 3
    assert pol.refuse_device(dev(0x0403, 0x6010, dclass=9)) is not None  # rule 2 before 3
    assert pol.refuse_device(dev(0x1234, 1, dclass=9)) is None
    assert pol.refuse_device(dev(0x1234, 1)) == "denied by default policy"


def test_rule_without_ids_matches_everything() -> None:
    rule = DeviceRule("deny")
    assert str(rule) == "deny any"
    assert Policy(rules=(rule,)).refuse_device(dev()) == "denied by rule 'deny any'"


rules = st.builds(DeviceRule, st.sampled_from(["allow", "deny"]),
                  st.none() | st.integers(0, 3), st.none() | st.integers(0, 3),
                  st.none() | st.integers(0, 3))
devices = st.builds(dev, st.integers(0, 3), st.integers(0, 3), st.integers(0, 3))


@settings(max_examples=100, deadline=None)
@given(rs=st.lists(rules, max_size=6), d=devices, default=st.sampled_from(["allow", "deny"]))
def test_verdict_is_the_first_match_or_the_default(rs: list[DeviceRule], d: UsbDevice,
                                                   default: str) -> None:
    data: dict[str, Any] = {"default": default, "rule": []}
    for r in rs:
        entry: dict[str, Any] = {"action": r.action}
        for key, value in (("vendor", r.vendor), ("product", r.product),
                           ("class", r.device_class)):
            if value is not None:
                entry[key] = value
        data["rule"].append(entry)
    pol = policy_from_dict(data)
    assert pol.rules == tuple(rs)
    verdict = pol.refuse_device(d)
    for r in rs:  # the rules a device matches, in order
        fields = ((r.vendor, d.id_vendor), (r.product, d.id_product),
                  (r.device_class, d.device_class))
        if all(want is None or want == have for want, have in fields):
            assert (verdict is None) == (r.action == "allow")
            if r.action == "deny":
                assert verdict == f"denied by rule '{r}'"
            return
    assert (verdict is None) == (default == "allow")


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(["vendor", "product", "class"]),
       value=st.one_of(st.integers(max_value=-1), st.integers(min_value=0x10000),
                       st.text(max_size=4), st.booleans(), st.floats(allow_nan=False)),
       n=st.integers(0, 3))
def test_any_bad_id_names_rule_and_key(key: str, value: Any, n: int) -> None:
    good = [{"action": "allow"}] * n
    with pytest.raises(ConfigError) as info:
        policy_from_dict({"rule": [*good, {"action": "deny", key: value}]}, "p.toml")
    assert str(info.value).startswith(f"p.toml: rule {n + 1}: {key} must be an integer")


# -- per-peer limit -----------------------------------------------------------------------

def test_refuse_count() -> None:
    pol = Policy(max_devices_per_peer=2)
    assert pol.refuse_count(0) is None
    assert pol.refuse_count(1) is None
    assert pol.refuse_count(2) == "peer already has 2 devices (limit 2)"
