"""USB/IP over wss:// end to end on loopback: the ``websockets`` client and server with
mutual TLS, on the fake kernel.  HTTP proxies are exercised in the lab (tinyproxy)."""

from __future__ import annotations

import socket
import ssl
import threading
from typing import Any

import pytest
from fakekernel import FakeKernel
from loopback import HOST, LoopbackServer, Spy, used_ports
from tlskit import Pki, make_pki

from usbipx import protocol as p
from usbipx.client import export_device, list_remote, unexport_device
from usbipx.daemon.usbipa import UsbipaHandler
from usbipx.daemon.usbipd import UsbipdHandler
from usbipx.errors import UsbipError
from usbipx.remote import Remote
from usbipx.stubmode.host import HostDriver
from usbipx.url import Endpoint
from usbipx.vhci import STATE_DIR, VhciDriver

# The TLS key log and the relays use real descriptors: keep pyfakefs off them.
pytestmark = pytest.mark.parametrize(
    "fs", [[["usbipx.tlskeylog", "usbipx.tlsengine", "usbipx.relay", "usbipx.wslink",
             "usbipx.daemon.wsserve", "websockets"]]], indirect=True)

PATH = "/usbip"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def seen(fs: Any, pki: Pki) -> Pki:
    fs.add_real_directory(str(pki.root))
    return pki


def wss_server(pki: Pki, handler: Any, **kw: Any) -> LoopbackServer:
    return LoopbackServer(handler, "wss", listen=(Endpoint("wss", HOST, 0, PATH),),
                          tls=pki.files("server"), **kw)


def remote(srv: LoopbackServer, pki: Pki, who: str = "board", **kw: Any) -> Remote:
    return Remote(Endpoint("wss", HOST, srv.port, PATH), pki.files(who), timeout=5, **kw)


class HoldingHost(HostDriver):
    held: socket.socket | None = None

    def handoff(self, busid: str, sockfd: int) -> None:
        self.held = socket.fromfd(sockfd, socket.AF_UNIX, socket.SOCK_STREAM)
        super().handoff(busid, sockfd)


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("https_proxy", "HTTPS_PROXY", "wss_proxy", "WSS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_export_over_wss_relays_both_ways_and_ends_together(
        kernel: FakeKernel, seen: Pki, no_proxy: None) -> None:
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
    with wss_server(seen, Spy(handler)) as srv:
        res = export_device(remote(srv, seen), "1-1", host)
        assert res.path.transport == "wss-relay" and res.path.relay is not None
        lines = kernel.read(f"{STATE_DIR}/port0").splitlines()
        assert lines[1] == "wss-relay board"
        relay = threading.Thread(target=res.path.relay.run, daemon=True)
        relay.start()
        board, server = host.held, app[0]
        assert board is not None
        payload = bytes(range(256)) * 2048
        threading.Thread(target=board.sendall, args=(payload,), daemon=True).start()
        assert _recv_exactly(server, len(payload)) == payload
        server.sendall(b"RET" * 3000)
        assert _recv_exactly(board, 9000) == b"RET" * 3000
        server.close()  # the application side's kernel lets go: everything ends
        board.settimeout(10)
        assert board.recv(1) == b""
        relay.join(10)
        assert not relay.is_alive()


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_unexport_over_wss(kernel: FakeKernel, seen: Pki, no_proxy: None) -> None:
    with wss_server(seen, UsbipaHandler(VhciDriver(kernel.sysfs))) as srv:
        res = export_device(remote(srv, seen), "1-1", HostDriver(kernel.sysfs))
        assert used_ports(kernel) == [0]
        unexport_device(remote(srv, seen), "1-1", HostDriver(kernel.sysfs))
        assert used_ports(kernel) == []
    assert res.path.relay is not None


@pytest.mark.scenario("host_bound")
def test_list_over_wss(kernel: FakeKernel, seen: Pki, no_proxy: None) -> None:
    with wss_server(seen, UsbipdHandler(HostDriver(kernel.sysfs))) as srv:
        (dev,) = list_remote(remote(srv, seen))
    assert dev.device.busid == "1-1"


def _http(port: int, pki: Pki, request: bytes) -> bytes:
    ctx = ssl.create_default_context(cafile=str(pki.root / "main" / "ca.crt"))
    ctx.load_cert_chain(str(pki.root / "main" / "board.crt"), str(pki.root / "main" / "board.key"))
    with socket.create_connection((HOST, port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
            if b"\r\n\r\n" in data:
                break
        return data


@pytest.mark.scenario("host_bound")
def test_plain_http_gets_an_http_error_not_a_crash(kernel: FakeKernel, seen: Pki,
                                                   no_proxy: None) -> None:
    with wss_server(seen, UsbipdHandler(HostDriver(kernel.sysfs))) as srv:
        wrong = _http(srv.port, seen, b"GET /other HTTP/1.1\r\nHost: localhost\r\n\r\n")
        plain = _http(srv.port, seen, f"GET {PATH} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        assert wrong.startswith(b"HTTP/1.1 404")
        assert plain.startswith(b"HTTP/1.1 4"), plain[:40]  # 426 Upgrade Required
        assert len(list_remote(remote(srv, seen))) == 1  # still serving


@pytest.mark.scenario("host_bound")
def test_wrong_path_and_unknown_ca_are_clear_errors(kernel: FakeKernel, seen: Pki,
                                                    no_proxy: None) -> None:
    with wss_server(seen, UsbipdHandler(HostDriver(kernel.sysfs))) as srv:
        bad = Remote(Endpoint("wss", HOST, srv.port, "/nope"), seen.files("board"), timeout=5)
        with pytest.raises(UsbipError, match="HTTP 404"):
            list_remote(bad)
        stranger = Remote(Endpoint("wss", HOST, srv.port, PATH),
                          seen.files("board", "other", "main"), timeout=5)
        with pytest.raises(UsbipError):
            list_remote(stranger)


def test_proxy_is_for_wss_only(fs: Any) -> None:
    from usbipx.errors import ConfigError

    with pytest.raises(ConfigError, match="wss:// only"):
        Remote(Endpoint("tcp", HOST, 1), proxy="http://proxy:3128")


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(10)
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "connection ended early"
        buf += chunk
    return buf

