"""Running a fleet on the lab kernel: devices chosen by identity (``--id``), and the
Prometheus metrics of a usbipa moving with what the tests do.

One set of gadgets and one usbipa serve the whole module (the kernel tier's time is
short): two identical-product gadgets (1d6b:0104) told apart only by their serial
numbers, on usbip-vudc.0 and usbip-vudc.1, a third (1d6b:0105) the usbipa's policy
refuses, on usbip-vudc.2, and a fourth (1d6b:0106) whose serial number the policy
refuses, on usbip-vudc.3.  Each test leaves every vhci port free again.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from labkit import (
    USBIPX,
    Daemon,
    free_tcp_port,
    make_disk,
    mass_storage_gadget,
    reset_usbip,
    usbipx,
    vhci_used_ports,
    vudc_status,
    wait_for,
)

GADGETS = {"usbip-vudc.0": ("fleetA", 0x0104), "usbip-vudc.1": ("fleetB", 0x0104),
           "usbip-vudc.2": ("fleetC", 0x0105), "usbip-vudc.3": ("fleetD", 0x0106)}
"""vUDC -> (gadget name, which is also its serial number; product id)."""
POLICY = """
[[rule]]
action = "deny"
vendor = 0x1d6b
product = 0x0105

[[rule]]                    # 0106 only with another serial number than fleetD's
action = "allow"
vendor = 0x1d6b
product = 0x0106
serial = "not-fleetD"

