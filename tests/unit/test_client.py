"""Client operations end to end: the real Server and handlers on 127.0.0.1, both sides on
one fake kernel (device-side and application-side paths do not collide).

The server's handler writes the server-side socket's descriptor, the client
its own: each side's kernel writes are checked as strace would show them.
"""

from __future__ import annotations

import errno
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakekernel import PLATFORM, STUB_DIR, USB_DEVICES, USB_DRIVERS, VHCI0, FakeKernel
from loopback import HOST, LoopbackServer, Spy, free_port, used_ports

from usbipx import protocol as p
from usbipx.client import (
    Attached,
    Exported,
    attach_remote,
    detach_port,
    export_device,
    export_records,
    list_remote,
    unexport_device,
    withdraw,
)
from usbipx.daemon.policy import Policy
from usbipx.daemon.serving import Outcome, Peer
from usbipx.daemon.usbipa import UsbipaHandler
from usbipx.daemon.usbipd import UsbipdHandler
from usbipx.errors import (
    DeviceBusy,
    DeviceNotFound,
    ModuleNotLoaded,
    NoFreePort,
    ProtocolError,
    RemoteError,
    UsbipError,
    ValidationError,
)
from usbipx.gadget.vudc import NoGadget, VudcDriver
from usbipx.lease import Lease
from usbipx.net import Keepalive
from usbipx.remote import Remote
from usbipx.stubmode.host import HostDriver
from usbipx.vhci import STATE_DIR, VhciDriver


def R(port: int, **kw: Any) -> Remote:
    """Plain TCP to the loopback server on ``port``."""
    return Remote.tcp(HOST, port, **kw)


GOLDEN = Path(__file__).parent.parent / "fixtures" / "golden"
DEVLIST_STUB = (GOLDEN / "devlist-reply-stub.bin").read_bytes()
ATTACH = f"{VHCI0}/attach"
DETACH = f"{VHCI0}/detach"
SOCKFD_1_1 = f"{USB_DEVICES}/1-1/usbip_sockfd"
V0, V1 = "usbip-vudc.0", "usbip-vudc.1"


@pytest.fixture
def usbipd(kernel: FakeKernel) -> Iterator[tuple[LoopbackServer, Spy]]:
    spy = Spy(UsbipdHandler(HostDriver(kernel.sysfs)))
    with LoopbackServer(spy, "usbipd") as srv:
        yield srv, spy


def records(kernel: FakeKernel) -> dict[str, str]:
    return {n: kernel.read(f"{STATE_DIR}/{n}") for n in kernel.sysfs.listdir(STATE_DIR)}


def attach_fd(kernel: FakeKernel) -> int:
    (value,) = [v for path, v in kernel.writes if path == ATTACH]
    m = re.fullmatch(r"\d+ (\d+) \d+ \d+", value)
    assert m, value
    return int(m[1])


# -- list -r and attach (usbipd) ---------------------------------------------------------

@pytest.mark.scenario("host_bound", "vhci_free")
def test_list_remote(kernel: FakeKernel, usbipd) -> None:
    srv, spy = usbipd
    devs = list_remote(R(srv.port))
    assert p.DevlistReply(tuple(devs)).pack() == DEVLIST_STUB
    assert [r for r, _, _ in spy.calls] == [p.DevlistRequest()]
    assert kernel.writes == []


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_list_remote_with_nothing_exported(usbipd) -> None:
    assert list_remote(R(usbipd[0].port)) == []


@pytest.mark.scenario("host_bound", "vhci_free")
def test_list_remote_refused_by_usbipa(kernel: FakeKernel, usbipa) -> None:
    with pytest.raises(RemoteError, match=r"list devices of 127\.0\.0\.1: ST_NA") as info:
        list_remote(R(usbipa[0].port))
    assert info.value.status == p.Status.ST_NA


