"""Mutual TLS end to end on loopback: the client operations against real daemons with
``tls://`` listeners, on the fake kernel.

This host's kernel has no ``tls`` module, so the data path is the relay here
(kernel TLS is proven in the lab: tests/kernel/test_tls.py).  What is checked:
who may connect, who owns what, what the records say, what the board is told.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fakekernel import FakeKernel
from loopback import HOST, LoopbackServer, Spy, used_ports
from tlskit import Pki, make_pki

from usbipx import pki as pkimod
from usbipx import protocol as p
from usbipx.client import export_device, list_remote, unexport_device
from usbipx.daemon.policy import DeviceRule, Policy
from usbipx.daemon.usbipa import UsbipaHandler
from usbipx.daemon.usbipd import UsbipdHandler
from usbipx.errors import RemoteError, UsbipError
from usbipx.ktls import KtlsUnavailable
from usbipx.remote import Remote
from usbipx.stubmode.host import HostDriver
from usbipx.url import Endpoint
from usbipx.vhci import STATE_DIR, VhciDriver

# The TLS key log lives in a memfd that only the real os module can read: keep
# pyfakefs away from the modules that touch it (and from the relay's sockets).
pytestmark = pytest.mark.parametrize(
    "fs", [[["usbipx.tlskeylog", "usbipx.tlsengine", "usbipx.relay"]]], indirect=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    made = make_pki(tmp_path_factory.mktemp("pki"))
    pkimod.issue(made.root / "main", "kiosk")
    return made


@pytest.fixture
def seen(fs: Any, pki: Pki) -> Pki:
    """The certificates are real files (OpenSSL opens them itself); make them visible
    to the Python side under pyfakefs too."""
    fs.add_real_directory(str(pki.root))
    return pki


def tls_server(kernel: FakeKernel, pki: Pki, handler: Any, **kw: Any) -> LoopbackServer:
    return LoopbackServer(handler, "tls", listen=(Endpoint("tls", HOST, 0),),
                          tls=pki.files("server"), data_path="relay", **kw)


def remote(srv: LoopbackServer, pki: Pki, who: str = "board", ca: str = "main",
           trust: str | None = None, **kw: Any) -> Remote:
    return Remote(Endpoint("tls", HOST, srv.port), pki.files(who, ca, trust), timeout=5, **kw)


@pytest.fixture
def usbipa_tls(kernel: FakeKernel, seen: Pki) -> Iterator[tuple[LoopbackServer, Spy]]:
    spy = Spy(UsbipaHandler(VhciDriver(kernel.sysfs)))
    with tls_server(kernel, seen, spy) as srv:
        yield srv, spy


def record_lines(kernel: FakeKernel, port: int) -> list[str]:
    return kernel.read(f"{STATE_DIR}/port{port}").splitlines()


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_export_over_tls_records_the_identity_and_the_transport(
        kernel: FakeKernel, usbipa_tls, seen: Pki) -> None:
    srv, spy = usbipa_tls
    res = export_device(remote(srv, seen), "1-1", HostDriver(kernel.sysfs))
    assert res.path.transport == "tls-relay" and res.path.relay is not None
    (_, peer, fd), = spy.calls
    assert peer.identity == "board" and peer.transport == "tls" and fd >= 0
    assert used_ports(kernel) == [0]
    first, second = record_lines(kernel, 0)
    assert first.split()[2] == "1-1"
    assert second == "tls-relay board"
    assert VhciDriver(kernel.sysfs).imported()[0].record.owner == "board"  # type: ignore[union-attr]
    res.path.relay.kernel_side.close()
    res.path.relay.network.close()


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_forcing_kernel_tls_where_there_is_none_is_a_clear_error(
        kernel: FakeKernel, usbipa_tls, seen: Pki) -> None:
    srv, _ = usbipa_tls
    with pytest.raises(KtlsUnavailable):
        export_device(remote(srv, seen, data_path="ktls"), "1-1", HostDriver(kernel.sysfs))
    assert kernel.driver_of("1-1") == "usb"  # the device it bound went back


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_a_certificate_of_another_ca_is_refused_in_the_handshake(
        kernel: FakeKernel, usbipa_tls, seen: Pki, logs: list[str]) -> None:
    srv, spy = usbipa_tls
    with pytest.raises(UsbipError, match="TLS"):
        export_device(remote(srv, seen, "board", ca="other", trust="main"), "1-1",
                      HostDriver(kernel.sysfs))
    assert spy.calls == []  # refused before any PDU was read
    assert used_ports(kernel) == [] and kernel.driver_of("1-1") == "usb"
    srv.wait_for(lambda s: s.active == 0)
    assert any("TLS handshake failed" in m and "127.0.0.1" in m for m in logs)


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_the_board_checks_the_servers_certificate(kernel: FakeKernel, seen: Pki) -> None:
    spy = Spy(UsbipaHandler(VhciDriver(kernel.sysfs)))
    with LoopbackServer(spy, "tls", listen=(Endpoint("tls", HOST, 0),),
                        tls=seen.files("server", ca="other", trust="main")) as srv, \
            pytest.raises(UsbipError, match="certificate verify failed"):
        export_device(remote(srv, seen), "1-1", HostDriver(kernel.sysfs))
    assert spy.calls == [] and used_ports(kernel) == []


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_identities_are_peers(kernel: FakeKernel, seen: Pki) -> None:
    """Policy by identity: a rule for one identity, and UNEXPORT only from the
    identity that exported."""
    policy = Policy(rules=(DeviceRule("deny", identity="kiosk*"),))
    spy = Spy(UsbipaHandler(VhciDriver(kernel.sysfs), policy))
    with tls_server(kernel, seen, spy, refuse_identity=policy.refuse_identity) as srv:
        with pytest.raises(RemoteError, match="ST_NA"):
            export_device(remote(srv, seen, "kiosk"), "1-1", HostDriver(kernel.sysfs))
        assert used_ports(kernel) == []
        res = export_device(remote(srv, seen, "board"), "1-1", HostDriver(kernel.sysfs))
        assert used_ports(kernel) == [0]
        with pytest.raises(RemoteError, match="ST_NA"):
            unexport_device(remote(srv, seen, "kiosk"), "1-1", HostDriver(kernel.sysfs))
        assert used_ports(kernel) == [0]
        unexport_device(remote(srv, seen, "board"), "1-1", HostDriver(kernel.sysfs))
        assert used_ports(kernel) == []
    assert res.path.relay is not None
    res.path.relay.kernel_side.close()
    res.path.relay.network.close()


@pytest.mark.scenario("host_bound")
def test_list_over_tls(kernel: FakeKernel, seen: Pki) -> None:
    with tls_server(kernel, seen, UsbipdHandler(HostDriver(kernel.sysfs))) as srv:
        (dev,) = list_remote(remote(srv, seen))
    assert dev.device.busid == "1-1"


@pytest.mark.scenario("host_bound")
def test_a_plain_client_at_a_tls_listener_is_refused_cleanly(
        kernel: FakeKernel, seen: Pki, logs: list[str]) -> None:
    with tls_server(kernel, seen, UsbipdHandler(HostDriver(kernel.sysfs))) as srv:
        with pytest.raises(UsbipError):
            list_remote(Remote.tcp(HOST, srv.port, timeout=5))
        srv.wait_for(lambda s: s.active == 0)
        # ... and the listener keeps serving.
        assert len(list_remote(remote(srv, seen))) == 1
    assert any("TLS handshake failed" in m for m in logs)


def test_tls_without_files_is_refused_before_dialing(fs: Any) -> None:
    from usbipx.errors import ConfigError

    with pytest.raises(ConfigError, match="needs --cert, --key and --ca"):
        Remote(Endpoint("tls", HOST, 1))
    assert p.Status.ST_OK == 0


class HoldingHost(HostDriver):
    """usbip-host that keeps its own reference to the socket it is handed, as the
    kernel does (the caller closes its descriptor right after)."""

    held: socket.socket | None = None

    def handoff(self, busid: str, sockfd: int) -> None:
        self.held = socket.fromfd(sockfd, socket.AF_UNIX, socket.SOCK_STREAM)
        super().handoff(busid, sockfd)


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_both_relays_carry_the_data_and_end_together(kernel: FakeKernel, seen: Pki) -> None:
    """Board relay <-> TLS <-> usbipa relay: bytes the board's "kernel" writes come out
    of the application side's "kernel" socket and back; closing one end ends all."""
    app: list[socket.socket] = []
    inner = UsbipaHandler(VhciDriver(kernel.sysfs))

    def handler(req: p.Request, peer: Any) -> Any:
        out = inner(req, peer)
        give = out.handoff
        if give is not None:
            def handoff(fd: int, transport: str) -> p.Reply | None:
                app.append(socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM))
                return give(fd, transport)

            out.handoff = handoff
        return out

    host = HoldingHost(kernel.sysfs)
    with tls_server(kernel, seen, handler) as srv:
        res = export_device(remote(srv, seen), "1-1", host)
        assert res.path.relay is not None and host.held is not None and len(app) == 1
        board_relay = threading.Thread(target=res.path.relay.run, daemon=True)
        board_relay.start()
        board, server = host.held, app[0]
        payload = bytes(range(256)) * 4096  # 1 MiB
        threading.Thread(target=board.sendall, args=(payload,), daemon=True).start()
        assert _recv_exactly(server, len(payload)) == payload
        server.sendall(b"RET_SUBMIT" * 1000)
        assert _recv_exactly(board, 10000) == b"RET_SUBMIT" * 1000
        board.close()  # the board's kernel lets go: everything downstream ends
        server.settimeout(10)
        assert server.recv(1) == b""
        board_relay.join(10)
        assert not board_relay.is_alive()
        assert res.path.relay.stats.to_network == len(payload)
        server.close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(10)
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "connection ended early"
        buf += chunk
    return buf


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_an_export_over_tls_is_in_flight_only_until_attached(
        kernel: FakeKernel, usbipa_tls, seen: Pki) -> None:
    """The reply goes out between usbipa's decision and its attach; once carried out,
    nothing of the request stays held (the board may export again after a loss)."""
    srv, spy = usbipa_tls
    res = export_device(remote(srv, seen), "1-1", HostDriver(kernel.sysfs))
    assert used_ports(kernel) == [0]
    srv.wait_for(lambda s: s.active == 0)
    assert spy.inner.in_flight == set()
    res.path.relay.kernel_side.close()
    res.path.relay.network.close()
