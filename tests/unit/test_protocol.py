"""The wire codec against golden bytes from Debian's C tools, round trips and junk."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usbipx import protocol as p
from usbipx.errors import ProtocolError, ValidationError
from usbipx.names import validate_busid
from usbipx.usbdevice import DEVICE_SIZE, MAX_INTERFACES

GOLDEN = Path(__file__).parent.parent / "fixtures" / "golden"


def golden(name: str) -> bytes:
    return (GOLDEN / name).read_bytes()


# -- golden bytes captured in the lab between Debian's usbip and usbipd -------

def test_devlist_request_golden() -> None:
    raw = golden("devlist-request.bin")
    assert p.decode_request(raw) == p.DevlistRequest()
    assert p.DevlistRequest().pack() == raw


def test_devlist_reply_stub_golden() -> None:
    raw = golden("devlist-reply-stub.bin")
    rep = p.decode_reply(p.DevlistRequest(), raw)
    assert isinstance(rep, p.DevlistReply)
    (entry,) = rep.devices
    dev = entry.device
    assert dev.busid == "1-1"
    assert dev.path == "/sys/devices/platform/dummy_hcd.0/usb1/1-1"
    assert (dev.busnum, dev.devnum, dev.speed) == (1, 2, p.Speed.HIGH)
    assert (dev.id_vendor, dev.id_product, dev.bcd_device) == (0x1D6B, 0x0104, 0x0100)
    # A device bound to usbip-host is unconfigured: no interfaces listed.
    assert (dev.configuration_value, dev.num_interfaces, dev.num_configurations) == (0, 0, 1)
    assert entry.interfaces == ()
    assert rep.pack() == raw


def test_devlist_reply_vudc_golden() -> None:
    raw = golden("devlist-reply-vudc.bin")
    rep = p.decode_reply(p.DevlistRequest(), raw)
    assert isinstance(rep, p.DevlistReply)
    dev = rep.devices[0].device
    assert dev.busid == "usbip-vudc.0"
    assert dev.path == "/sys/devices/platform/usbip-vudc.0"
    assert (dev.busnum, dev.devnum, dev.devid) == (0, 0, 0)
    assert rep.pack() == raw


def test_import_exchange_golden_stops_at_pdu_boundary() -> None:
    """The decoder consumes exactly the PDU; URB traffic after it is left alone."""
    c2s = golden("import-request-with-urbs.bin")
    dec = p.RequestDecoder()
    dec.receive_data(c2s)
    req = dec.next_event()
    assert req == p.ImportRequest("1-1")
    assert len(dec.unconsumed) == len(c2s) - 40
    # What follows is USBIP_CMD_SUBMIT (command 1) from the vhci side.
    assert struct.unpack(">I", dec.unconsumed[:4]) == (1,)

    s2c = golden("import-reply-with-urbs.bin")
    rdec = p.ReplyDecoder(req)
    rdec.receive_data(s2c)
    rep = rdec.next_event()
    assert isinstance(rep, p.ImportReply) and rep.status == p.Status.ST_OK
    assert rep.device is not None and rep.device.busid == "1-1"
    assert rep.pack() == s2c[: 8 + 312]
    assert struct.unpack(">I", rdec.unconsumed[:4]) == (3,)  # USBIP_RET_SUBMIT


def test_import_refused_golden() -> None:
    req = p.decode_request(golden("import-request-unbound.bin"))
    assert req == p.ImportRequest("2-1")
    rep = p.decode_reply(req, golden("import-reply-unbound.bin"))
    assert rep == p.ImportReply(p.Status.ST_NODEV)
    assert rep.pack() == golden("import-reply-unbound.bin")


# -- exact sizes and byte layout of the export extension ----------------------

DEV = p.UsbDevice("/sys/devices/platform/dummy_hcd.0/usb1/1-1", "1-1", 1, 2, p.Speed.HIGH,
                  0x1D6B, 0x0104, 0x0100, num_configurations=1)


def test_export_request_layout() -> None:
    raw = p.ExportRequest(DEV).pack()
    assert len(raw) == 8 + 312
    assert raw[:8] == bytes.fromhex("0111 8006 00000000")
    assert p.decode_request(raw) == p.ExportRequest(DEV)


def test_unexport_request_and_replies_layout() -> None:
    assert p.UnexportRequest(DEV).pack()[:4] == bytes.fromhex("0111 8007")
    assert p.ExportReply(p.Status.ST_NA).pack() == bytes.fromhex("0111 0006 00000001")
    assert p.UnexportReply().pack() == bytes.fromhex("0111 0007 00000000")
    assert p.decode_reply(p.ExportRequest(DEV), bytes.fromhex("0111 0006 00000002")) == \
        p.ExportReply(p.Status.ST_DEV_BUSY)


def test_needed_drives_exact_reads() -> None:
    dec = p.ReplyDecoder(p.DevlistRequest())
    reply = p.DevlistReply((p.ExportableDevice(
        DEV.__class__(**{**DEV.__dict__, "num_interfaces": 2}),
        (p.UsbInterface(8, 6, 0x50), p.UsbInterface(2, 2, 1))),)).pack()
    got = 0
    sizes = []
    while (n := dec.needed()) and got < len(reply):
        sizes.append(n)
        dec.receive_data(reply[got:got + n])
        got += n
        if dec.next_event() is not None:
            break
    assert got == len(reply)
    assert sizes == [8, 4, 312, 4, 4]  # header, count, device, two interface records
    assert dec.unconsumed == b""


def _big_devlist(devices: int = 128, interfaces: int = 32) -> p.DevlistReply:
    ifaces = tuple(p.UsbInterface(8, 6, n) for n in range(interfaces))
    devs = []
    for n in range(devices):
        d = p.UsbDevice(f"/sys/devices/platform/vhci_hcd.0/usb{n + 1}/{n + 1}-1", f"{n + 1}-1",
                        n + 1, 2, p.Speed.HIGH, 0x1D6B, 0x0104, 0x0100,
                        num_interfaces=interfaces)
        devs.append(p.ExportableDevice(d, ifaces))
    return p.DevlistReply(tuple(devs))


@pytest.mark.parametrize("chunk", [1, 7, 100])
def test_devlist_decoder_keeps_no_more_than_one_record(chunk: int) -> None:
    """A 128 x 32 reply fed in small pieces: what the decoder holds between calls never
    exceeds one record plus the last piece, so no byte is parsed twice (the old decoder
    kept the whole reply and parsed it from byte 0 on every call)."""
    reply = _big_devlist()
    raw = reply.pack()
    dec = p.ReplyDecoder(p.DevlistRequest())
    got = None
    for start in range(0, len(raw), chunk):
        assert got is None, "the reply completed before its last byte"
        dec.receive_data(raw[start:start + chunk])
        got = dec.next_event()
        assert len(dec.unconsumed) < DEVICE_SIZE + chunk, f"holds too much at byte {start}"
    assert got == reply
    assert dec.unconsumed == b""


def test_devlist_decoder_wants_one_record_at_a_time() -> None:
    """needed() asks for exactly the next record of a large reply, never the rest of it."""
    raw = _big_devlist(3, 32).pack()
    dec = p.ReplyDecoder(p.DevlistRequest())
    sizes, pos = [], 0
    while (rep := dec.next_event()) is None:
        n = dec.needed()
        sizes.append(n)
        dec.receive_data(raw[pos:pos + n])
        pos += n
    assert pos == len(raw) and rep == _big_devlist(3, 32)
    assert sizes == [8, 4] + ([312] + [4] * 32) * 3


def test_decoder_reports_bytes_of_the_pdu_in_progress() -> None:
    raw = p.ExportRequest(DEV).pack()
    dec = p.RequestDecoder()
    dec.receive_data(raw[:300])
    assert dec.next_event() is None
    assert dec.pending == 300
    assert dec.needed() == 20
    dec.receive_data(raw[300:] + b"\x01\x02")
    assert dec.next_event() == p.ExportRequest(DEV)
    assert dec.pending == 2 and dec.unconsumed == b"\x01\x02"


def test_decoder_error_is_final() -> None:
    dec = p.RequestDecoder()
    dec.receive_data(bytes.fromhex("0111 8009 00000000"))
    with pytest.raises(ProtocolError, match="unknown request"):
        dec.next_event()
    dec.receive_data(p.DevlistRequest().pack())
    with pytest.raises(ProtocolError, match="unknown request"):
        dec.next_event()


# -- validation ---------------------------------------------------------------

def _device_bytes(**over: object) -> bytearray:
    return bytearray(DEV.__class__(**{**DEV.__dict__, **over}).pack())


@pytest.mark.parametrize(("mutate", "msg"), [
    (lambda b: b.__setitem__(slice(0, 2), b"\x01\x06"), "version"),
    (lambda b: b.__setitem__(slice(2, 4), b"\x80\x09"), "unknown request"),
    (lambda b: b.__setitem__(slice(4, 8), b"\0\0\0\1"), "status"),
    (lambda b: b.__setitem__(slice(8 + 256, 8 + 288), b"1" * 32), "NUL"),
    (lambda b: b.__setitem__(slice(8 + 256, 8 + 262), b"../x\0\0"), "bus id"),
    (lambda b: b.__setitem__(slice(8, 14), b"/a\nb\0\0"), "path"),
    (lambda b: b.__setitem__(slice(8, 8 + 256), b"x" * 256), "NUL"),
    (lambda b: b.__setitem__(slice(8 + 296, 8 + 300), b"\0\0\0\x09"), "speed"),
    (lambda b: b.__setitem__(8 + 311, 33), "bNumInterfaces"),
    (lambda b: b.__setitem__(slice(8 + 256, 8 + 260), b"\xff1\0\0"), "non-ASCII"),
])
def test_bad_export_requests_rejected(mutate, msg: str) -> None:
    raw = bytearray(p.ExportRequest(DEV).pack())
    mutate(raw)
    with pytest.raises(ProtocolError, match=msg):
        p.decode_request(bytes(raw))


def test_bad_import_busid_rejected() -> None:
    raw = bytes.fromhex("0111 8003 00000000") + b"../../etc/passwd".ljust(32, b"\0")
    with pytest.raises(ProtocolError, match="bus id"):
        p.decode_request(raw)


def test_devlist_count_bounded() -> None:
    raw = bytes.fromhex("0111 0005 00000000") + struct.pack(">I", p.MAX_DEVICES + 1)
    with pytest.raises(ProtocolError, match="exceeds"):
        p.decode_reply(p.DevlistRequest(), raw)


def test_reply_code_and_status_checked() -> None:
    with pytest.raises(ProtocolError, match="expected 0x0003"):
        p.decode_reply(p.ImportRequest("1-1"), bytes.fromhex("0111 0005 00000000"))
    with pytest.raises(ProtocolError, match="unknown status"):
        p.decode_reply(p.ExportRequest(DEV), bytes.fromhex("0111 0006 00000063"))


def test_truncated_and_trailing() -> None:
    raw = p.ExportRequest(DEV).pack()
    with pytest.raises(ProtocolError, match="truncated"):
        p.decode_request(raw[:-1])
    with pytest.raises(ProtocolError, match="after the request"):
        p.decode_request(raw + b"\0")


@pytest.mark.parametrize("busid", ["1-1", "3-1.4.2", "12-10", "usbip-vudc.0", "usbip-vudc.15"])
def test_valid_busids(busid: str) -> None:
    assert validate_busid(busid) == busid


@pytest.mark.parametrize("busid", ["", "1", "1-", "-1", "1-1/", "../1-1", "1-1:1.0", "usb1",
                                   "usbip-vudc", "usbip-vudc.x", "1-1 ", "1-1\n", "a-b"])
def test_invalid_busids(busid: str) -> None:
    with pytest.raises(ValidationError):
        validate_busid(busid)


def test_record_rejects_out_of_range_fields() -> None:
    with pytest.raises(ValidationError, match="idVendor"):
        p.UsbDevice("", "1-1", 1, 1, p.Speed.HIGH, 0x10000, 0, 0)
    with pytest.raises(ValidationError, match="speed"):
        p.UsbDevice("", "1-1", 1, 1, 9, 0, 0, 0)  # type: ignore[arg-type]


def test_status_text_names_the_code() -> None:
    assert p.status_text(4) == "ST_NODEV: device not found"
    assert "unknown status 42" in p.status_text(42)


# -- properties ---------------------------------------------------------------

busids = st.one_of(
    st.builds(lambda a, b, rest: f"{a}-{b}" + "".join(f".{x}" for x in rest),
              st.integers(1, 999), st.integers(1, 999), st.lists(st.integers(1, 99), max_size=5)),
    st.builds(lambda n: f"usbip-vudc.{n}", st.integers(0, 9999)),
)
paths = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/._:+-", max_size=255)
u8, u16, u32 = st.integers(0, 0xFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF)
devices = st.builds(p.UsbDevice, paths, busids, u32, u32, st.sampled_from(list(p.Speed)),
                    u16, u16, u16, u8, u8, u8, u8, u8, st.integers(0, MAX_INTERFACES))
interfaces = st.builds(p.UsbInterface, u8, u8, u8)


@st.composite
def exportables(draw: st.DrawFn) -> p.ExportableDevice:
    dev = draw(devices)
    ifs = draw(st.lists(interfaces, min_size=dev.num_interfaces, max_size=dev.num_interfaces))
    return p.ExportableDevice(dev, tuple(ifs))


requests = st.one_of(
    st.just(p.DevlistRequest()),
    st.builds(p.ImportRequest, busids),
    st.builds(p.ExportRequest, devices),
    st.builds(p.UnexportRequest, devices),
)


REQUEST_SIZE = {0x8005: 8, 0x8003: 8 + 32, 0x8006: 8 + 312, 0x8007: 8 + 312}
# (offset, size) of the NUL-terminated strings of each request: the bus id of an
# import, the path and the bus id of an export/unexport device record.
_STRINGS = {0x8005: (), 0x8003: ((8, 32),), 0x8006: ((8, 256), (264, 32)),
            0x8007: ((8, 256), (264, 32))}


def _normalized(raw: bytes) -> bytes:
    """``raw`` as a re-encoding must give it: every string field zero after its first NUL."""
    out = bytearray(raw)
    for off, size in _STRINGS[int.from_bytes(raw[2:4], "big")]:
        nul = out.index(0, off, off + size)
        out[nul:off + size] = bytes(off + size - nul)
    return bytes(out)


@given(requests)
def test_request_round_trip(req: p.Request) -> None:
    assert p.decode_request(req.pack()) == req


@given(st.lists(exportables(), max_size=4))
def test_devlist_reply_round_trip(devs: list[p.ExportableDevice]) -> None:
    rep = p.DevlistReply(tuple(devs))
    assert p.decode_reply(p.DevlistRequest(), rep.pack()) == rep


@given(devices, st.sampled_from(list(p.Status)))
def test_import_reply_round_trip(dev: p.UsbDevice, status: p.Status) -> None:
    rep = p.ImportReply(status, dev if status == p.Status.ST_OK else None)
    assert p.decode_reply(p.ImportRequest(dev.busid), rep.pack()) == rep


@settings(max_examples=500)
@given(st.binary(max_size=400))
def test_random_bytes_never_crash_the_request_decoder(data: bytes) -> None:
    dec = p.RequestDecoder()
    dec.receive_data(data)
    try:
        req = dec.next_event()
    except ProtocolError:
        return
    if len(data) < 8:
        assert req is None and dec.needed() == 8 - len(data)
        return
    # A header that passed: the PDU is as long as its code says.
    size = REQUEST_SIZE[int.from_bytes(data[2:4], "big")]
    if req is None:
        assert len(data) < size and dec.needed() == size - len(data)
    else:
        assert req.pack() == _normalized(data[:size])
        assert dec.unconsumed == data[size:] and dec.needed() == max(8 - len(data[size:]), 0)


@settings(max_examples=300)
@given(requests, st.data())
def test_mutated_requests_decode_or_fail_cleanly(req: p.Request, data: st.DataObject) -> None:
    raw = bytearray(req.pack())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(u8)
    try:
        out = p.decode_request(bytes(raw))
    except ProtocolError:
        return
    # Whatever decodes re-encodes to the same bytes up to each string's NUL.
    assert out.pack() == _normalized(bytes(raw))


# -- module structure -----------------------------------------------------------

def _usbipx_imports(module: str) -> set[str]:
    """usbipx modules that ``module``'s source imports, at any depth of its code."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("usbipx"):
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("usbipx")}
    return found


