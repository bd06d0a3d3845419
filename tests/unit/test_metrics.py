"""Prometheus metrics (usbipx.metrics): names and labels, the numbers moving as the real
daemon and supervisor code attaches, refuses and loses devices on the fake kernel, and
``--metrics`` on the command line."""

from __future__ import annotations

import os
import socket
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from fakekernel import FakeKernel
from loguru import logger
from loopback import HOST, LoopbackServer, free_port
from supervisor_helpers import FakeClock, FakeSpawner, busid, config
from typer.testing import CliRunner, Result

import usbipx.cli.daemons as cli_daemons
from usbipx import protocol as p
from usbipx.cli.app import app
from usbipx.cli.common import State
from usbipx.client import export_device, unexport_device
from usbipx.daemon.policy import DeviceRule, Policy
from usbipx.daemon.supervisor import Supervisor
from usbipx.daemon.usbipa import UsbipaHandler
from usbipx.daemon.usbipd import UsbipdHandler
from usbipx.errors import UsbipError, ValidationError
from usbipx.metrics import REASONS, Metrics, parse_address
from usbipx.remote import Remote
from usbipx.stubmode.host import HostDriver
from usbipx.vhci import VhciDriver


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    logger.disable("usbipx")
    yield
    logger.enable("usbipx")


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(m.text()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return samples(m).get((name, tuple(sorted(labels.items()))))


# -- the address ---------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "want"), [
    ("127.0.0.1:9240", ("127.0.0.1", 9240)),
    ("0.0.0.0:1", ("0.0.0.0", 1)),
    ("[::1]:9240", ("::1", 9240)),
    ("localhost:65535", ("localhost", 65535)),
])
def test_good_addresses(text: str, want: tuple[str, int]) -> None:
    assert parse_address(text) == want