[[rule]]
action = "deny"
vendor = 0x1d6b
product = 0x0106
"""


@pytest.fixture(autouse=True)
def clean() -> Iterator[None]:
    """Overrides conftest's per-test reset (it would remove the module's gadgets): the
    module fixture resets once, and each test frees the vhci ports it used."""
    yield
    assert vhci_used_ports() == [], "a test left a vhci port attached"


class Fleet:
    def __init__(self, usbipa: Daemon, metrics_port: int) -> None:
        self.usbipa = usbipa
        self.metrics_port = metrics_port

    def usbipx(self, *args: str, check: bool = True):  # type: ignore[no-untyped-def]
        return usbipx("-t", str(self.usbipa.port), *args, check=check)

    def scrape(self) -> dict[str, float]:
        """``name{labels}`` -> value of every sample the usbipa serves now."""
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                      timeout=10).read().decode()
        out = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                name, _, val = line.rpartition(" ")
                out[name] = float(val)
        return out


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    reset_usbip()
    d = tmp_path_factory.mktemp("fleet")
    for udc, (name, product) in GADGETS.items():
        backing = d / f"{name}.img"
        make_disk(backing, 1)
        mass_storage_gadget(name, backing, udc, product=product)
    policy = d / "policy.toml"
    policy.write_text(POLICY)
    metrics_port = free_tcp_port()
    usbipa = _start_usbipa(policy, metrics_port)
    f = Fleet(usbipa, metrics_port)
    wait_for(lambda: _answers(f), 30, 0.05, "the metrics endpoint")
    try:
        yield f
    finally:
        usbipa.stop()
        reset_usbip()


def _start_usbipa(policy: Path, metrics_port: int) -> Daemon:
    port = free_tcp_port()
    return Daemon([USBIPX, "usbipa", "-t", str(port), "--address", "127.0.0.1",
                   "--policy", str(policy), "--metrics", f"127.0.0.1:{metrics_port}"], port)


def _answers(f: Fleet) -> bool:
    try:
        f.scrape()
    except OSError:
        return False
    return True


def imported_serial(timeout: float = 30.0) -> str:
    """The serial number of the one device imported through vhci_hcd, once it has
    enumerated."""
    def serial() -> str | None:
        ports = vhci_used_ports()
        if len(ports) != 1 or ports[0][1] == "0-0":
            return None
        p = Path(f"/sys/bus/usb/devices/{ports[0][1]}/serial")
        return p.read_text().strip() if p.exists() else None

    return wait_for(serial, timeout, 0.05, "the imported device to enumerate")


def test_connect_by_id_exports_the_device_with_that_serial(fleet: Fleet) -> None:
    res = fleet.usbipx("connect", "-r", "127.0.0.1", "-d", "--id", "1d6b:0104:fleetB")
    assert res.stdout.startswith("exported usbip-vudc.1 to 127.0.0.1"), res.stdout
    assert vudc_status("usbip-vudc.1") == "2" and vudc_status("usbip-vudc.0") == "1"
    assert imported_serial() == "fleetB"  # as the application side sees the device
    fleet.usbipx("disconnect", "-r", "127.0.0.1", "-d", "--id", "1d6b:0104:fleetB")
    wait_for(lambda: vhci_used_ports() == [], 15, 0.05, "the port to be free")


def test_an_ambiguous_id_is_one_line_naming_both(fleet: Fleet) -> None:
    res = fleet.usbipx("connect", "-r", "127.0.0.1", "-d", "--id", "1d6b:0104", check=False)
    assert res.returncode == 2
    assert res.stderr == (
        "usbipx: error: --id 1d6b:0104 matches 2 devices: usbip-vudc.0 (serial fleetA), "
        "usbip-vudc.1 (serial fleetB); name one by serial (1d6b:0104:SERIAL) or by bus id "
        "(-b)\n")
    assert vhci_used_ports() == []
    assert vudc_status("usbip-vudc.0") == vudc_status("usbip-vudc.1") == "1"


def test_a_scrape_shows_three_exports_and_one_refusal(fleet: Fleet) -> None:
    ATTACHES = "usbipx_attaches_total"
    REFUSED = 'usbipx_refusals_total{reason="policy"}'
    ACTIVE = 'usbipx_exports_active{peer="127.0.0.1"}'
    before = fleet.scrape()

    def delta(name: str) -> float:
        return fleet.scrape().get(name, 0.0) - before.get(name, 0.0)

    for udc in ("usbip-vudc.0", "usbip-vudc.1"):
        fleet.usbipx("connect", "-r", "127.0.0.1", "-d", "-b", udc)
    assert fleet.scrape()[ACTIVE] == 2
    res = fleet.usbipx("connect", "-r", "127.0.0.1", "-d", "-b", "usbip-vudc.2", check=False)
    assert res.returncode == 1 and "refused" in res.stderr
    for udc in ("usbip-vudc.0", "usbip-vudc.1"):
        fleet.usbipx("disconnect", "-r", "127.0.0.1", "-d", "-b", udc)
    assert fleet.scrape().get(ACTIVE, 0.0) == 0
    fleet.usbipx("connect", "-r", "127.0.0.1", "-d", "-b", "usbip-vudc.0")
    assert fleet.scrape()[ACTIVE] == 1
    fleet.usbipx("disconnect", "-r", "127.0.0.1", "-d", "-b", "usbip-vudc.0")
    assert fleet.scrape().get(ACTIVE, 0.0) == 0
    assert delta(ATTACHES) == 3
    assert delta(REFUSED) == 1
    refusals = {k for k in fleet.scrape() if k.startswith("usbipx_refusals_total{")
                and delta(k)}
    assert refusals == {REFUSED}, refusals  # nothing else was refused
    assert delta("usbipx_link_losses_total") == 0  # every export was withdrawn
    wait_for(lambda: vhci_used_ports() == [], 15, 0.05, "the ports to be free")


def test_a_serial_the_policy_refuses_is_detached_after_the_attach(fleet: Fleet) -> None:
    """The export record has no serial number: usbipa attaches, reads the serial of the
    device that enumerated on the vhci port, and detaches it again."""
    SERIAL = 'usbipx_refusals_total{reason="serial"}'
    before = fleet.scrape()
    fleet.usbipx("connect", "-r", "127.0.0.1", "-d", "-b", "usbip-vudc.3")
    wait_for(lambda: fleet.scrape().get(SERIAL, 0.0) - before.get(SERIAL, 0.0) == 1, 15, 0.1,
             "the serial refusal")
    wait_for(lambda: vhci_used_ports() == [], 15, 0.05, "usbipa to detach the port")
    assert ("from 127.0.0.1: serial: serial number 'fleetD': denied by rule 'deny vendor "
            "1d6b product 0106'; detaching vhci port") in fleet.usbipa.output()
    after = fleet.scrape()
    assert after["usbipx_attaches_total"] - before["usbipx_attaches_total"] == 1
    assert after.get('usbipx_exports_active{peer="127.0.0.1"}', 0.0) == 0
