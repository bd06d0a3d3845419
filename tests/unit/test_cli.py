"""The ``usbipx`` command through typer's CliRunner, on the fake kernel.

The kernel is injected as ``obj=State(sysfs=kernel.sysfs)``.  Commands that
talk to a peer (``list -r``, ``attach``, ``connect``, ``disconnect``) reach a
real Server on 127.0.0.1 running in a background thread.  Output is compared
with the C tools' formats; every failure must be one line
``usbipx: error: <reason>`` on stderr with the error's exit code.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakekernel import STUB_DIR, USB_DEVICES, USB_DRIVERS, VHCI0, FakeKernel
from loguru import logger
from loopback import HOST, LoopbackServer, free_port
from typer.testing import CliRunner, Result

import usbipx.cli.daemons as cli_daemons
from usbipx import usbids
from usbipx.cli.app import app
from usbipx.cli.common import State
from usbipx.daemon.policy import DeviceRule, Policy
from usbipx.daemon.usbipa import UsbipaHandler
from usbipx.daemon.usbipd import UsbipdHandler
from usbipx.gadget.vudc import VudcDriver
from usbipx.stubmode.host import HostDriver
from usbipx.vhci import STATE_DIR, PortRecord, VhciDriver

USB_IDS = """\
# a few lines of hwdata's usb.ids
1d6b  Linux Foundation
\t0002  2.0 root hub
\t0104  Multifunction Composite Gadget
C 00  (Defined at Interface level)
C 08  Mass Storage
\t06  SCSI
\t\t50  Bulk-Only
"""
NAMES = "Linux Foundation : Multifunction Composite Gadget (1d6b:0104)"


@pytest.fixture(autouse=True)
def isolated_logging() -> Iterator[None]:
    """Each invocation points loguru at the runner's stderr; restore a sane sink after.
    Daemon threads' log lines would land in the CLI's stderr: keep them quiet."""
    logger.disable("usbipx.daemon")
    yield
    logger.enable("usbipx.daemon")
    logger.remove()
    logger.add(lambda m: sys.stderr.write(m), level="INFO")  # noqa: PLW0108 (late lookup)


@pytest.fixture(autouse=True)
def usb_ids(fs: Any) -> Iterator[None]:
    """A small usb.ids in the fake filesystem (the names' caches are per path)."""
    usbids._load.cache_clear()
    usbids._load_classes.cache_clear()
    fs.create_file("/usr/share/hwdata/usb.ids", contents=USB_IDS)
    yield
    usbids._load.cache_clear()
    usbids._load_classes.cache_clear()


def run(kernel: FakeKernel, *args: str) -> Result:
    return CliRunner().invoke(app, list(args), obj=State(sysfs=kernel.sysfs))


def ok(res: Result) -> str:
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    return res.stdout


def error(res: Result, code: int, message: str | None = None) -> str:
    """The one error line (without its prefix); exactly one line, exit code ``code``."""
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exc_info
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("usbipx: error: "), lines
    assert res.stdout == ""
    reason = lines[0].removeprefix("usbipx: error: ")
    if message is not None:
        assert reason == message
    return reason


# -- list -l / -p / -d ---------------------------------------------------------------------

@pytest.mark.scenario("host_unbound")
def test_list_local_is_the_c_format(kernel: FakeKernel) -> None:
    out = ok(run(kernel, "list", "-l"))
    # The C tool's two lines per device, then the serial number (issue 12).
    assert out == (f" - busid 1-1 (1d6b:0104)\n   {NAMES}\n   serial 0001\n\n"
                   f" - busid 2-1 (1d6b:0104)\n   {NAMES}\n   serial 0001\n\n")
    assert kernel.writes == []


@pytest.mark.scenario("host_unbound")
def test_list_local_without_or_with_an_odd_serial(kernel: FakeKernel, fs: Any) -> None:
    fs.remove("/sys/devices/platform/dummy_hcd.0/usb1/1-1/serial")
    kernel.set_attr("/sys/devices/platform/dummy_hcd.1/usb2/2-1/serial", "A\x1bB\n")
    out = ok(run(kernel, "list", "-l"))
    assert out == (f" - busid 1-1 (1d6b:0104)\n   {NAMES}\n\n"
                   f" - busid 2-1 (1d6b:0104)\n   {NAMES}\n   serial A\\x1bB\n\n")
    devs = json.loads(ok(run(kernel, "list", "-l", "--json")))
    assert [d["serial"] for d in devs] == [None, "A\x1bB"]


@pytest.mark.scenario("host_unbound")
def test_list_local_without_usb_ids(kernel: FakeKernel, fs: Any) -> None:
    fs.remove("/usr/share/hwdata/usb.ids")
    out = ok(run(kernel, "list", "-l"))
    assert out.splitlines()[1] == "   unknown vendor : unknown product (1d6b:0104)"


@pytest.mark.scenario("host_unbound")
def test_list_parsable(kernel: FakeKernel) -> None:
    out = ok(run(kernel, "list", "-p", "-l"))
    rows = [dict(f.split("=", 1) for f in line.split("#") if f) for line in out.splitlines()]
    assert rows == [{"busid": "1-1", "usbid": "1d6b:0104"}, {"busid": "2-1", "usbid": "1d6b:0104"}]
    assert out.splitlines()[0] == "busid=1-1#usbid=1d6b:0104#"


@pytest.mark.scenario("host_unbound")
@pytest.mark.parametrize("args", [("list", "-l", "--json"), ("--json", "list", "-l")])
def test_list_local_json(kernel: FakeKernel, args: tuple[str, ...]) -> None:
    devs = json.loads(ok(run(kernel, *args)))
    assert [d["busid"] for d in devs] == ["1-1", "2-1"]
    assert devs[0] == {
        "busid": "1-1", "path": "/sys/devices/platform/dummy_hcd.0/usb1/1-1",
        "busnum": 1, "devnum": 2, "speed": "high", "id_vendor": "1d6b", "id_product": "0104",
        "bcd_device": "0100", "vendor": "Linux Foundation",
        "product": "Multifunction Composite Gadget", "class": "00/00/00", "configuration": 1,
        "num_interfaces": 3, "interfaces": ["08/06/50", "02/02/01", "0a/00/00"],
        "serial": "0001", "driver": "usb", "status": None,
    }


@pytest.mark.scenario("host_bound")
def test_list_local_json_of_a_bound_device(kernel: FakeKernel) -> None:
    d = json.loads(ok(run(kernel, "list", "-l", "--json")))[0]
    assert (d["driver"], d["status"], d["num_interfaces"]) == ("usbip-host", "available", 0)


@pytest.mark.scenario("vudc")
def test_list_vudc(kernel: FakeKernel) -> None:
    out = ok(run(kernel, "list", "-d"))
    assert out == (" - usbip-vudc.0: gadget v1 (1d6b:0104) High Speed(480Mbps), available\n"
                   f"   {NAMES}\n\n"
                   " - usbip-vudc.1: no gadget bound\n")


@pytest.mark.scenario("vudc")
def test_list_vudc_json(kernel: FakeKernel) -> None:
    rows = json.loads(ok(run(kernel, "list", "-d", "--json")))
    assert [(r["vudc"], r["gadget"]) for r in rows] == [("usbip-vudc.0", "v1"),
                                                        ("usbip-vudc.1", None)]
    assert rows[0]["device"]["busid"] == "usbip-vudc.0"
    assert rows[0]["device"]["status"] == "available"
    assert rows[1]["device"] is None


@pytest.mark.scenario("host_unbound")
def test_list_vudc_without_module(kernel: FakeKernel) -> None:
    error(run(kernel, "list", "-d"), 1,
          "kernel module usbip-vudc is not loaded (run: modprobe usbip-vudc) "
          "(with num=N for N instances)")


@pytest.mark.scenario("vudc")
@pytest.mark.parametrize("args", [(), ("-l", "-d"), ("-l", "-r", "h")])
def test_list_needs_exactly_one_mode(kernel: FakeKernel, args: tuple[str, ...]) -> None:
    error(run(kernel, "list", *args), 1, "choose exactly one of --local, --remote HOST, --device")


# -- bind / unbind ---------------------------------------------------------------------------

@pytest.mark.scenario("host_unbound")
def test_bind_and_unbind(kernel: FakeKernel) -> None:
    assert ok(run(kernel, "bind", "-b", "1-1")) == "bind device on busid 1-1: complete\n"
    assert kernel.driver_of("1-1") == "usbip-host"
    assert kernel.writes[-1] == (f"{STUB_DIR}/bind", "1-1")
    assert ok(run(kernel, "unbind", "--busid", "1-1")) == "unbind device on busid 1-1: complete\n"
    assert kernel.driver_of("1-1") == "usb"


@pytest.mark.scenario("host_unbound")
def test_bind_and_unbind_json(kernel: FakeKernel) -> None:
    assert json.loads(ok(run(kernel, "--json", "bind", "-b", "1-1"))) == {
        "busid": "1-1", "driver": "usbip-host", "previous_driver": "usb"}
    assert json.loads(ok(run(kernel, "--json", "unbind", "-b", "1-1"))) == {
        "busid": "1-1", "driver": "usb"}


BAD_BUSID = ("bad bus id 'foo': expected a USB bus id like 1-1 or 1-1.2, "
             "or a vUDC like usbip-vudc.0")


BIND_ERRORS = [
    ("bind", "foo", 2, BAD_BUSID),
    ("unbind", "foo", 2, BAD_BUSID),
    ("bind", "9-9", 1, "no USB device with bus id 9-9"),
    ("unbind", "9-9", 1, "no USB device with bus id 9-9"),
    ("bind", "1-1", 1, "1-1 is already bound to usbip-host"),
    ("unbind", "2-1", 2, "2-1 is not bound to usbip-host"),
    ("bind", "usbip-vudc.0", 2, "usbip-vudc.0 is a vUDC, not a USB device; use --device "
                                "(vUDC mode)"),
]


@pytest.mark.scenario("host_bound")
def test_bind_unbind_errors(kernel: FakeKernel) -> None:
    for cmd, busid, code, message in BIND_ERRORS:  # one kernel: none of them writes
        error(run(kernel, cmd, "-b", busid), code, message)
    assert kernel.writes == []


@pytest.mark.scenario("host_unbound")
def test_bind_without_module(kernel: FakeKernel) -> None:
    kernel.unload("usbip-host")
    error(run(kernel, "bind", "-b", "1-1"), 1,
          "kernel module usbip-host is not loaded (run: modprobe usbip-host)")
    assert kernel.writes == []


@pytest.mark.scenario("host_unbound")
def test_bind_permission_denied(kernel: FakeKernel) -> None:
    kernel.fail(f"{USB_DRIVERS}/usb/unbind", errno.EACCES)
    reason = error(run(kernel, "bind", "-b", "1-1"), 77)
    assert reason.startswith("bind 1-1: cannot unbind from its driver: write "
                             f"{USB_DRIVERS}/usb/unbind: EACCES (Permission denied)")
    assert kernel.driver_of("1-1") == "usb"


@pytest.mark.scenario("host_unbound")
def test_bind_kernel_error(kernel: FakeKernel) -> None:
    kernel.fail(f"{STUB_DIR}/bind", errno.EIO)
    reason = error(run(kernel, "bind", "-b", "1-1"), 1)
    assert reason.startswith("bind 1-1: cannot bind to usbip-host: write ")
    assert reason.endswith("EIO (Input/output error)")
    assert kernel.driver_of("1-1") == "usb"


# -- port / detach ---------------------------------------------------------------------------

@pytest.mark.scenario("vhci_attached")
def test_port_is_the_c_format(kernel: FakeKernel) -> None:
    assert ok(run(kernel, "port")) == (
        "Imported USB devices\n"
        "====================\n"
        "Port 00: <Port in Use> at High Speed(480Mbps)\n"
        "       3-1 -> usbip://127.0.0.1:3241/1-1\n"
        "           -> remote bus/dev 001/002\n")


@pytest.mark.scenario("vhci_attached")
def test_port_with_names_of_the_enumerated_device(kernel: FakeKernel, fs: Any) -> None:
    fs.create_file(f"{USB_DEVICES}/3-1/idVendor", contents="1d6b\n")
    fs.create_file(f"{USB_DEVICES}/3-1/idProduct", contents="0104\n")
    lines = ok(run(kernel, "port")).splitlines()
    assert lines[3] == f"       {NAMES}"
    assert json.loads(ok(run(kernel, "port", "--json")))[0]["id_product"] == "0104"


@pytest.mark.scenario("vhci_attached")
def test_port_aligns_long_local_bus_ids_as_the_c_tool(kernel: FakeKernel) -> None:
    """``printf("%10s -> usbip://...", busid)``: right-aligned in ten columns."""
    VhciDriver(kernel.sysfs).detach(0)
    kernel.vhci_plug(134, devid=0x00020003)  # controller 4, hs root-hub port 15
    local = kernel.vhci_port(134).local_busid
    assert len(local) == 5  # e.g. 11-15
    VhciDriver(kernel.sysfs).write_record(134, PortRecord("10.1.1.1", "3240", "2-1"))
    assert ok(run(kernel, "port")).splitlines()[2:] == [
        "Port 134: <Port in Use> at High Speed(480Mbps)",
        f"     {local} -> usbip://10.1.1.1:3240/2-1",
        "           -> remote bus/dev 002/003",
    ]


@pytest.mark.scenario("vhci_free")
def test_port_being_initialized(kernel: FakeKernel) -> None:
    kernel.vhci_enumerates = False  # attached, no USB address yet: VDEV_ST_NOTASSIGNED
    kernel.vhci_plug(2)
    lines = ok(run(kernel, "port")).splitlines()
    assert lines[2] == "Port 02: <Port Initializing> at Unknown Speed"
    assert lines[3] == "       0-0 -> unknown host, remote port and remote busid"
    assert json.loads(ok(run(kernel, "port", "--json")))[0]["status"] == "notassigned"


@pytest.mark.scenario("vhci_attached")
def test_port_json(kernel: FakeKernel) -> None:
    assert json.loads(ok(run(kernel, "port", "--json"))) == [{
        "port": 0, "hub": "hs", "status": "used", "speed": "high", "devid": 0x00010002,
        "local_busid": "3-1", "id_vendor": None, "id_product": None,
        "host": "127.0.0.1", "remote_port": "3241", "remote_busid": "1-1",
        "transport": "tcp", "identity": None,
    }]


@pytest.mark.scenario("vhci_attached")
def test_port_without_record(kernel: FakeKernel, fs: Any) -> None:
    fs.remove(f"{STATE_DIR}/port0")
    assert "3-1 -> unknown host, remote port and remote busid" in ok(run(kernel, "port"))
    assert json.loads(ok(run(kernel, "--json", "port")))[0]["host"] is None


@pytest.mark.scenario("vhci_free")
def test_port_with_nothing_imported(kernel: FakeKernel) -> None:
    assert ok(run(kernel, "port")) == "Imported USB devices\n====================\n"
    assert json.loads(ok(run(kernel, "port", "--json"))) == []


@pytest.mark.scenario("host_unbound")
def test_port_without_vhci(kernel: FakeKernel) -> None:
    error(run(kernel, "port"), 1, "kernel module vhci-hcd is not loaded (run: modprobe vhci-hcd)")


@pytest.mark.scenario("vhci_attached")
def test_detach(kernel: FakeKernel) -> None:
    assert ok(run(kernel, "detach", "-p", "0")) == "port 0 is now detached\n"
    assert kernel.writes == [(f"{VHCI0}/detach", "0")]
    assert not kernel.exists(f"{STATE_DIR}/port0")
    assert ok(run(kernel, "port")) == "Imported USB devices\n====================\n"


@pytest.mark.scenario("vhci_attached")
def test_detach_errors(kernel: FakeKernel) -> None:
    for port, message in [("240", "vhci_hcd has no port 240"),
                          ("-1", "bad port number -1")]:
        error(run(kernel, "detach", "-p", port), 1, message)
    assert kernel.writes == []


@pytest.mark.scenario("vhci_attached")
def test_detach_of_a_free_port_is_no_error(kernel: FakeKernel, fs: Any) -> None:
    """As Debian's usbip (clean-up scripts rely on it): "already detached", status 0."""
    fs.create_file(f"{STATE_DIR}/port5", contents="10.0.0.1 3240 1-1\n")  # stale record
    assert ok(run(kernel, "detach", "-p", "5")) == "port 5 is already detached\n"
    assert not kernel.exists(f"{STATE_DIR}/port5")
    assert json.loads(ok(run(kernel, "--json", "detach", "-p", "5"))) == {
        "port": 5, "detached": True, "was_attached": False}
    assert kernel.writes == []
    assert json.loads(ok(run(kernel, "--json", "detach", "-p", "0"))) == {
        "port": 0, "detached": True, "was_attached": True}


# -- options checked before anything happens ---------------------------------------------------

KEEPALIVE_ERRORS = [
    ("1,2", "expected IDLE,INTERVAL,COUNT[,USER_TIMEOUT_MS]"),
    ("a,b,c", "expected IDLE,INTERVAL,COUNT[,USER_TIMEOUT_MS]"),
    ("5,3,3,-1", "expected IDLE,INTERVAL,COUNT[,USER_TIMEOUT_MS]"),
    ("0,3,3", "idle/interval must be 1..32767"),
    ("5,3,200", "count 1..127"),  # beyond Linux's TCP_KEEPCNT limit: EINVAL at setsockopt
]


@pytest.mark.scenario("vudc")
@pytest.mark.parametrize("cmd", [("connect", "-r", HOST, "-b", "1-1"), ("usbipd", "-e"),
                                 ("usbipa",)])
def test_keepalive_errors(kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch,
                          cmd: tuple[str, ...]) -> None:
    monkeypatch.setattr(cli_daemons, "run_server", no_server)
    if cmd[0] == "usbipa":
        kernel.load("vhci_free")
    for value, detail in KEEPALIVE_ERRORS:
        reason = error(run(kernel, *cmd, "--keepalive", value), 2)
        assert reason.startswith(f"bad keepalive '{value}'") and detail in reason, reason
    assert kernel.writes == []


def no_server(*args: Any) -> None:
    raise AssertionError("the daemon must not start")


@pytest.mark.scenario("vhci_free")
def test_usbipa_bad_policy(kernel: FakeKernel, fs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_daemons, "run_server", no_server)
    for n, (text, detail) in enumerate([
        ('default = "maybe"', "default must be 'allow' or 'deny'"),
        ('allow = ["10.0.0.0/33"]', "allow: bad network '10.0.0.0/33'"),
        ("[[rule]]\naction = 1", "rule 1: action must be"),
        ("allow = [", ""),
    ]):
        path = f"/etc/usbipx/bad{n}.toml"
        fs.create_file(path, contents=text)
        reason = error(run(kernel, "usbipa", "--policy", path), 2)
        assert reason.startswith(f"{path}: ") and detail in reason, reason


@pytest.mark.scenario("vhci_free")
def test_usbipa_bad_options(kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_daemons, "run_server", no_server)
    reason = error(run(kernel, "usbipa", "--policy", "/nope.toml"), 2)
    assert reason.startswith("cannot read policy /nope.toml")
    reason = error(run(kernel, "usbipa", "--allow", "10.0.0.0/8", "--allow", "nope"), 2)
    assert reason.startswith("bad network 'nope'")
    error(run(kernel, "usbipa", "-4", "-6"), 1,
          "-4 and -6 are exclusive; give neither to listen on both")


@pytest.mark.scenario("host_unbound")
def test_daemons_check_their_module_first(kernel: FakeKernel,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_daemons, "run_server", no_server)
    error(run(kernel, "usbipa"), 1, "kernel module vhci-hcd is not loaded (run: modprobe vhci-hcd)")
    kernel.unload("usbip-host")
    error(run(kernel, "usbipd"), 1,
          "kernel module usbip-host is not loaded (run: modprobe usbip-host)")
    error(run(kernel, "usbipd", "-e"), 1,
          "kernel module usbip-vudc is not loaded (run: modprobe usbip-vudc) "
          "(with num=N for N instances)")


@pytest.mark.scenario("vhci_free")
def test_usbipa_wires_policy_and_options(kernel: FakeKernel, fs: Any,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[tuple[Any, ...]] = []
    monkeypatch.setattr(cli_daemons, "run_server", lambda *a: started.append(a))
    fs.create_file("/p.toml", contents='allow = ["10.0.0.0/8"]\n[[rule]]\naction = "deny"\n'
                                       "class = 9\n")
    ok(run(kernel, "-t", "4000", "usbipa", "--policy", "/p.toml", "--allow", "192.0.2.1",
           "--max-per-peer", "3", "-4", "--keepalive", "6,2,4,8000", "--max-connections", "50",
           "--max-per-address", "5"))
    (_, server, detach, pidfile, log_file), = started
    assert (server.name, detach, pidfile, log_file) == ("usbipa", False, None, None)
    handler, cfg = server.handler, server.cfg
    assert isinstance(handler, UsbipaHandler)
    assert handler.policy == Policy(
        networks=(ipaddress.IPv4Network("10.0.0.0/8"), ipaddress.IPv4Network("192.0.2.1/32")),
        rules=(DeviceRule("deny", device_class=9),), max_devices_per_peer=3)
    assert (cfg.port, cfg.ipv4, cfg.ipv6) == (4000, True, False)
    assert (cfg.keepalive.idle, cfg.keepalive.count, cfg.keepalive.user_timeout_ms) == \
        (6, 4, 8000)
    assert (cfg.max_connections, cfg.max_per_address) == (50, 5)
    # The peer policy is applied at accept as well as by the handler.
    assert server.refuse_peer is not None
    assert server.refuse_peer("10.1.2.3") is None and server.refuse_peer("192.0.2.1") is None
    assert server.refuse_peer("192.0.2.2") == "peer is outside the allowed networks"


@pytest.mark.scenario("vudc")
def test_usbipd_picks_the_driver(kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[tuple[Any, ...]] = []
    monkeypatch.setattr(cli_daemons, "run_server", lambda *a: started.append(a))
    ok(run(kernel, "usbipd", "-e", "-6", "-t", "3999", "-D", "-P", "/run/u.pid"))
    (_, server, detach, pidfile, _log), = started
    assert (server.name, detach, pidfile) == ("usbipd", True, "/run/u.pid")
    handler, cfg = server.handler, server.cfg
    assert isinstance(handler, UsbipdHandler) and isinstance(handler.driver, VudcDriver)
    assert (cfg.port, cfg.ipv4, cfg.ipv6) == (3999, False, True)
    assert (cfg.max_connections, cfg.max_per_address) == (256, 64)  # the defaults
    assert server.refuse_peer is None


# -- commands that talk to a peer ---------------------------------------------------------------

@pytest.fixture
def usbipd(kernel: FakeKernel) -> Iterator[LoopbackServer]:
    with LoopbackServer(UsbipdHandler(HostDriver(kernel.sysfs)), "usbipd") as srv:
        yield srv


@pytest.fixture
def usbipa(kernel: FakeKernel) -> Iterator[LoopbackServer]:
    with LoopbackServer(UsbipaHandler(VhciDriver(kernel.sysfs)), "usbipa") as srv:
        yield srv


@pytest.mark.scenario("host_bound")
def test_list_remote_is_the_c_format(kernel: FakeKernel, usbipd: LoopbackServer) -> None:
    out = ok(run(kernel, "-t", str(usbipd.port), "list", "-r", HOST))
    assert out == ("Exportable USB devices\n"
                   "======================\n"
                   " - 127.0.0.1\n"
                   f"        1-1: {NAMES}\n"
                   "           : /sys/devices/platform/dummy_hcd.0/usb1/1-1\n"
                   "           : (Defined at Interface level) (00/00/00)\n"
                   "\n")


@pytest.mark.scenario("host_bound")
def test_list_remote_json(kernel: FakeKernel, usbipd: LoopbackServer) -> None:
    devs = json.loads(ok(run(kernel, "--tcp-port", str(usbipd.port), "list", "-r", HOST,
                             "--json")))
    assert [(d["busid"], d["speed"], d["num_interfaces"]) for d in devs] == [("1-1", "high", 0)]


@pytest.mark.scenario("vhci_free")
def test_list_remote_unreachable(kernel: FakeKernel) -> None:
    port = free_port()
    error(run(kernel, "-t", str(port), "list", "-r", HOST), 1,
          f"cannot connect to 127.0.0.1:{port}: Connection refused")


@pytest.mark.scenario("host_bound", "vhci_free")
def test_attach_then_port(kernel: FakeKernel, usbipd: LoopbackServer) -> None:
    t = str(usbipd.port)
    assert ok(run(kernel, "-t", t, "attach", "-r", HOST, "-b", "1-1")) == \
        "attached 1-1 from 127.0.0.1 to port 0\n"
    assert kernel.stub_status["1-1"] == 2
    assert f"3-1 -> usbip://127.0.0.1:{t}/1-1" in ok(run(kernel, "port"))
    # The device is in use now: a second attach is refused by the peer.
    error(run(kernel, "-t", t, "attach", "-r", HOST, "-b", "1-1"), 1,
          "import 1-1 from 127.0.0.1: ST_DEV_BUSY: device busy (exported or no free port)")


@pytest.mark.scenario("host_bound", "vhci_free")
def test_attach_json(kernel: FakeKernel, usbipd: LoopbackServer) -> None:
    assert json.loads(ok(run(kernel, "--json", "-t", str(usbipd.port), "attach", "-r", HOST,
                             "-b", "1-1"))) == {"port": 0, "host": HOST, "busid": "1-1",
                                                "transport": "tcp"}


@pytest.mark.scenario("host_bound", "vhci_free")
def test_attach_refused(kernel: FakeKernel, usbipd: LoopbackServer) -> None:
    error(run(kernel, "-t", str(usbipd.port), "attach", "-r", HOST, "-b", "2-1"), 1,
          "import 2-1 from 127.0.0.1: ST_NODEV: device not found")
    assert kernel.writes == []


@pytest.mark.scenario("vhci_free")
@pytest.mark.parametrize("args", [(), ("-b", "1-1", "-d", "usbip-vudc.0"),
                                  ("-b", "1-1", "--id", "1d6b:0104")])
def test_attach_needs_one_target(kernel: FakeKernel, args: tuple[str, ...]) -> None:
    error(run(kernel, "attach", "-r", HOST, *args), 1,
          "give exactly one of --busid BUSID, --device VUDC or --id VID:PID")


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_connect_and_disconnect(kernel: FakeKernel, usbipa: LoopbackServer) -> None:
    t = str(usbipa.port)
    assert ok(run(kernel, "-t", t, "connect", "-r", HOST, "-b", "1-1",
                  "--keepalive", "5,3,3")) == f"exported 1-1 to 127.0.0.1:{t}\n"
    usbipa.idle()
    assert kernel.driver_of("1-1") == "usbip-host"
    assert kernel.stub_status["1-1"] == 2
    assert kernel.exists(f"{STATE_DIR}/port0")
    assert json.loads(ok(run(kernel, "--json", "-t", t, "disconnect", "-r", HOST, "-b",
                             "1-1"))) == {"busid": "1-1", "host": HOST, "unexported": True}
    assert kernel.driver_of("1-1") == "usb"
    assert not kernel.exists(f"{STATE_DIR}/port0")
    # Again, now with JSON output (the device is bound anew: bound_here).
    assert json.loads(ok(run(kernel, "--json", "-t", t, "connect", "-r", HOST, "-b", "1-1"))) \
        == {"busid": "1-1", "host": HOST, "port": usbipa.port, "bound_here": True,
            "remote": f"{HOST}:{t}", "transport": "tcp"}
    assert ok(run(kernel, "-t", t, "disconnect", "-r", HOST, "-b", "1-1")) == \
        "unexported 1-1 from 127.0.0.1\n"


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_connect_refused_gives_the_device_back(kernel: FakeKernel) -> None:
    handler = UsbipaHandler(VhciDriver(kernel.sysfs), Policy(default="deny"))
    with LoopbackServer(handler) as srv:
        error(run(kernel, "-t", str(srv.port), "connect", "-r", HOST, "-b", "1-1"), 1,
              "export of 1-1 to 127.0.0.1 refused: "
              "ST_NA: request refused (not allowed or not available)")
    assert kernel.driver_of("1-1") == "usb"
    assert not kernel.exists(f"{STATE_DIR}/port0")


@pytest.mark.scenario("vudc", "vhci_free")
def test_connect_vudc_without_gadget(kernel: FakeKernel, usbipa: LoopbackServer) -> None:
    # A vUDC bus id selects vUDC mode even without -d.
    error(run(kernel, "-t", str(usbipa.port), "connect", "-r", HOST, "-b", "usbip-vudc.1"), 1,
          "no gadget is bound to usbip-vudc.1")
    assert kernel.writes == []


@pytest.mark.scenario("vudc", "vhci_free")
def test_connect_vudc(kernel: FakeKernel, usbipa: LoopbackServer) -> None:
    t = str(usbipa.port)
    ok(run(kernel, "-t", t, "connect", "-d", "-r", HOST, "-b", "usbip-vudc.0"))
    assert kernel.read("/sys/devices/platform/usbip-vudc.0/usbip_status") == "2\n"
    ok(run(kernel, "-t", t, "disconnect", "-d", "-r", HOST, "-b", "usbip-vudc.0"))
    assert kernel.writes[-1] == (f"{VHCI0}/detach", "0")


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_disconnect_force_when_usbipa_is_gone(kernel: FakeKernel) -> None:
    with LoopbackServer(UsbipaHandler(VhciDriver(kernel.sysfs))) as srv:
        t = str(srv.port)
        ok(run(kernel, "-t", t, "connect", "-r", HOST, "-b", "1-1"))
    error(run(kernel, "-t", t, "disconnect", "-r", HOST, "-b", "1-1"), 1,
          f"cannot connect to 127.0.0.1:{t}: Connection refused")
    assert kernel.driver_of("1-1") == "usbip-host"
    res = run(kernel, "-t", t, "disconnect", "-r", HOST, "-b", "1-1", "--force")
    assert ok(res) == "unexported 1-1 from 127.0.0.1\n"
    assert "withdrawing it locally" in res.stderr
    assert kernel.driver_of("1-1") == "usb"
    assert (f"{USB_DEVICES}/1-1/usbip_sockfd", "-1") in kernel.writes


@pytest.mark.scenario("host_unbound")
def test_disconnect_of_a_device_not_exported(kernel: FakeKernel) -> None:
    error(run(kernel, "-t", str(free_port()), "disconnect", "-r", HOST, "-b", "1-1"), 1,
          "1-1 is not exported: not bound to usbip-host")


# -- help ------------------------------------------------------------------------------------

@pytest.mark.scenario("vudc")
def test_help_lists_the_commands(kernel: FakeKernel) -> None:
    out = ok(run(kernel, "--help"))
    for cmd in ("list", "bind", "unbind", "attach", "detach", "port", "connect", "disconnect",
                "usbipd", "usbipa", "gadget"):
        assert f" {cmd}" in out


def test_state_defaults_without_injection() -> None:
    assert State().kernel().root == Path("/")
