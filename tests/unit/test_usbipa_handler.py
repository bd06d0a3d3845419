"""UsbipaHandler with VhciDriver on the fake kernel: exports attach, policy refuses, unexports detach.

The handler is called directly with a real connected socket (one end of a
``socketpair``) and a :class:`Peer`; the fake vhci_hcd records the descriptor
written to ``attach``.  Records are ``/var/run/vhci_hcd/port<N>`` as the C
tools write them: ``"<host> <port> <busid>"``.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterator

import pytest
from fakekernel import VHCI0, FakeKernel, VdevStatus

from usbipx import protocol as p
from usbipx.daemon.policy import DeviceRule, Policy
from usbipx.daemon.serving import Outcome, Peer, settle
from usbipx.daemon.usbipa import UsbipaHandler
from usbipx.vhci import STATE_DIR, VhciDriver

pytestmark = pytest.mark.scenario("vhci_free")

ATTACH = f"{VHCI0}/attach"
DETACH = f"{VHCI0}/detach"
A = Peer("10.0.0.5", 40000)
B = Peer("10.0.0.6", 40001)


def dev(busid: str = "1-1", speed: p.Speed = p.Speed.HIGH, vendor: int = 0x1D6B,
        product: int = 0x0104, dclass: int = 0, busnum: int = 1, devnum: int = 2) -> p.UsbDevice:
    return p.UsbDevice(f"/sys/devices/platform/dummy_hcd.0/usb1/{busid}", busid, busnum, devnum,
                       speed, vendor, product, 0x0100, device_class=dclass)


D11 = dev()
D21 = dev("2-1", busnum=2)



@pytest.fixture
def new_sock(socks: list[socket.socket]) -> Iterator[object]:
    def make() -> socket.socket:
        a, b = socket.socketpair()
        socks.extend((a, b))
        return a

    yield make



@pytest.fixture
def vhci(kernel: FakeKernel) -> VhciDriver:
    return VhciDriver(kernel.sysfs)


def record(kernel: FakeKernel, port: int) -> str | None:
    path = f"{STATE_DIR}/port{port}"
    return kernel.read(path) if kernel.exists(path) else None


def used_ports(kernel: FakeKernel) -> list[int]:
    return [x.port for x in VhciDriver(kernel.sysfs).ports() if not x.free]


VDEV_ST_ERROR = 7


def port_in_error(kernel: FakeKernel, port: int) -> None:
    """vhci_hcd gave up on ``port``'s connection (``VDEV_ST_ERROR``): its line reads
    ``007 000 00000000 000000 0-0`` until someone detaches it."""
    kernel.vhci_port(port).status = VDEV_ST_ERROR  # type: ignore[assignment]
    kernel.render_vhci_status(port // 30)


def export(h: UsbipaHandler, new_sock, d: p.UsbDevice = D11, peer: Peer = A,
           transport: str = "tcp") -> tuple[Outcome, socket.socket]:
    """The outcome as the server carries it out: the handoff with a fresh socket, and
    the reply that then goes out (a kernel refusal replaces the handler's)."""
    s = new_sock()
    out = h(p.ExportRequest(d), peer)
    return Outcome(settle(out, s.fileno(), transport), undo=out.undo), s


def unexport(h: UsbipaHandler, new_sock, d: p.UsbDevice = D11, peer: Peer = A) -> Outcome:
    out = h(p.UnexportRequest(d), peer)
    assert out.undo is None and out.handoff is None
    return out


# -- export ---------------------------------------------------------------------------

def test_export_attaches_and_records(kernel: FakeKernel, vhci: VhciDriver, new_sock,
                                     logs: list[str]) -> None:
    h = UsbipaHandler(vhci)
    out, s = export(h, new_sock)
    assert out.reply == p.ExportReply(p.Status.ST_OK)
    assert kernel.writes == [(ATTACH, f"0 {s.fileno()} 65538 3")]
    assert record(kernel, 0) == "10.0.0.5 40000 1-1\n"
    v = kernel.vhci_port(0)
    assert (v.status, v.sockfd, v.devid, v.speed) == (VdevStatus.USED, s.fileno(), 65538, 3)
    assert any("attached 1-1 (1d6b:0104) exported by 10.0.0.5:40000 on vhci port 0" in m
               for m in logs)


def test_super_speed_export_goes_to_an_ss_port(kernel: FakeKernel, vhci: VhciDriver,
                                               new_sock) -> None:
    out, s = export(UsbipaHandler(vhci), new_sock, dev(speed=p.Speed.SUPER))
    assert out.reply.status == p.Status.ST_OK
    assert kernel.writes == [(ATTACH, f"15 {s.fileno()} 65538 5")]
    assert record(kernel, 15) == "10.0.0.5 40000 1-1\n"


def test_undo_detaches(kernel: FakeKernel, vhci: VhciDriver, new_sock,
                       logs: list[str]) -> None:
    out, _ = export(UsbipaHandler(vhci), new_sock)
    assert out.undo is not None
    kernel.clear_log()
    out.undo()
    assert kernel.writes == [(DETACH, "0")]
    assert used_ports(kernel) == []
    assert record(kernel, 0) is None
    assert any("detaching port 0" in m for m in logs)


def test_undo_after_the_kernel_dropped_the_port_only_logs(kernel: FakeKernel, vhci: VhciDriver,
                                                          new_sock, logs: list[str]) -> None:
    out, _ = export(UsbipaHandler(vhci), new_sock)
    kernel.vhci_unplug(0)
    assert out.undo is not None
    out.undo()  # must not raise
    assert any("could not detach port 0" in m for m in logs)
    assert record(kernel, 0) is None


def test_two_devices_two_ports(kernel: FakeKernel, vhci: VhciDriver, new_sock) -> None:
    h = UsbipaHandler(vhci)
    assert export(h, new_sock, D11)[0].reply.status == p.Status.ST_OK
    assert export(h, new_sock, D21, B)[0].reply.status == p.Status.ST_OK
    assert used_ports(kernel) == [0, 1]
    assert record(kernel, 1) == "10.0.0.6 40001 2-1\n"


# -- policy ---------------------------------------------------------------------------

def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


@pytest.mark.parametrize("policy,peer,reason", [
    (Policy(networks=(net("192.168.0.0/16"), net("fd00::/8"))), A, "outside the allowed networks"),
    (Policy(rules=(DeviceRule("deny", vendor=0x1D6B, product=0x0104),)), A,
     "denied by rule 'deny vendor 1d6b product 0104'"),
    (Policy(rules=(DeviceRule("allow", vendor=0x0403),), default="deny"), A,
     "denied by default policy"),
    (Policy(rules=(DeviceRule("deny", device_class=0),
                   DeviceRule("allow", vendor=0x1D6B))), A, "denied by rule 'deny class 00'"),
])
def test_policy_refusal(kernel: FakeKernel, vhci: VhciDriver, new_sock, logs: list[str],
                        policy: Policy, peer: Peer, reason: str) -> None:
    out, _ = export(UsbipaHandler(vhci, policy), new_sock, D11, peer)
    assert out.reply == p.ExportReply(p.Status.ST_NA)
    assert out.undo is None
    assert kernel.writes == []
    assert used_ports(kernel) == []
    assert not kernel.exists(f"{STATE_DIR}/port0")
    (line,) = [m for m in logs if m.startswith("refused export")]
    assert "1-1 (1d6b:0104)" in line and peer.host in line and reason in line


def test_policy_admits_peer_inside_networks_and_allowed_device(kernel: FakeKernel,
                                                                vhci: VhciDriver,
                                                                new_sock) -> None:
    policy = Policy(networks=(net("10.0.0.0/8"),),
                    rules=(DeviceRule("allow", vendor=0x1D6B),
                           DeviceRule("deny", vendor=0x1D6B, product=0x0104)),
                    default="deny")
    assert export(UsbipaHandler(vhci, policy), new_sock)[0].reply.status == p.Status.ST_OK


def test_per_peer_limit_counts_only_that_peers_devices(kernel: FakeKernel, vhci: VhciDriver,
                                                       new_sock, logs: list[str]) -> None:
    h = UsbipaHandler(vhci, Policy(max_devices_per_peer=1))
    assert export(h, new_sock, D11, B)[0].reply.status == p.Status.ST_OK
    kernel.vhci_plug(1)  # a device attached by someone else, without a record
    # A holds nothing yet: B's device and the unrecorded port do not count.
    assert export(h, new_sock, D11, A)[0].reply.status == p.Status.ST_OK
    kernel.clear_log()
    out, _ = export(h, new_sock, D21, A)
    assert out.reply == p.ExportReply(p.Status.ST_NA)
    assert kernel.writes == []
    assert any("10.0.0.5" in m and "2-1 (1d6b:0104)" in m and "limit 1" in m for m in logs)
    # A withdraws its device and may export another.
    assert unexport(h, new_sock, D11, A).reply.status == p.Status.ST_OK
    assert export(h, new_sock, D21, A)[0].reply.status == p.Status.ST_OK


def test_per_peer_limit_counts_each_identity_behind_one_address(
        kernel: FakeKernel, vhci: VhciDriver, new_sock, logs: list[str]) -> None:
    """Two boards behind one NAT address, each with its own certificate: the limit is
    per identity, so the second board is not refused for what the first holds."""
    board_a = Peer("192.0.2.7", 40000, identity="board-a", transport="tls")
    board_b = Peer("192.0.2.7", 40001, identity="board-b", transport="tls")
    h = UsbipaHandler(vhci, Policy(max_devices_per_peer=1))
    assert export(h, new_sock, D11, board_a, "tls-relay")[0].reply.status == p.Status.ST_OK
    assert export(h, new_sock, D21, board_b, "tls-relay")[0].reply.status == p.Status.ST_OK
    assert record(kernel, 0) == "192.0.2.7 40000 1-1\ntls-relay board-a\n"
    assert record(kernel, 1) == "192.0.2.7 40001 2-1\ntls-relay board-b\n"
    # Each board is now at its own limit of one.
    kernel.clear_log()
    for peer, d in ((board_a, D21), (board_b, D11)):
        out, _ = export(h, new_sock, d, peer, "tls-relay")
        assert out.reply == p.ExportReply(p.Status.ST_NA)
        assert any(f"{peer.identity} (192.0.2.7)" in m and "limit 1" in m for m in logs)
    assert kernel.writes == []


def test_reexport_of_the_same_device_does_not_count_against_the_limit(
        kernel: FakeKernel, vhci: VhciDriver, new_sock) -> None:
    h = UsbipaHandler(vhci, Policy(max_devices_per_peer=1))
    assert export(h, new_sock)[0].reply.status == p.Status.ST_OK
    port_in_error(kernel, 0)  # the old link is known dead
    assert export(h, new_sock)[0].reply.status == p.Status.ST_OK  # replaces the dead one


# -- what vhci_hcd cannot do --------------------------------------------------------------

@pytest.mark.parametrize("speed", [p.Speed.UNKNOWN, p.Speed.WIRELESS])
def test_speed_vhci_cannot_take_is_refused(kernel: FakeKernel, vhci: VhciDriver, new_sock,
                                           logs: list[str], speed: p.Speed) -> None:
    out, _ = export(UsbipaHandler(vhci), new_sock, dev(speed=speed))
    assert out.reply == p.ExportReply(p.Status.ST_NA)
    assert kernel.writes == []
    assert any("refused export of 1-1" in m and speed.label in m for m in logs)


def test_no_free_port_is_busy(kernel: FakeKernel, vhci: VhciDriver, new_sock,
                              logs: list[str]) -> None:
    for port in range(240):
        if (port // 15) % 2 == 0:
            kernel.vhci_plug(port)
    out, _ = export(UsbipaHandler(vhci), new_sock)
    assert out.reply == p.ExportReply(p.Status.ST_DEV_BUSY)
    assert kernel.writes == []
    assert any("no free hs port" in m for m in logs)


def test_vhci_unloaded_is_an_error(kernel: FakeKernel, vhci: VhciDriver, new_sock,
                                   logs: list[str]) -> None:
    kernel.unload("vhci-hcd")
    out, _ = export(UsbipaHandler(vhci), new_sock)
    assert out.reply == p.ExportReply(p.Status.ST_ERROR)
    assert kernel.writes == []
    assert any("vhci-hcd is not loaded" in m for m in logs)
    assert unexport(UsbipaHandler(vhci), new_sock).reply == p.UnexportReply(p.Status.ST_ERROR)


def test_kernel_refusing_the_attach_is_a_device_error(kernel: FakeKernel, vhci: VhciDriver,
                                                      new_sock) -> None:
    kernel.fail(ATTACH, errno.EINVAL)
    out, s = export(UsbipaHandler(vhci), new_sock)
    assert out.reply == p.ExportReply(p.Status.ST_DEV_ERR)
    assert kernel.writes == [(ATTACH, f"0 {s.fileno()} 65538 3")]
    assert used_ports(kernel) == []
    assert record(kernel, 0) is None


# -- the same bus id again from the same address ------------------------------------------

@pytest.mark.parametrize("enumerated", [True, False])
def test_live_attachment_is_not_kicked_by_a_second_export(kernel: FakeKernel, vhci: VhciDriver,
                                                          new_sock, logs: list[str],
                                                          enumerated: bool) -> None:
    """Two boards behind one NAT address both export 1-1: the second is refused and the
    first keeps its device (whether or not the hub has enumerated it yet)."""
    kernel.vhci_enumerates = enumerated
    h = UsbipaHandler(vhci)
    _, first = export(h, new_sock, D11, A)  # port 0
    kernel.clear_log()
    out, _ = export(h, new_sock, D11, Peer(A.host, 40999))
    assert out.reply == p.ExportReply(p.Status.ST_DEV_BUSY)
    assert out.undo is None
    assert kernel.writes == []
    assert kernel.vhci_port(0).sockfd == first.fileno()
    assert record(kernel, 0) == "10.0.0.5 40000 1-1\n"
    assert used_ports(kernel) == [0]
    (line,) = [m for m in logs if m.startswith("refused export")]
    assert "1-1 (1d6b:0104) from 10.0.0.5" in line
    assert "already attached on vhci port 0 and alive" in line
    # What the board prints for that status names the case.
    assert "live attachment of this bus id" in p.status_text(out.reply.status, p.OP_REP_EXPORT)


def test_attachment_in_error_state_is_replaced(kernel: FakeKernel, vhci: VhciDriver,
                                               new_sock, logs: list[str]) -> None:
    h = UsbipaHandler(vhci)
    assert export(h, new_sock, D21, A)[0].reply.status == p.Status.ST_OK  # port 0, stays
    _, old = export(h, new_sock, D11, A)  # port 1
    port_in_error(kernel, 1)
    kernel.clear_log()
    again = Peer(A.host, 40999)  # the device side reconnected from a new port
    out, new = export(h, new_sock, D11, again)
    assert out.reply.status == p.Status.ST_OK
    # Not on the dead link's port: see VhciDriver.free_port.
    assert kernel.writes == [(DETACH, "1"), (ATTACH, f"2 {new.fileno()} 65538 3")]
    assert kernel.vhci_port(2).sockfd == new.fileno() != old.fileno()
    assert record(kernel, 2) == "10.0.0.5 40999 1-1\n"
    assert used_ports(kernel) == [0, 2]
    assert any("replacing dead attachment of 1-1 from 10.0.0.5 on port 1" in m for m in logs)


def test_dead_attachment_on_the_last_free_port_is_replaced(kernel: FakeKernel,
                                                           vhci: VhciDriver, new_sock) -> None:
    """Every other hs port is taken: the port the dead attachment frees is the one to use."""
    h = UsbipaHandler(vhci)
    export(h, new_sock, D11, A)  # port 0
    for port in range(1, 240):
        if (port // 15) % 2 == 0:
            kernel.vhci_plug(port)
    port_in_error(kernel, 0)
    kernel.clear_log()
    out, new = export(h, new_sock, D11, Peer(A.host, 40999))
    assert out.reply == p.ExportReply(p.Status.ST_OK)
    assert kernel.writes == [(DETACH, "0"), (ATTACH, f"0 {new.fileno()} 65538 3")]
    assert record(kernel, 0) == "10.0.0.5 40999 1-1\n"


def test_gone_attachment_is_attached_afresh(kernel: FakeKernel, vhci: VhciDriver,
                                            new_sock) -> None:
    """The kernel freed the port (keepalive killed the old link): the retry attaches."""
    h = UsbipaHandler(vhci)
    export(h, new_sock, D11, A)
    assert export(h, new_sock, D11, A)[0].reply.status == p.Status.ST_DEV_BUSY  # still alive
    kernel.vhci_unplug(0)
    kernel.clear_log()
    out, s = export(h, new_sock, D11, Peer(A.host, 40100))
    assert out.reply.status == p.Status.ST_OK
    assert kernel.writes == [(ATTACH, f"1 {s.fileno()} 65538 3")]  # not the port just freed
    assert record(kernel, 1) == "10.0.0.5 40100 1-1\n"


def test_same_busid_from_another_peer_is_another_device(kernel: FakeKernel, vhci: VhciDriver,
                                                        new_sock) -> None:
    h = UsbipaHandler(vhci)
    export(h, new_sock, D11, A)
    kernel.clear_log()
    out, s = export(h, new_sock, D11, B)
    assert out.reply.status == p.Status.ST_OK
    assert kernel.writes == [(ATTACH, f"1 {s.fileno()} 65538 3")]  # A's port 0 untouched
    assert used_ports(kernel) == [0, 1]


def test_records_of_ports_the_kernel_freed_are_pruned(kernel: FakeKernel, vhci: VhciDriver,
                                                      new_sock) -> None:
    """A dead connection freed port 0 and its record is forgotten at the next request, so
    when a process that keeps no records takes port 0, a re-export of 1-1 leaves it alone."""
    h = UsbipaHandler(vhci)
    export(h, new_sock, D11, A)
    kernel.vhci_unplug(0)
    assert record(kernel, 0) == "10.0.0.5 40000 1-1\n"  # left behind by the kernel
    assert unexport(h, new_sock, D21, B).reply.status == p.Status.ST_NODEV  # any request
    assert record(kernel, 0) is None
    kernel.vhci_plug(0, devid=0x00050007, sockfd=77)
    kernel.clear_log()
    out, s = export(h, new_sock, D11, A)
    assert out.reply.status == p.Status.ST_OK
    assert kernel.writes == [(ATTACH, f"1 {s.fileno()} 65538 3")]
    assert (kernel.vhci_port(0).status, kernel.vhci_port(0).sockfd) == (VdevStatus.USED, 77)
    assert record(kernel, 0) is None
    assert record(kernel, 1) == "10.0.0.5 40000 1-1\n"


def test_export_after_the_kernel_freed_the_port_attaches_afresh(kernel: FakeKernel,
                                                                vhci: VhciDriver,
                                                                new_sock) -> None:
    h = UsbipaHandler(vhci)
    export(h, new_sock, D11, A)
    kernel.vhci_unplug(0)
    kernel.clear_log()
    out, s = export(h, new_sock, D11, Peer(A.host, 40100))
    assert out.reply.status == p.Status.ST_OK
    assert kernel.writes == [(ATTACH, f"1 {s.fileno()} 65538 3")]  # no detach of a free port
    assert record(kernel, 1) == "10.0.0.5 40100 1-1\n"


def test_unexport_prunes_too(kernel: FakeKernel, vhci: VhciDriver, new_sock) -> None:
    h = UsbipaHandler(vhci)
    export(h, new_sock, D11, A)
    kernel.vhci_unplug(0)
    kernel.clear_log()
    assert unexport(h, new_sock, D11, A).reply == p.UnexportReply(p.Status.ST_NODEV)
    assert kernel.writes == []
    assert record(kernel, 0) is None


# -- unexport --------------------------------------------------------------------------

def test_unexport_from_the_exporting_peer_detaches(kernel: FakeKernel, vhci: VhciDriver,
                                                   new_sock, logs: list[str]) -> None:
    h = UsbipaHandler(vhci)
    export(h, new_sock, D21, B)  # port 0: another peer's, untouched
    export(h, new_sock, D11, A)  # port 1
    kernel.clear_log()
    # The device side reconnects from another source port to unexport.
    out = unexport(h, new_sock, D11, Peer(A.host, 41234))
    assert out.reply == p.UnexportReply(p.Status.ST_OK)
    assert kernel.writes == [(DETACH, "1")]
    assert record(kernel, 1) is None
    assert used_ports(kernel) == [0]
    assert record(kernel, 0) == "10.0.0.6 40001 2-1\n"
    assert any("detached 1-1 unexported by 10.0.0.5 from port 1" in m for m in logs)


def test_unexport_from_another_peer_is_refused(kernel: FakeKernel, vhci: VhciDriver,
                                               new_sock, logs: list[str]) -> None:
    h = UsbipaHandler(vhci)
    export(h, new_sock, D11, A)
    kernel.clear_log()
    assert unexport(h, new_sock, D11, B).reply == p.UnexportReply(p.Status.ST_NA)
    assert kernel.writes == []
    assert used_ports(kernel) == [0]
    assert record(kernel, 0) == "10.0.0.5 40000 1-1\n"
    assert any("refused unexport of 1-1 from 10.0.0.6" in m for m in logs)


@pytest.mark.parametrize("attached", [True, False])
def test_unexport_from_outside_the_allowed_networks_learns_nothing(
        kernel: FakeKernel, vhci: VhciDriver, new_sock, logs: list[str],
        attached: bool) -> None:
    """The peer policy comes first: a stranger cannot tell attached bus ids (ST_NA) from
    unknown ones (ST_NODEV), and changes nothing."""
    h = UsbipaHandler(vhci, Policy(networks=(net("10.0.0.5/32"),)))
    if attached:
        export(h, new_sock, D11, A)
    kernel.clear_log()
    assert unexport(h, new_sock, D11, B).reply == p.UnexportReply(p.Status.ST_NA)
    assert kernel.writes == []
    assert used_ports(kernel) == ([0] if attached else [])
    assert any("refused unexport of 1-1 from 10.0.0.6" in m and "outside the allowed" in m
               for m in logs)


def test_unexport_of_unknown_device(kernel: FakeKernel, vhci: VhciDriver, new_sock) -> None:
    h = UsbipaHandler(vhci)
    export(h, new_sock, D11, A)
    kernel.clear_log()
    assert unexport(h, new_sock, D21, A).reply == p.UnexportReply(p.Status.ST_NODEV)
    assert kernel.writes == []
    assert used_ports(kernel) == [0]


def test_unexport_of_an_unrecorded_port_is_unknown(kernel: FakeKernel, vhci: VhciDriver,
                                                   new_sock) -> None:
    kernel.vhci_plug(0)  # attached by `usbip attach` of another tool run, no record
    assert unexport(UsbipaHandler(vhci), new_sock).reply == p.UnexportReply(p.Status.ST_NODEV)
    assert kernel.writes == []


def test_unexport_detach_failure_is_an_error(kernel: FakeKernel, vhci: VhciDriver,
                                             new_sock) -> None:
    h = UsbipaHandler(vhci)
    export(h, new_sock)
    kernel.fail(DETACH, errno.EIO)
    assert unexport(h, new_sock).reply == p.UnexportReply(p.Status.ST_ERROR)
    assert used_ports(kernel) == [0]


# -- requests that belong to usbipd -------------------------------------------------------

@pytest.mark.parametrize("req,reply", [
    (p.DevlistRequest(), p.DevlistReply((), p.Status.ST_NA)),
    (p.ImportRequest("1-1"), p.ImportReply(p.Status.ST_NA)),
])
def test_usbipd_requests_are_refused_at_usbipa(kernel: FakeKernel, vhci: VhciDriver, new_sock,
                                               logs: list[str], req: p.Request,
                                               reply: p.Reply) -> None:
    out = UsbipaHandler(vhci)(req, A)
    assert out.reply == reply
    assert out.reply.pack() == reply.pack()[:8]  # status only, no body
    assert kernel.writes == []
    assert any("this is usbipa" in m for m in logs)


# -- exports in flight: decided, not yet carried out -----------------------------------
# Over TLS and wss the reply is sent between the decision and the attach, and the
# event loop serves other connections meanwhile.

def test_a_second_export_of_a_bus_id_in_flight_is_busy(kernel: FakeKernel, vhci: VhciDriver,
                                                      new_sock, logs: list[str]) -> None:
    h = UsbipaHandler(vhci)
    first = h(p.ExportRequest(D11), A)
    assert first.reply.status == p.Status.ST_OK
    second = h(p.ExportRequest(D11), Peer(A.host, 40999))  # the same board, again
    assert second.reply == p.ExportReply(p.Status.ST_DEV_BUSY) and second.handoff is None
    assert any("from 10.0.0.5: an export of it from this peer is in progress" in m
               for m in logs)
    assert h(p.ExportRequest(D11), B).reply.status == p.Status.ST_OK  # another peer's 1-1
    assert settle(first, new_sock().fileno(), "tls-relay") == first.reply
    first.close()
    assert used_ports(kernel) == [0]
    # Carried out: vhci's state now answers for it, as for any live attachment.
    assert h(p.ExportRequest(D11), A).reply.status == p.Status.ST_DEV_BUSY


def test_exports_in_flight_count_against_the_peers_limit(kernel: FakeKernel,
                                                         vhci: VhciDriver) -> None:
    h = UsbipaHandler(vhci, Policy(max_devices_per_peer=1))
    assert h(p.ExportRequest(D11), A).reply.status == p.Status.ST_OK  # not attached yet
    assert h(p.ExportRequest(D21), A).reply.status == p.Status.ST_NA
    assert h(p.ExportRequest(D21), B).reply.status == p.Status.ST_OK


@pytest.mark.parametrize("how", ["closed", "refused by the kernel"])
def test_an_export_that_is_not_carried_out_frees_its_bus_id(
        kernel: FakeKernel, vhci: VhciDriver, new_sock, how: str) -> None:
    h = UsbipaHandler(vhci)
    first = h(p.ExportRequest(D11), A)
    if how == "closed":
        first.close()  # the server gave up on it (the reply could not be sent)
        first.close()  # once is enough; twice is harmless
    else:
        refused = new_sock().fileno()
        kernel.bad_sockfds.add(refused)  # sockfd_lookup says EINVAL
        assert settle(first, refused, "tls-relay").status == p.Status.ST_DEV_ERR
    assert used_ports(kernel) == []
    again = h(p.ExportRequest(D11), A)
    assert again.reply.status == p.Status.ST_OK
    assert settle(again, new_sock().fileno(), "tls-relay") == again.reply
    assert used_ports(kernel) == [0]
