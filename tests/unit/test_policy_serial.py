"""usbipa policy rules that name a serial number: parsing, the verdict as a function of the
serial, and the check on the device once vhci_hcd has enumerated it (fake kernel).

The export's record has no serial number: usbipa attaches, waits for the device under
the vhci port, reads its sysfs ``serial`` and detaches it if the verdict is a refusal.
In these tests the check runs at once (``background``); the device "enumerates" when the
test creates ``/sys/bus/usb/devices/<local bus id>``.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from fakekernel import VHCI0, FakeKernel

from usbipx import protocol as p
from usbipx.daemon.policy import DeviceRule, Policy, policy_from_dict
from usbipx.daemon.serialcheck import imported_serial
from usbipx.daemon.serving import Outcome, Peer, settle
from usbipx.daemon.usbipa import UsbipaHandler
from usbipx.errors import ConfigError, DeviceNotFound
from usbipx.metrics import Metrics
from usbipx.vhci import PortRecord, VhciDriver

pytestmark = pytest.mark.scenario("vhci_free")

A = Peer("10.0.0.5", 40000)
BOARD = Peer("10.0.0.6", 40001, identity="board-7", transport="tls")
DETACH = f"{VHCI0}/detach"
D = p.UsbDevice("/sys/devices/platform/dummy_hcd.0/usb1/1-1", "1-1", 1, 2, p.Speed.HIGH,
                0x1D6B, 0x0104, 0x0100)


def allow_only(serial: str) -> Policy:
    return Policy(rules=(DeviceRule("allow", 0x1D6B, 0x0104, serial=serial),), default="deny")


# -- the policy ----------------------------------------------------------------------------

def test_parse_a_rule_with_a_serial() -> None:
    pol = policy_from_dict({"default": "deny", "rule": [
        {"action": "allow", "vendor": 0x1D6B, "product": 0x0104, "serial": "A1:b-2"}]})
    assert pol.rules == (DeviceRule("allow", 0x1D6B, 0x0104, serial="A1:b-2"),)
    assert str(pol.rules[0]) == "allow vendor 1d6b product 0104 serial A1:b-2"


@pytest.mark.parametrize("serial", ["", "a b", "x\n", 5, "x" * 127])
def test_bad_serials_in_rules(serial: object) -> None:
    with pytest.raises(ConfigError, match=r"policy: rule 1: serial must be 1 to 126"):
        policy_from_dict({"rule": [{"action": "allow", "serial": serial}]})


def test_the_verdict_depends_on_the_serial() -> None:
    pol = Policy(rules=(DeviceRule("deny", 0x1D6B, serial="BAD"),
                        DeviceRule("allow", 0x1D6B, 0x0104, serial="GOOD"),
                        DeviceRule("allow", 0x0403),
                        DeviceRule("deny", 0x1D6B, serial="LATE")), default="deny")
    assert pol.serials_named(D) == ("BAD", "GOOD", "LATE")
    assert pol.refuse_device(D, serial="GOOD") is None
    assert pol.refuse_device(D, serial="BAD") == "denied by rule 'deny vendor 1d6b serial BAD'"
    assert pol.refuse_device(D, serial="OTHER") == "denied by default policy"
    assert pol.refuse_device(D) == "denied by default policy"  # no serial at all
    ftdi = p.UsbDevice("/x", "1-2", 1, 3, p.Speed.FULL, 0x0403, 0x6001, 0x0100)
    # A rule without a serial decides first: the serial does not matter.
    assert pol.serials_named(ftdi) == ()
    assert Policy(rules=(DeviceRule("allow", 0x1D6B), DeviceRule("deny", serial="X"))
                  ).serials_named(D) == ()


# -- the check on the attached device ------------------------------------------------------



def export(h: UsbipaHandler, socks: list[socket.socket], peer: Peer = A) -> Outcome:
    a, b = socket.socketpair()
    socks.extend((a, b))
    out = h(p.ExportRequest(D), peer)
    return Outcome(settle(out, a.fileno(), "tcp"), undo=out.undo)


def enumerate_as(fs: Any, local_busid: str, serial: str | None) -> None:
    """The device vhci_hcd will show at ``local_busid`` appears in sysfs."""
    fs.create_dir(f"/sys/devices/platform/vhci_hcd.0/usb3/{local_busid}")
    if serial is not None:
        fs.create_file(f"/sys/devices/platform/vhci_hcd.0/usb3/{local_busid}/serial",
                       contents=f"{serial}\n")
    fs.create_symlink(f"/sys/bus/usb/devices/{local_busid}",
                      f"/sys/devices/platform/vhci_hcd.0/usb3/{local_busid}")


def handler(kernel: FakeKernel, policy: Policy, metrics: Metrics | None = None,
            wait: float = 2.0) -> UsbipaHandler:
    return UsbipaHandler(VhciDriver(kernel.sysfs), policy, metrics,
                         background=lambda job: job(), serial_wait=wait)


def test_the_right_serial_stays_attached(kernel: FakeKernel, fs: Any, socks, logs) -> None:
    enumerate_as(fs, "3-1", "GOOD")
    m = Metrics()
    out = export(handler(kernel, allow_only("GOOD"), m), socks)
    assert out.reply == p.ExportReply(p.Status.ST_OK)
    assert not VhciDriver(kernel.sysfs).port(0).free
    assert DETACH not in [w for w, _ in kernel.writes]
    assert any("serial number 'GOOD' admitted" in line for line in logs)
    assert "usbipx_refusals_total{" not in m.text()


@pytest.mark.parametrize(("serial", "detail"), [
    ("OTHER", "serial number 'OTHER': denied by default policy"),
    (None, "serial number None: denied by default policy"),
])
def test_a_wrong_or_missing_serial_is_detached_and_refused(
        kernel: FakeKernel, fs: Any, socks, logs, serial: str | None, detail: str) -> None:
    enumerate_as(fs, "3-1", serial)
    m = Metrics()
    export(handler(kernel, allow_only("GOOD"), m), socks, BOARD)
    assert kernel.writes[-1] == (DETACH, "0")
    assert VhciDriver(kernel.sysfs).port(0).free
    assert (f"refused export of 1-1 (1d6b:0104) from board-7 (10.0.0.6): serial: {detail}; "
            "detaching vhci port 0") in logs
    text = m.text()
    assert 'usbipx_refusals_total{reason="serial"} 1.0' in text
    assert "usbipx_exports_active{" not in text  # detached: no longer active
    assert "usbipx_link_losses_total 0.0" in text  # our own detach is no loss


def test_a_device_that_never_enumerates_is_refused(kernel: FakeKernel, socks, logs) -> None:
    m = Metrics()
    export(handler(kernel, allow_only("GOOD"), m, wait=0.1), socks)
    assert kernel.writes[-1] == (DETACH, "0")
    assert any("serial: its serial number cannot be read: no device enumerated on vhci "
               "port 0 within 0.1 s" in line for line in logs)
    assert 'usbipx_refusals_total{reason="serial"} 1.0' in m.text()


def test_a_deny_rule_with_a_serial(kernel: FakeKernel, fs: Any, socks) -> None:
    """Default allow, one device denied by its serial: others stay, that one goes."""
    enumerate_as(fs, "3-1", "STOLEN")
    pol = Policy(rules=(DeviceRule("deny", 0x1D6B, 0x0104, serial="STOLEN"),))
    export(handler(kernel, pol), socks)
    assert kernel.writes[-1] == (DETACH, "0")


def test_refused_before_attaching_if_no_serial_could_help(kernel: FakeKernel, socks) -> None:
    pol = Policy(rules=(DeviceRule("deny", 0x1D6B, serial="A"),), default="deny")
    out = export(handler(kernel, pol), socks)
    assert out.reply == p.ExportReply(p.Status.ST_NA)
    assert kernel.writes == []


def test_no_serial_rule_no_check(kernel: FakeKernel, socks) -> None:
    ran: list[object] = []
    h = UsbipaHandler(VhciDriver(kernel.sysfs), Policy(), background=ran.append)
    export(h, socks)
    assert ran == [] and not VhciDriver(kernel.sysfs).port(0).free


def test_a_port_replaced_meanwhile_is_left_alone(kernel: FakeKernel, fs: Any, socks) -> None:
    """By the time the serial is known the port leads elsewhere: not ours to detach."""
    jobs: list[Any] = []
    enumerate_as(fs, "3-1", "OTHER")
    h = UsbipaHandler(VhciDriver(kernel.sysfs), allow_only("GOOD"), background=jobs.append,
                      serial_wait=1.0)
    export(h, socks)
    kernel.vhci_unplug(0)
    kernel.vhci_plug(0)  # another process's device on the same port, with its record
    VhciDriver(kernel.sysfs).write_record(0, PortRecord("10.9.9.9", "3240", "5-1"))
    (job,) = jobs
    job()
    assert DETACH not in [w for w, _ in kernel.writes]
    assert not VhciDriver(kernel.sysfs).port(0).free


# -- imported_serial itself ----------------------------------------------------------------

def test_imported_serial_waits_for_the_device(kernel: FakeKernel, fs: Any) -> None:
    kernel.vhci_plug(0)
    vhci = VhciDriver(kernel.sysfs)
    polls: list[float] = []

    def sleep(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 3:
            enumerate_as(fs, "3-1", "S1")

    assert imported_serial(vhci, 0, 5.0, clock=lambda: 0.0, sleep=sleep) == "S1"
    assert len(polls) == 3 and all(s <= 0.05 for s in polls)


def test_imported_serial_of_a_free_port_or_a_bad_bus_id(kernel: FakeKernel) -> None:
    vhci = VhciDriver(kernel.sysfs)
    with pytest.raises(DeviceNotFound, match="was freed"):
        imported_serial(vhci, 0, 1.0)
    kernel.vhci_plug(0)
    kernel.vhci_port(0).local_busid = "../../x"  # never used as a path
    kernel.render_vhci_status(0)
    times = iter([0.0, 0.0, 2.0])
    with pytest.raises(DeviceNotFound, match="no device enumerated"):
        imported_serial(vhci, 0, 1.0, clock=lambda: next(times), sleep=lambda s: None)
