"""UsbipdHandler over the fake kernel, in stub mode (HostDriver) and vUDC mode (VudcDriver).

The handler is called directly with a real connected socket (one end of a
``socketpair``): the fake kernel records the descriptor written at handoff.
Replies are compared with what Debian's C usbipd sent on the same trees.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakekernel import PLATFORM, USB_DEVICES, FakeKernel

from usbipx import protocol as p
from usbipx.daemon.serving import Outcome, Peer, settle
from usbipx.daemon.usbipd import UsbipdHandler
from usbipx.gadget.vudc import VudcDriver
from usbipx.stubmode.host import HostDriver

GOLDEN = Path(__file__).parent.parent / "fixtures" / "golden"
# Read before pyfakefs hides the real files.
DEVLIST_STUB = (GOLDEN / "devlist-reply-stub.bin").read_bytes()
DEVLIST_VUDC = (GOLDEN / "devlist-reply-vudc.bin").read_bytes()
IMPORT_REPLY_1_1 = (GOLDEN / "import-reply-with-urbs.bin").read_bytes()[: 8 + 312]
IMPORT_REPLY_UNBOUND = (GOLDEN / "import-reply-unbound.bin").read_bytes()
PEER = Peer("192.0.2.7", 51234)
SOCKFD_1_1 = f"{USB_DEVICES}/1-1/usbip_sockfd"
V0, V1 = "usbip-vudc.0", "usbip-vudc.1"


@pytest.fixture
def sock() -> Iterator[socket.socket]:
    a, b = socket.socketpair()
    yield a
    a.close()
    b.close()



@pytest.fixture
def stub(kernel: FakeKernel) -> UsbipdHandler:
    return UsbipdHandler(HostDriver(kernel.sysfs))


@pytest.fixture
def vudc(kernel: FakeKernel) -> UsbipdHandler:
    return UsbipdHandler(VudcDriver(kernel.sysfs))


def call(h: UsbipdHandler, req: p.Request, sock: socket.socket) -> Outcome:
    """The handler's outcome as the server carries it out over plain TCP: the handoff
    (if any) with ``sock``, and the reply that then goes out."""
    out = h(req, PEER)
    assert out.undo is None  # usbipd never undoes: the kernel already holds the socket
    return Outcome(settle(out, sock.fileno(), "tcp"))


# -- stub mode --------------------------------------------------------------------

@pytest.mark.scenario("host_bound")
def test_devlist_is_what_the_c_usbipd_sent(kernel: FakeKernel, stub: UsbipdHandler,
                                           sock: socket.socket) -> None:
    """1-1 (bound, available) is listed; 2-1 (on the usb driver) is not."""
    out = call(stub, p.DevlistRequest(), sock)
    assert out.reply.pack() == DEVLIST_STUB
    assert isinstance(out.reply, p.DevlistReply)
    assert [e.device.busid for e in out.reply.devices] == ["1-1"]
    assert kernel.writes == []


@pytest.mark.scenario("host_unbound")
def test_devlist_with_nothing_bound_is_empty(stub: UsbipdHandler, sock: socket.socket) -> None:
    out = call(stub, p.DevlistRequest(), sock)
    assert out.reply == p.DevlistReply(())
    assert out.reply.pack() == bytes.fromhex("0111 0005 00000000 00000000")


@pytest.mark.scenario("host_bound")
def test_import_hands_the_socket_over_then_replies_with_the_record(
        kernel: FakeKernel, stub: UsbipdHandler, sock: socket.socket, logs: list[str]) -> None:
    out = call(stub, p.ImportRequest("1-1"), sock)
    assert kernel.writes == [(SOCKFD_1_1, str(sock.fileno()))]
    assert kernel.log[0].errno is None
    assert kernel.stub_sockfd["1-1"] == sock.fileno()
    assert out.reply.pack() == IMPORT_REPLY_1_1  # byte for byte the C usbipd's reply
    assert isinstance(out.reply, p.ImportReply) and out.reply.device is not None
    assert out.reply.device.busid == "1-1"
    assert any("exported 1-1 to 192.0.2.7:51234" in m for m in logs)


@pytest.mark.scenario("host_bound")
def test_device_in_use_is_hidden_and_busy(kernel: FakeKernel, stub: UsbipdHandler,
                                          sock: socket.socket) -> None:
    assert call(stub, p.ImportRequest("1-1"), sock).reply.status == p.Status.ST_OK
    kernel.clear_log()
    assert call(stub, p.DevlistRequest(), sock).reply == p.DevlistReply(())
    again = call(stub, p.ImportRequest("1-1"), sock)
    assert again.reply == p.ImportReply(p.Status.ST_DEV_BUSY)
    assert kernel.writes == []  # no second handoff attempted


@pytest.mark.scenario("host_bound")
def test_device_in_error_state(kernel: FakeKernel, stub: UsbipdHandler,
                               sock: socket.socket) -> None:
    kernel.set_attr(f"{USB_DEVICES}/1-1/usbip_status", "3\n")
    assert call(stub, p.DevlistRequest(), sock).reply == p.DevlistReply(())
    assert call(stub, p.ImportRequest("1-1"), sock).reply == p.ImportReply(p.Status.ST_DEV_ERR)
    assert kernel.writes == []


@pytest.mark.scenario("host_bound")
def test_import_of_unbound_or_unknown_device_is_nodev(kernel: FakeKernel, stub: UsbipdHandler,
                                                      sock: socket.socket) -> None:
    # What the C usbipd answered for 2-1 (on the usb driver) on this tree.
    assert call(stub, p.ImportRequest("2-1"), sock).reply.pack() == IMPORT_REPLY_UNBOUND
    for busid in ["9-9", "1-1.4", "usbip-vudc.0"]:
        assert call(stub, p.ImportRequest(busid), sock).reply == \
            p.ImportReply(p.Status.ST_NODEV), busid
    assert kernel.writes == []


@pytest.mark.scenario("host_bound")
@pytest.mark.parametrize("err", [errno.EINVAL, errno.EBUSY, errno.EACCES])
def test_failed_handoff_is_refused(kernel: FakeKernel, stub: UsbipdHandler, sock: socket.socket,
                                   logs: list[str], err: int) -> None:
    kernel.fail(SOCKFD_1_1, err)
    out = call(stub, p.ImportRequest("1-1"), sock)
    assert out.reply == p.ImportReply(p.Status.ST_NA)
    assert [w.errno for w in kernel.log] == [err]
    assert "1-1" not in kernel.stub_sockfd
    assert any("handoff failed" in m for m in logs)
    # The device is still available for the next client.
    assert call(stub, p.DevlistRequest(), sock).reply.pack() == DEVLIST_STUB


@pytest.mark.scenario("host_bound")
def test_socket_the_kernel_refuses_is_refused(kernel: FakeKernel, stub: UsbipdHandler,
                                              sock: socket.socket) -> None:
    kernel.bad_sockfds.add(sock.fileno())  # sockfd_lookup fails: EINVAL
    assert call(stub, p.ImportRequest("1-1"), sock).reply == p.ImportReply(p.Status.ST_NA)
    assert kernel.log[-1].errno == errno.EINVAL


@pytest.mark.scenario("host_bound")
def test_device_unbound_between_list_and_import(kernel: FakeKernel, stub: UsbipdHandler,
                                                sock: socket.socket) -> None:
    assert call(stub, p.DevlistRequest(), sock).reply.pack() == DEVLIST_STUB
    HostDriver(kernel.sysfs).unbind("1-1")
    kernel.clear_log()
    assert call(stub, p.ImportRequest("1-1"), sock).reply == p.ImportReply(p.Status.ST_NODEV)
    assert kernel.writes == []


@pytest.mark.scenario("host_bound")
def test_stub_module_unloaded(kernel: FakeKernel, stub: UsbipdHandler,
                              sock: socket.socket) -> None:
    kernel.unload("usbip-host")
    assert call(stub, p.DevlistRequest(), sock).reply == p.DevlistReply(())
    assert call(stub, p.ImportRequest("1-1"), sock).reply == p.ImportReply(p.Status.ST_NODEV)
    assert kernel.writes == []


# -- vUDC mode --------------------------------------------------------------------

@pytest.mark.scenario("vudc")
def test_vudc_devlist_is_what_the_c_usbipd_sent(vudc: UsbipdHandler,
                                                sock: socket.socket) -> None:
    """usbip-vudc.0 (gadget v1) is listed; usbip-vudc.1 (no gadget) is not."""
    assert call(vudc, p.DevlistRequest(), sock).reply.pack() == DEVLIST_VUDC


@pytest.mark.scenario("vudc")
def test_vudc_import(kernel: FakeKernel, vudc: UsbipdHandler, sock: socket.socket) -> None:
    out = call(vudc, p.ImportRequest(V0), sock)
    assert kernel.writes == [(f"{PLATFORM}/{V0}/usbip_sockfd", str(sock.fileno()))]
    rec = p.decode_reply(p.DevlistRequest(), DEVLIST_VUDC)
    assert isinstance(rec, p.DevlistReply)
    assert out.reply == p.ImportReply(p.Status.ST_OK, rec.devices[0].device)
    kernel.clear_log()
    assert call(vudc, p.DevlistRequest(), sock).reply == p.DevlistReply(())
    assert call(vudc, p.ImportRequest(V0), sock).reply == p.ImportReply(p.Status.ST_DEV_BUSY)
    assert kernel.writes == []


@pytest.mark.scenario("vudc")
def test_vudc_import_without_gadget_or_unknown_is_nodev(kernel: FakeKernel,
                                                        vudc: UsbipdHandler,
                                                        sock: socket.socket) -> None:
    for busid in [V1, "usbip-vudc.7", "1-1"]:
        assert call(vudc, p.ImportRequest(busid), sock).reply == \
            p.ImportReply(p.Status.ST_NODEV), busid
    assert kernel.writes == []


@pytest.mark.scenario("vudc")
def test_vudc_failed_handoff_is_refused(kernel: FakeKernel, vudc: UsbipdHandler,
                                        sock: socket.socket) -> None:
    kernel.fail(f"{PLATFORM}/{V0}/usbip_sockfd", errno.EIO)
    assert call(vudc, p.ImportRequest(V0), sock).reply == p.ImportReply(p.Status.ST_NA)
    assert call(vudc, p.DevlistRequest(), sock).reply.pack() == DEVLIST_VUDC


@pytest.mark.scenario("vudc")
def test_vudc_gadget_unbound_after_listing(kernel: FakeKernel, vudc: UsbipdHandler,
                                           sock: socket.socket) -> None:
    kernel.vudc_unbind_gadget(V0)
    assert call(vudc, p.DevlistRequest(), sock).reply == p.DevlistReply(())
    assert call(vudc, p.ImportRequest(V0), sock).reply == p.ImportReply(p.Status.ST_NODEV)
    assert kernel.writes == []


# -- requests that belong to usbipa ---------------------------------------------------

DEV = p.UsbDevice("/sys/devices/platform/dummy_hcd.0/usb1/1-1", "1-1", 1, 2, p.Speed.HIGH,
                  0x1D6B, 0x0104, 0x0100)


@pytest.mark.scenario("host_bound")
@pytest.mark.parametrize("req,reply", [
    (p.ExportRequest(DEV), p.ExportReply(p.Status.ST_NA)),
    (p.UnexportRequest(DEV), p.UnexportReply(p.Status.ST_NA)),
])
def test_export_requests_are_refused_at_usbipd(kernel: FakeKernel, stub: UsbipdHandler,
                                               sock: socket.socket, logs: list[str],
                                               req: p.Request, reply: p.Reply) -> None:
    assert call(stub, req, sock).reply == reply
    assert kernel.writes == []
    assert any("this is usbipd" in m and "192.0.2.7" in m for m in logs)