@pytest.mark.scenario("host_bound", "vhci_free")
def test_attach_remote(kernel: FakeKernel, usbipd) -> None:
    srv, spy = usbipd
    res = attach_remote(R(srv.port), "1-1", VhciDriver(kernel.sysfs))
    assert res == Attached(0, HOST, "1-1")
    (server_fd,) = spy.fds
    client_fd = attach_fd(kernel)
    # The device side hands its socket over first, then the application side attaches.
    assert kernel.writes == [(SOCKFD_1_1, str(server_fd)), (ATTACH, f"0 {client_fd} 65538 3")]
    assert all(w.errno is None for w in kernel.log)
    assert records(kernel) == {"port0": f"127.0.0.1 {srv.port} 1-1\n"}
    assert kernel.stub_status["1-1"] == 2
    # Now in use: hidden from the list and busy for a second import.
    assert list_remote(R(srv.port)) == []
    kernel.clear_log()
    with pytest.raises(RemoteError, match="ST_DEV_BUSY") as info:
        attach_remote(R(srv.port), "1-1", VhciDriver(kernel.sysfs))
    assert info.value.status == p.Status.ST_DEV_BUSY
    assert kernel.writes == []
    assert used_ports(kernel) == [0]


@pytest.mark.scenario("host_bound", "vhci_free")
def test_attach_refused_attaches_nothing(kernel: FakeKernel, usbipd) -> None:
    with pytest.raises(RemoteError) as info:
        attach_remote(R(usbipd[0].port), "2-1", VhciDriver(kernel.sysfs))
    assert str(info.value) == "import 2-1 from 127.0.0.1: ST_NODEV: device not found"
    assert info.value.status == p.Status.ST_NODEV
    assert kernel.writes == []
    assert used_ports(kernel) == []
    assert records(kernel) == {}


@pytest.mark.scenario("host_bound", "vhci_free")
def test_failed_handoff_at_the_peer_attaches_nothing(kernel: FakeKernel, usbipd) -> None:
    kernel.fail(SOCKFD_1_1, errno.EINVAL)
    with pytest.raises(RemoteError, match="ST_NA"):
        attach_remote(R(usbipd[0].port), "1-1", VhciDriver(kernel.sysfs))
    assert [p_ for p_, _ in kernel.writes] == [SOCKFD_1_1]
    assert used_ports(kernel) == []


@pytest.mark.scenario("host_bound", "vhci_free")
def test_busid_mismatch_in_reply_attaches_nothing(kernel: FakeKernel) -> None:
    other = HostDriver(kernel.sysfs).get("1-1").record

    def liar(req: p.Request, peer: Peer) -> Outcome:
        return Outcome(p.ImportReply(p.Status.ST_OK, other))

    with LoopbackServer(liar) as srv, pytest.raises(ProtocolError,
                                                    match=r"asked for 1-1\.4, peer answered"):
        attach_remote(R(srv.port), "1-1.4", VhciDriver(kernel.sysfs))
    assert kernel.writes == []
    assert records(kernel) == {}


@pytest.mark.scenario("host_bound", "vhci_free")
def test_peer_closing_without_reply(kernel: FakeKernel) -> None:
    def crash(req: p.Request, peer: Peer) -> Outcome:
        raise RuntimeError("boom")

    with LoopbackServer(crash) as srv, pytest.raises(ProtocolError, match="closed by peer"):
        attach_remote(R(srv.port), "1-1", VhciDriver(kernel.sysfs))
    assert kernel.writes == []


@pytest.mark.scenario("host_bound", "vhci_free")
def test_attach_checks_vhci_before_asking_the_peer(kernel: FakeKernel, usbipd) -> None:
    srv, spy = usbipd
    kernel.unload("vhci-hcd")
    with pytest.raises(ModuleNotLoaded, match="vhci-hcd"):
        attach_remote(R(srv.port), "1-1", VhciDriver(kernel.sysfs))
    assert spy.calls == []
    assert kernel.stub_status["1-1"] == 1  # the peer did not export for nothing


@pytest.mark.scenario("vhci_free")
def test_attach_bad_busid_and_unreachable_peer(kernel: FakeKernel) -> None:
    vhci = VhciDriver(kernel.sysfs)
    with pytest.raises(ValidationError, match="bad bus id"):
        attach_remote(R(free_port()), "1-1/../x", vhci)
    with pytest.raises(UsbipError, match=r"cannot connect to 127\.0\.0\.1:\d+"):
        attach_remote(R(free_port()), "1-1", vhci)
    assert kernel.writes == []