@pytest.mark.parametrize("text", ["", "9240", ":9240", "127.0.0.1", "127.0.0.1:", "host:0",
                                  "host:65536", "host:x", "::1:9240", "[1.2.3.4]:80",
                                  "[::1:80", "a b:80", "host:80\n", "host:٩٢", "-h:80"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(ValidationError, match="bad --metrics address"):
        parse_address(text)


# -- names and labels ------------------------------------------------------------------------

def test_names_labels_and_an_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.attaches.inc()
    a.refused("policy")
    a.handshake.labels("tls").observe(0.02)
    a.relayed("to_kernel", 100)
    a.live("usbipx_exports_active", "doc", "peer", lambda: {"10.0.0.5": 2})
    got = samples(a)
    assert got[("usbipx_attaches_total", ())] == 1
    assert got[("usbipx_refusals_total", (("reason", "policy"),))] == 1
    assert got[("usbipx_handshake_seconds_count", (("transport", "tls"),))] == 1
    assert got[("usbipx_relay_bytes_total", (("direction", "to_kernel"),))] == 100
    assert got[("usbipx_exports_active", (("peer", "10.0.0.5"),))] == 2
    for name in ("usbipx_link_losses_total", "usbipx_reexports_total",
                 "usbipx_worker_restarts_total"):
        assert got[(name, ())] == 0
    assert value(b, "usbipx_attaches_total") == 0  # not the other object's
    with pytest.raises(ValueError, match="unknown refusal reason"):
        a.refused("because")
    assert len(REASONS) == len(set(REASONS))


def test_served_over_http() -> None:
    m = Metrics((HOST, 0))
    m.attaches.inc()
    m.serve()
    try:
        body = urllib.request.urlopen(f"http://{HOST}:{m.port}/metrics", timeout=5).read()
    finally:
        m.close()
    assert b"usbipx_attaches_total 1.0" in body


def test_an_address_in_use_is_one_line() -> None:
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        m = Metrics((HOST, s.getsockname()[1]))
        with pytest.raises(UsbipError, match=r"^cannot serve metrics on 127\.0\.0\.1:\d+: "
                                             r"Address already in use$"):
            m.serve()


# -- usbipa ---------------------------------------------------------------------------------

@pytest.mark.scenario("host_unbound", "vhci_free")
def test_usbipa_counts_attaches_refusals_and_active_exports(kernel: FakeKernel) -> None:
    m = Metrics()
    policy = Policy(rules=(DeviceRule("deny", product=0x9999),))
    handler = UsbipaHandler(VhciDriver(kernel.sysfs), policy, m)
    host = HostDriver(kernel.sysfs)
    with LoopbackServer(handler, "usbipa") as srv:
        srv.server.metrics = m
        r = Remote.tcp(HOST, srv.port)
        export_device(r, "1-1", host)
        export_device(r, "2-1", host)
        srv.idle()
        assert value(m, "usbipx_attaches_total") == 2
        assert value(m, "usbipx_exports_active", peer="127.0.0.1") == 2
        # A refusal: the device is already attached and alive.
        out = handler(p.ExportRequest(host.get("1-1").record), _peer("127.0.0.1"))
        assert out.reply == p.ExportReply(p.Status.ST_DEV_BUSY)
        assert value(m, "usbipx_refusals_total", reason="busy") == 1
        unexport_device(r, "1-1", host)
        assert value(m, "usbipx_exports_active", peer="127.0.0.1") == 1
        # The link of 2-1 dies: vhci_hcd frees its port by itself.
        kernel.vhci_unplug(VhciDriver(kernel.sysfs).imported()[0].port.port)
        assert value(m, "usbipx_exports_active", peer="127.0.0.1") is None
        assert value(m, "usbipx_link_losses_total") == 1
        # A withdrawn export is no loss, and a lost one is counted once.
        assert value(m, "usbipx_link_losses_total") == 1
        assert value(m, "usbipx_attaches_total") == 2


def _peer(host: str) -> Any:
    from usbipx.daemon.serving import Peer

    return Peer(host, 40000)


@pytest.mark.scenario("vhci_free")
def test_usbipa_refusals_by_reason(kernel: FakeKernel) -> None:
    m = Metrics()
    policy = Policy(networks=(), rules=(DeviceRule("deny", vendor=0x0403),),
                    max_devices_per_peer=None)
    handler = UsbipaHandler(VhciDriver(kernel.sysfs), policy.with_networks(["10.0.0.0/8"]), m)

    def dev(vendor: int, speed: p.Speed = p.Speed.HIGH) -> p.UsbDevice:
        return p.UsbDevice("/x/1-1", "1-1", 1, 2, speed, vendor, 1, 0x100)

    handler(p.ExportRequest(dev(1)), _peer("192.0.2.1"))
    handler(p.ExportRequest(dev(0x0403)), _peer("10.0.0.1"))
    handler(p.ExportRequest(dev(1, p.Speed.WIRELESS)), _peer("10.0.0.1"))
    handler(p.DevlistRequest(), _peer("10.0.0.1"))
    got = {dict(k[1])["reason"]: v for k, v in samples(m).items()
           if k[0] == "usbipx_refusals_total"}
    assert got == {"network": 1, "policy": 1, "unsupported": 2}


@pytest.mark.scenario("vhci_free")
def test_refused_connections_are_counted_by_the_server(kernel: FakeKernel) -> None:
    m = Metrics()
    policy = Policy().with_networks(["10.0.0.0/8"])
    with LoopbackServer(UsbipaHandler(VhciDriver(kernel.sysfs), policy, m), "usbipa",
                        refuse_peer=policy.refuse_peer) as srv:
        srv.server.metrics = m
        with srv.connect() as c:
            c.settimeout(5)
            assert c.recv(1) == b""  # closed at accept
        srv.wait_for(lambda s: value(m, "usbipx_refusals_total", reason="network") == 1)
        with srv.connect() as c:  # each connection refused is counted
            c.settimeout(5)
            assert c.recv(1) == b""
        srv.wait_for(lambda s: value(m, "usbipx_refusals_total", reason="network") == 2)


# -- usbipd ---------------------------------------------------------------------------------

@pytest.mark.scenario("host_bound", "vhci_free")
def test_usbipd_counts_imports(kernel: FakeKernel) -> None:
    from usbipx.client import attach_remote, detach_port

    m = Metrics()
    handler = UsbipdHandler(HostDriver(kernel.sysfs), m)
    with LoopbackServer(handler, "usbipd") as srv:
        srv.server.metrics = m
        vhci = VhciDriver(kernel.sysfs)
        attached = attach_remote(Remote.tcp(HOST, srv.port), "1-1", vhci)
        assert value(m, "usbipx_attaches_total") == 1
        assert value(m, "usbipx_imports_active", peer="127.0.0.1") == 1
        with pytest.raises(UsbipError, match="ST_DEV_BUSY"):
            attach_remote(Remote.tcp(HOST, srv.port), "1-1", vhci)
        with pytest.raises(UsbipError, match="ST_NODEV"):
            attach_remote(Remote.tcp(HOST, srv.port), "9-9", vhci)
        assert value(m, "usbipx_refusals_total", reason="busy") == 1
        assert value(m, "usbipx_refusals_total", reason="no_device") == 1
        detach_port(attached.port, vhci)
        kernel.set_attr("/sys/bus/usb/devices/1-1/usbip_status", "1\n")  # the stub frees it
        assert value(m, "usbipx_imports_active", peer="127.0.0.1") is None


# -- the supervisor -------------------------------------------------------------------------

def test_supervisor_workers_losses_reexports_restarts() -> None:
    m = Metrics()
    spawner = FakeSpawner()
    clock = FakeClock()
    sup = Supervisor(config(busid("1-1"), busid("1-2")), spawner, clock, m)
    sup.start()
    workers = {k[1][0][1]: v for k, v in samples(m).items() if k[0] == "usbipx_workers"}
    assert workers == {"starting": 2, "exporting": 0, "exported": 0, "backoff": 0,
                       "waiting": 0, "stopping": 0, "stopped": 0, "failed": 0}
    key, pid = "busid:1-1", spawner.pid_of("busid:1-1")
    sup.on_report(key, pid, "exporting")
    sup.on_report(key, pid, "exported", remote="10.0.0.1:3240")
    assert value(m, "usbipx_exports_active", peer="10.0.0.1:3240") == 1
    assert value(m, "usbipx_workers", state="exported") == 1
    assert value(m, "usbipx_reexports_total") == 0
    sup.on_report(key, pid, "backoff", error="export dropped")  # the link died
    assert value(m, "usbipx_link_losses_total") == 1
    assert value(m, "usbipx_exports_active", peer="10.0.0.1:3240") is None
    sup.on_report(key, pid, "exporting")
    sup.on_report(key, pid, "exported", remote="10.0.0.1:3240")
    assert value(m, "usbipx_reexports_total") == 1
    # A worker that dies is started again.
    other = spawner.pid_of("busid:1-2")
    spawner.exit(sup, other, 1)
    sup.tick()
    assert value(m, "usbipx_worker_restarts_total") == 1
    assert value(m, "usbipx_link_losses_total") == 1


# -- the command line -------------------------------------------------------------------------

def run(kernel: FakeKernel, *args: str) -> Result:
    return CliRunner().invoke(app, list(args), obj=State(sysfs=kernel.sysfs))


def error_line(res: Result, code: int) -> str:
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("usbipx: error: "), res.stderr
    return lines[0].removeprefix("usbipx: error: ")


def no_server(*args: Any) -> None:
    raise AssertionError("the daemon must not start")


@pytest.mark.scenario("vudc", "vhci_free")
@pytest.mark.parametrize("cmd", [("usbipa",), ("usbipd", "-e")])
def test_a_bad_metrics_address_stops_the_daemon_before_it_starts(
        kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch, cmd: tuple[str, ...]) -> None:
    monkeypatch.setattr(cli_daemons, "run_server", no_server)
    assert error_line(run(kernel, *cmd, "--metrics", "nope"), 2) == (
        "bad --metrics address 'nope': expected ADDR:PORT, e.g. 127.0.0.1:9240 or [::1]:9240")


@pytest.mark.scenario("vudc", "vhci_free")
def test_daemons_get_their_metrics(kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[Any] = []
    monkeypatch.setattr(cli_daemons, "run_server", lambda *a: started.append(a[1]))
    run(kernel, "usbipa", "--metrics", "127.0.0.1:9240")
    run(kernel, "usbipd", "-e", "--metrics", "[::1]:9241")
    run(kernel, "usbipa")
    usbipa, usbipd, plain = started
    assert usbipa.metrics is not None and usbipa.metrics.address == ("127.0.0.1", 9240)
    assert usbipa.handler.metrics is usbipa.metrics
    assert usbipd.metrics.address == ("::1", 9241) and usbipd.handler.metrics is usbipd.metrics
    assert plain.metrics is None and plain.handler.metrics is None  # off by default


@pytest.mark.scenario("vhci_free")
def test_a_metrics_port_in_use_is_an_error_and_leaves_nothing(kernel: FakeKernel) -> None:
    os.makedirs("/run", exist_ok=True)  # the fake filesystem's
    pid = "/run/u.pid"
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        taken = s.getsockname()[1]
        reason = error_line(run(kernel, "usbipa", "--address", HOST, "-t", str(free_port()),
                                "-P", pid, "--metrics", f"{HOST}:{taken}"), 1)
    assert reason == f"cannot serve metrics on 127.0.0.1:{taken}: Address already in use"
    assert not os.path.exists(pid)


def test_supervisor_run_checks_the_address_first(tmp_path: Any) -> None:
    res = CliRunner().invoke(app, ["supervisor", "run", "-c", str(tmp_path / "none.toml"),
                                   "--metrics", "127.0.0.1"])
    assert error_line(res, 2).startswith("bad --metrics address '127.0.0.1'")


# -- TLS: handshakes and relayed bytes ------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tlskit import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.scenario("host_unbound", "vhci_free")
@pytest.mark.parametrize(
    "fs", [[["usbipx.tlskeylog", "usbipx.tlsengine", "usbipx.relay"]]], indirect=True)
def test_tls_handshakes_are_timed_and_refusals_counted(kernel: FakeKernel, fs: Any,
                                                       pki: Any) -> None:
    from usbipx.url import Endpoint

    fs.add_real_directory(str(pki.root))
    m = Metrics()
    srv = LoopbackServer(UsbipaHandler(VhciDriver(kernel.sysfs), None, m), "tls",
                         listen=(Endpoint("tls", HOST, 0),), tls=pki.files("server"),
                         data_path="relay")
    srv.server.metrics = m
    with srv:
        remote = Remote(Endpoint("tls", HOST, srv.port), pki.files("board"), timeout=5)
        res = export_device(remote, "1-1", HostDriver(kernel.sysfs))
        assert value(m, "usbipx_handshake_seconds_count", transport="tls") == 1
        assert value(m, "usbipx_exports_active", peer="board") == 1
        with pytest.raises(UsbipError):  # a certificate of another CA
            export_device(Remote(Endpoint("tls", HOST, srv.port),
                                 pki.files("board", "other", "main"), timeout=5),
                          "2-1", HostDriver(kernel.sysfs))
        srv.wait_for(lambda s: value(m, "usbipx_refusals_total", reason="handshake") == 1)
        assert value(m, "usbipx_handshake_seconds_count", transport="tls") == 1
        assert res.path.relay is not None
        res.path.relay.kernel_side.close()
        res.path.relay.network.close()


def test_relayed_bytes_are_counted_each_way(pki: Any) -> None:
    from test_relay import Background, connected, recv_exactly

    from usbipx.relay import Relay, relay_pair

    m = Metrics()
    csock, client, ssock, server = connected(pki)
    k_end, r_end = relay_pair()
    pk_end, pr_end = relay_pair()
    ours = Relay(r_end, csock, client, "board", meter=m.relayed)
    peer = Relay(pr_end, ssock, server, "server")
    runs = [Background(ours.run), Background(peer.run)]
    k_end.sendall(b"u" * 5000)
    assert recv_exactly(pk_end, 5000) == b"u" * 5000
    pk_end.sendall(b"d" * 3000)
    assert recv_exactly(k_end, 3000) == b"d" * 3000
    k_end.close()
    for r in runs:
        r.value()
    pk_end.close()
    assert value(m, "usbipx_relay_bytes_total", direction="to_network") == 5000
    assert value(m, "usbipx_relay_bytes_total", direction="to_kernel") == 3000


@pytest.mark.scenario("host_unbound", "vhci_free")
@pytest.mark.parametrize(
    "fs", [[["usbipx.tlskeylog", "usbipx.tlsengine", "usbipx.relay", "usbipx.wslink",
             "usbipx.daemon.wsserve", "websockets"]]], indirect=True)
def test_wss_handshakes_are_timed(kernel: FakeKernel, fs: Any, pki: Any,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from usbipx.url import Endpoint

    for var in ("https_proxy", "HTTPS_PROXY", "wss_proxy", "WSS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    fs.add_real_directory(str(pki.root))
    m = Metrics()
    srv = LoopbackServer(UsbipaHandler(VhciDriver(kernel.sysfs), None, m), "wss",
                         listen=(Endpoint("wss", HOST, 0, "/usbip"),), tls=pki.files("server"))
    srv.server.metrics = m
    with srv:
        remote = Remote(Endpoint("wss", HOST, srv.port, "/usbip"), pki.files("board"),
                        timeout=5)
        export_device(remote, "1-1", HostDriver(kernel.sysfs))
        assert value(m, "usbipx_handshake_seconds_count", transport="wss") == 1
        assert value(m, "usbipx_exports_active", peer="board") == 1
        unexport_device(remote, "1-1", HostDriver(kernel.sysfs))
        assert value(m, "usbipx_handshake_seconds_count", transport="wss") == 2
        assert value(m, "usbipx_exports_active", peer="board") is None
        with pytest.raises(UsbipError, match="404"):  # the wrong path: refused at once
            export_device(Remote(Endpoint("wss", HOST, srv.port, "/other"),
                                 pki.files("board"), timeout=5), "2-1", HostDriver(kernel.sysfs))
        assert value(m, "usbipx_refusals_total", reason="bad_request") == 1