def test_status_codes_live_in_a_leaf_module() -> None:
    """errors and protocol both take the status codes from usbipx.status; neither imports
    the other's way round (errors used to import protocol inside RemoteError)."""
    assert _usbipx_imports("usbipx.status") == set()
    assert not any(m.startswith("usbipx.protocol") for m in _usbipx_imports("usbipx.errors"))
    assert p.Status is __import__("usbipx.status").status.Status


def test_the_records_do_not_know_the_pdus() -> None:
    """usbipx.usbdevice is the records alone: the PDUs import it, never the other way."""
    assert not any(m.startswith("usbipx.protocol") for m in _usbipx_imports("usbipx.usbdevice"))
    assert _usbipx_imports("usbipx.usbdevice") <= {
        "usbipx.errors", "usbipx.errors.ProtocolError", "usbipx.errors.ValidationError",
        "usbipx.names", "usbipx.names.validate_busid"}
    assert p.UsbDevice is __import__("usbipx.usbdevice").usbdevice.UsbDevice


def test_export_refusals_have_their_own_words() -> None:
    from usbipx.errors import RemoteError

    assert p.status_text(2) == "ST_DEV_BUSY: device busy (exported or no free port)"
    busy = p.status_text(2, p.OP_REP_EXPORT)
    assert busy.startswith("ST_DEV_BUSY: ") and "live attachment of this bus id" in busy
    assert p.status_text(2, p.OP_REQ_EXPORT) == busy
    assert str(RemoteError(2, "export of 1-1 to h refused", p.OP_REQ_EXPORT)) == \
        f"export of 1-1 to h refused: {busy}"
    assert str(RemoteError(2, "import 1-1 from h")) == \
        "import 1-1 from h: ST_DEV_BUSY: device busy (exported or no free port)"
    assert p.status_text(4, p.OP_REQ_EXPORT) == "ST_NODEV: device not found"
    assert p.status_text(1, p.OP_REQ_EXPORT) == p.status_text(1)  # the generic words suffice