@pytest.mark.scenario("vhci_free")
def test_reply_of_the_wrong_kind(kernel: FakeKernel) -> None:
    def wrong(req: p.Request, peer: Peer) -> Outcome:
        return Outcome(p.DevlistReply())

    with LoopbackServer(wrong) as srv, pytest.raises(ProtocolError, match="reply code"):
        attach_remote(R(srv.port), "1-1", VhciDriver(kernel.sysfs))
    assert kernel.writes == []


@pytest.mark.scenario("host_bound", "vhci_free")
def test_attach_without_a_free_port_records_nothing(kernel: FakeKernel, usbipd) -> None:
    """The peer already handed its device over; our closing the socket ends that."""
    for port in range(240):
        if (port // 15) % 2 == 0:
            kernel.vhci_plug(port)
    with pytest.raises(NoFreePort, match="no free hs port"):
        attach_remote(R(usbipd[0].port), "1-1", VhciDriver(kernel.sysfs))
    assert [path for path, _ in kernel.writes] == [SOCKFD_1_1]
    assert records(kernel) == {}


@pytest.mark.scenario("host_bound", "vhci_free")
def test_detach_port(kernel: FakeKernel, usbipd) -> None:
    vhci = VhciDriver(kernel.sysfs)
    attach_remote(R(usbipd[0].port), "1-1", vhci)
    kernel.clear_log()
    assert detach_port(0, vhci) is True
    assert kernel.writes == [(DETACH, "0")]
    assert records(kernel) == {}
    # Free already: no error, as Debian's usbip (issue 12); nothing written.
    assert detach_port(0, vhci) is False
    assert kernel.writes == [(DETACH, "0")]
    with pytest.raises(DeviceNotFound, match="vhci_hcd has no port 240"):
        detach_port(240, vhci)
    with pytest.raises(UsbipError, match="bad port number -1"):
        detach_port(-1, vhci)


# -- connect / disconnect (usbipa) -------------------------------------------------------

EXPORT_WRITES = [
    (f"{USB_DRIVERS}/usb/unbind", "1-1"),
    (f"{STUB_DIR}/match_busid", "add 1-1"),
    (f"{STUB_DIR}/bind", "1-1"),
]
UNBIND_WRITES = [
    (f"{STUB_DIR}/unbind", "1-1"),
    (f"{STUB_DIR}/match_busid", "del 1-1"),
    (f"{STUB_DIR}/rebind", "1-1"),
]


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_export_binds_then_hands_off(kernel: FakeKernel, usbipa) -> None:
    srv, spy = usbipa
    res = export_device(R(srv.port), "1-1", HostDriver(kernel.sysfs))
    srv.idle()
    assert res == Exported(HOST, "1-1", Lease("usbip-host", "1-1", bound_here=True,
                                               original_driver="usb"))
    (req, peer, server_fd), = spy.calls
    assert isinstance(req, p.ExportRequest) and req.device.busid == "1-1"
    n = len(EXPORT_WRITES)
    assert kernel.writes[:n] == EXPORT_WRITES
    # The reply goes out before usbipa attaches: either side may write first.
    (client_fd,) = [int(v) for path, v in kernel.writes[n:] if path == SOCKFD_1_1]
    assert sorted(kernel.writes[n:]) == sorted([(ATTACH, f"0 {server_fd} 65538 3"),
                                                (SOCKFD_1_1, str(client_fd))])
    assert records(kernel) == {"port0": f"127.0.0.1 {peer.port} 1-1\n"}
    assert kernel.driver_of("1-1") == "usbip-host"
    assert kernel.stub_status["1-1"] == 2


@pytest.mark.scenario("host_bound", "vhci_free")
def test_export_of_a_device_already_bound(kernel: FakeKernel, usbipa) -> None:
    res = export_device(R(usbipa[0].port), "1-1", HostDriver(kernel.sysfs))
    usbipa[0].idle()
    assert res.bound_here is False
    assert sorted(path for path, _ in kernel.writes) == sorted([ATTACH, SOCKFD_1_1])


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_refused_export_gives_the_device_back(kernel: FakeKernel) -> None:
    spy = Spy(UsbipaHandler(VhciDriver(kernel.sysfs), Policy(default="deny")))
    with LoopbackServer(spy) as srv, pytest.raises(RemoteError) as info:
        export_device(R(srv.port), "1-1", HostDriver(kernel.sysfs))
    assert str(info.value) == ("export of 1-1 to 127.0.0.1 refused: "
                               "ST_NA: request refused (not allowed or not available)")
    assert len(spy.calls) == 1
    assert kernel.writes == EXPORT_WRITES + UNBIND_WRITES
    assert kernel.driver_of("1-1") == "usb"
    assert kernel.match_busid() == []
    assert used_ports(kernel) == []


@pytest.mark.scenario("host_bound", "vhci_free")
def test_refused_export_of_a_device_bound_by_the_user_stays_bound(kernel: FakeKernel) -> None:
    with LoopbackServer(UsbipaHandler(VhciDriver(kernel.sysfs), Policy(default="deny"))) as srv, \
            pytest.raises(RemoteError):
        export_device(R(srv.port), "1-1", HostDriver(kernel.sysfs))
    assert kernel.writes == []
    assert kernel.driver_of("1-1") == "usbip-host"
    assert kernel.stub_status["1-1"] == 1


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_no_free_port_at_usbipa(kernel: FakeKernel, usbipa) -> None:
    for port in range(240):
        if (port // 15) % 2 == 0:
            kernel.vhci_plug(port)
    with pytest.raises(RemoteError, match="ST_DEV_BUSY"):
        export_device(R(usbipa[0].port), "1-1", HostDriver(kernel.sysfs))
    assert kernel.driver_of("1-1") == "usb"


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_export_to_nobody_gives_the_device_back(kernel: FakeKernel) -> None:
    with pytest.raises(UsbipError, match="cannot connect"):
        export_device(R(free_port()), "1-1", HostDriver(kernel.sysfs))
    assert kernel.writes == EXPORT_WRITES + UNBIND_WRITES
    assert kernel.driver_of("1-1") == "usb"


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_failed_local_handoff_detaches_at_usbipa_and_gives_the_device_back(
        kernel: FakeKernel, usbipa) -> None:
    """usbipa attached, then our kernel refused the socket: the error surfaces and the
    device goes back (closing the socket is what ends the attachment at usbipa)."""
    kernel.fail(SOCKFD_1_1, errno.EINVAL)
    with pytest.raises(UsbipError, match="usbip_sockfd"):
        export_device(R(usbipa[0].port), "1-1", HostDriver(kernel.sysfs))
    assert kernel.driver_of("1-1") == "usb"


@pytest.mark.scenario("host_bound", "vhci_free")
def test_export_of_a_device_in_use_is_busy_before_connecting(kernel: FakeKernel,
                                                              usbipa) -> None:
    srv, spy = usbipa
    HostDriver(kernel.sysfs).handoff("1-1", 5)
    with pytest.raises(DeviceBusy, match="already exported"):
        export_device(R(srv.port), "1-1", HostDriver(kernel.sysfs))
    assert spy.calls == []


@pytest.mark.scenario("vudc", "vhci_free")
def test_export_vudc(kernel: FakeKernel, usbipa) -> None:
    srv, spy = usbipa
    res = export_device(R(srv.port), V0, VudcDriver(kernel.sysfs))
    srv.idle()
    assert res == Exported(HOST, V0, Lease("usbip-vudc", V0, gadget="v1"))
    server_fd = spy.fds[0]
    sockfd = f"{PLATFORM}/{V0}/usbip_sockfd"
    (client_fd,) = [v for path, v in kernel.writes if path == sockfd]
    # A vUDC's record has bus/dev 0: vhci attaches it with devid 0.
    assert sorted(kernel.writes) == sorted([(ATTACH, f"0 {server_fd} 0 3"),
                                            (sockfd, client_fd)])
    assert next(iter(records(kernel).values())).endswith(f" {V0}\n")


@pytest.mark.scenario("vudc", "vhci_free")
def test_export_vudc_without_gadget_is_a_clear_error(kernel: FakeKernel, usbipa) -> None:
    srv, spy = usbipa
    with pytest.raises(NoGadget, match=r"no gadget is bound to usbip-vudc\.1"):
        export_device(R(srv.port), V1, VudcDriver(kernel.sysfs))
    assert spy.calls == []
    assert kernel.writes == []


@pytest.mark.scenario("host_unbound", "vudc", "vhci_free")
def test_export_vudc_with_stub_driver_is_refused(kernel: FakeKernel, usbipa) -> None:
    with pytest.raises(ValidationError, match="use --device"):
        export_device(R(usbipa[0].port), V0, HostDriver(kernel.sysfs))
    assert usbipa[1].calls == []


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_unexport_detaches_and_leaves_the_driver_alone(kernel: FakeKernel, usbipa) -> None:
    """Unexporting is not releasing: the device stays on usbip-host until its lease
    is released."""
    srv, spy = usbipa
    export_device(R(srv.port), "1-1", HostDriver(kernel.sysfs))
    srv.idle()
    kernel.clear_log()
    unexport_device(R(srv.port), "1-1", HostDriver(kernel.sysfs))
    assert isinstance(spy.calls[-1][0], p.UnexportRequest)
    assert kernel.writes == [(DETACH, "0")]
    assert used_ports(kernel) == []
    assert records(kernel) == {}
    assert kernel.driver_of("1-1") == "usbip-host"


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_withdraw_gives_back_a_device_connect_bound(kernel: FakeKernel, usbipa) -> None:
    srv, _ = usbipa
    store = export_records(kernel.sysfs)
    export_device(R(srv.port), "1-1", HostDriver(kernel.sysfs), store=store)
    srv.idle()
    rec = store.read("1-1")
    assert rec is not None and rec.lease == Lease("usbip-host", "1-1", bound_here=True,
                                                  original_driver="usb")
    kernel.clear_log()
    lease = withdraw(R(srv.port), "1-1", HostDriver(kernel.sysfs), store)
    assert lease is not None and lease.bound_here
    assert kernel.writes == [(DETACH, "0"), *UNBIND_WRITES]
    assert kernel.driver_of("1-1") == "usb"
    assert store.read("1-1") is None


@pytest.mark.scenario("host_bound", "vhci_free")
def test_withdraw_leaves_a_device_the_user_bound_on_usbip_host(kernel: FakeKernel,
                                                               usbipa) -> None:
    """Bound with ``usbipx bind`` (or Debian's ``usbip bind``) before ``connect``:
    ``disconnect`` unexports it and leaves it bound."""
    srv, _ = usbipa
    store = export_records(kernel.sysfs)
    export_device(R(srv.port), "1-1", HostDriver(kernel.sysfs), store=store)
    srv.idle()
    assert store.read("1-1") is None  # nothing taken, nothing recorded
    kernel.clear_log()
    assert withdraw(R(srv.port), "1-1", HostDriver(kernel.sysfs), store) is None
    assert kernel.writes == [(DETACH, "0")]
    assert kernel.driver_of("1-1") == "usbip-host"


@pytest.mark.scenario("host_unbound")
def test_a_failed_export_forgets_its_record(kernel: FakeKernel) -> None:
    store = export_records(kernel.sysfs)
    with pytest.raises(UsbipError, match="cannot connect"):
        export_device(R(free_port(), timeout=2), "1-1", HostDriver(kernel.sysfs), store=store)
    assert store.read("1-1") is None
    assert kernel.driver_of("1-1") == "usb"


@pytest.mark.scenario("vudc", "vhci_free")
def test_unexport_vudc(kernel: FakeKernel, usbipa) -> None:
    export_device(R(usbipa[0].port), V0, VudcDriver(kernel.sysfs))
    usbipa[0].idle()
    kernel.clear_log()
    unexport_device(R(usbipa[0].port), V0, VudcDriver(kernel.sysfs))
    assert kernel.writes == [(DETACH, "0")]  # the vUDC sees its connection end
    assert used_ports(kernel) == []


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_unexport_of_a_device_not_bound(kernel: FakeKernel, usbipa) -> None:
    with pytest.raises(UsbipError, match="1-1 is not exported"):
        unexport_device(R(usbipa[0].port), "1-1", HostDriver(kernel.sysfs))
    assert usbipa[1].calls == []


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_unexport_refused_keeps_the_export_unless_forced(kernel: FakeKernel, usbipa) -> None:
    srv, _ = usbipa
    host = HostDriver(kernel.sysfs)
    export_device(R(srv.port), "1-1", host)
    srv.idle()
    kernel.vhci_unplug(0)  # usbipa no longer knows the device
    kernel.clear_log()
    with pytest.raises(RemoteError, match="ST_NODEV"):
        unexport_device(R(srv.port), "1-1", host)
    assert kernel.writes == []
    assert kernel.stub_status["1-1"] == 2
    unexport_device(R(srv.port), "1-1", host, force=True)
    assert kernel.writes == [(SOCKFD_1_1, "-1")]
    assert kernel.stub_status["1-1"] == 1


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_force_unexport_when_usbipa_is_gone(kernel: FakeKernel) -> None:
    host = HostDriver(kernel.sysfs)
    with LoopbackServer(UsbipaHandler(VhciDriver(kernel.sysfs))) as srv:
        export_device(R(srv.port), "1-1", host)
        port = srv.port
    kernel.clear_log()
    with pytest.raises(UsbipError, match="cannot connect"):
        unexport_device(R(port), "1-1", host)
    assert kernel.writes == []
    unexport_device(R(port), "1-1", host, force=True)
    assert kernel.writes == [(SOCKFD_1_1, "-1")]
    assert kernel.stub_status["1-1"] == 1


@pytest.mark.scenario("host_unbound", "vhci_free")
def test_socket_handed_to_the_kernel_is_tuned(kernel: FakeKernel, usbipa) -> None:
    """At handoff the client's socket is blocking and carries the keepalive it was given."""
    seen: dict[str, object] = {}

    class Host(HostDriver):
        def handoff(self, busid: str, sockfd: int) -> None:
            with socket.fromfd(sockfd, socket.AF_INET, socket.SOCK_STREAM) as s:
                g = s.getsockopt
                seen.update(
                    nodelay=g(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0,
                    keepalive=g(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0,
                    timers=(g(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                            g(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                            g(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                            g(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)))
            seen["blocking"] = os.get_blocking(sockfd)
            super().handoff(busid, sockfd)

    ka = Keepalive(6, 2, 5, 7000)
    export_device(R(usbipa[0].port, keepalive=ka), "1-1", Host(kernel.sysfs))
    assert seen["nodelay"] is True and seen["keepalive"] is True
    assert seen["timers"] == (6, 2, 5, 7000)
    assert seen["blocking"] is True  # the kernel reads it with blocking calls
    assert kernel.stub_status["1-1"] == 2


def test_the_reply_deadline_counts_from_the_request_not_the_connection() -> None:
    """A slow peer (a busy board or server) is slow, not dead: the connection's timeout
    does not eat into the time the reply may take."""
    import time as _time

    def slow(req: p.Request, peer: Peer) -> Outcome:
        _time.sleep(1.5)  # longer than the connection timeout below
        return Outcome(p.DevlistReply())

    with LoopbackServer(slow) as srv:
        assert list_remote(R(srv.port, timeout=1.0)) == []
        with pytest.raises(UsbipError, match=r"no reply from peer within 0\.5 s"):
            list_remote(Remote(Remote.tcp(HOST, srv.port).endpoint, timeout=1.0,
                               reply_timeout=0.5))


@pytest.mark.scenario("vhci_attached")
def test_detach_port_freed_by_the_kernel_meanwhile(kernel: FakeKernel) -> None:
    """The link dies between reading the port and writing detach: the kernel answers
    EINVAL, and the port is free all the same -- already detached, no error."""
    kernel.before_write(DETACH, lambda k, w: k.vhci_unplug(0))
    assert detach_port(0, VhciDriver(kernel.sysfs)) is False
    assert records(kernel) == {}
