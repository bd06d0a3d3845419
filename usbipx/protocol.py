"""The USB/IP operation protocol as a sans-IO codec: bytes in, PDUs out.

Every PDU starts with the 8-byte operation header (``version``, ``code``,
``status``, all big-endian).  The bodies:

========================  ===========================================================
OP_REQ_DEVLIST  0x8005    nothing
OP_REP_DEVLIST  0x0005    u32 count, then per device a 312-byte device record and
                          ``bNumInterfaces`` 4-byte interface records
OP_REQ_IMPORT   0x8003    32-byte bus id
OP_REP_IMPORT   0x0003    312-byte device record (only when status is ST_OK)
OP_REQ_EXPORT   0x8006    312-byte device record
OP_REP_EXPORT   0x0006    nothing
OP_REQ_UNEXPORT 0x8007    312-byte device record
OP_REP_UNEXPORT 0x0007    nothing
========================  ===========================================================

The device and interface records are :mod:`usbipx.usbdevice`'s.  A reply
whose status is not ST_OK carries no body (as Linux's ``usbipd`` sends it).
Nothing here touches a socket: :class:`RequestDecoder` and
:class:`ReplyDecoder` take bytes and yield PDUs, h11 style.  They decode
incrementally, record by record, and keep no byte they have parsed, so a
PDU costs time linear in its size however it is split.  ``needed()`` says
how many more bytes the next record needs so that callers never read past a
PDU: the rest of the stream belongs to the kernel once the socket is handed
over.

Every field from the wire is validated before it is returned: version, op
code, status, bounded counts, and the records' own fields (NUL-terminated
strings of the expected characters, a known speed...).  Anything else
raises :class:`ProtocolError`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeAlias, TypeVar

from usbipx import status as _status
from usbipx import usbdevice as _usbdevice
from usbipx.errors import ProtocolError, ValidationError
from usbipx.names import validate_busid
from usbipx.usbdevice import (
    BUSID_CHARS,
    DEVICE_SIZE,
    INTERFACE_SIZE,
    SYSFS_BUS_ID_SIZE,
    decode_cstr,
)

# The status codes and their texts live in the leaf module usbipx.status;
# these names keep ``from usbipx.protocol import Status`` working.
Status = _status.Status
status_text = _status.status_text

# The records the PDUs carry live in usbipx.usbdevice; these names keep
# ``protocol.UsbDevice``, ``protocol.Speed``... working for code that builds
# and reads PDUs.
Speed = _usbdevice.Speed
UsbInterface = _usbdevice.UsbInterface
UsbDevice = _usbdevice.UsbDevice
ExportableDevice = _usbdevice.ExportableDevice

USBIP_VERSION = 0x0111

OP_REQUEST = 0x80 << 8
OP_REPLY = 0x00 << 8
OP_IMPORT = 0x03
OP_DEVLIST = 0x05
OP_EXPORT = _status.OP_EXPORT
OP_UNEXPORT = 0x07

OP_REQ_IMPORT = OP_REQUEST | OP_IMPORT
OP_REP_IMPORT = OP_REPLY | OP_IMPORT
OP_REQ_DEVLIST = OP_REQUEST | OP_DEVLIST
OP_REP_DEVLIST = OP_REPLY | OP_DEVLIST
OP_REQ_EXPORT = OP_REQUEST | OP_EXPORT
OP_REP_EXPORT = OP_REPLY | OP_EXPORT
OP_REQ_UNEXPORT = OP_REQUEST | OP_UNEXPORT
OP_REP_UNEXPORT = OP_REPLY | OP_UNEXPORT

HEADER_SIZE = 8
MAX_DEVICES = 1024
"""Most devices accepted in one DEVLIST reply (a kernel has 8 x 15 usbip ports per kind)."""

_HEADER = struct.Struct(">HHI")
_COUNT = struct.Struct(">I")


def _pack_header(code: int, status: int = Status.ST_OK) -> bytes:
    return _HEADER.pack(USBIP_VERSION, code, status)


@dataclass(frozen=True)
class DevlistRequest:
    """OP_REQ_DEVLIST: ask a usbipd for its exportable devices."""

    CODE: ClassVar[int] = OP_REQ_DEVLIST

    def pack(self) -> bytes:
        return _pack_header(self.CODE)


@dataclass(frozen=True)
class DevlistReply:
    """OP_REP_DEVLIST: the exportable devices."""

    devices: tuple[ExportableDevice, ...] = ()
    status: Status = Status.ST_OK

    CODE: ClassVar[int] = OP_REP_DEVLIST

    def pack(self) -> bytes:
        if self.status != Status.ST_OK:
            return _pack_header(self.CODE, self.status)
        parts = [_pack_header(self.CODE), _COUNT.pack(len(self.devices))]
        for d in self.devices:
            parts.append(d.device.pack())
            parts.extend(i.pack() for i in d.interfaces)
        return b"".join(parts)


@dataclass(frozen=True)
class ImportRequest:
    """OP_REQ_IMPORT: attach the device ``busid`` of a usbipd."""

    busid: str

    CODE: ClassVar[int] = OP_REQ_IMPORT

    def __post_init__(self) -> None:
        validate_busid(self.busid)

    def pack(self) -> bytes:
        return _pack_header(self.CODE) + struct.pack(">32s", self.busid.encode())


@dataclass(frozen=True)
class ImportReply:
    """OP_REP_IMPORT: the device record on ST_OK, nothing otherwise."""

    status: Status
    device: UsbDevice | None = None

    CODE: ClassVar[int] = OP_REP_IMPORT

    def __post_init__(self) -> None:
        if (self.status == Status.ST_OK) != (self.device is not None):
            raise ValidationError("an import reply carries a device exactly when it is ST_OK")

    def pack(self) -> bytes:
        body = self.device.pack() if self.device is not None else b""
        return _pack_header(self.CODE, self.status) + body


@dataclass(frozen=True)
class ExportRequest:
    """OP_REQ_EXPORT: the device side offers ``device`` to a usbipa."""

    device: UsbDevice

    CODE: ClassVar[int] = OP_REQ_EXPORT

    def pack(self) -> bytes:
        return _pack_header(self.CODE) + self.device.pack()


@dataclass(frozen=True)
class UnexportRequest:
    """OP_REQ_UNEXPORT: the device side withdraws ``device`` from a usbipa."""

    device: UsbDevice

    CODE: ClassVar[int] = OP_REQ_UNEXPORT

    def pack(self) -> bytes:
        return _pack_header(self.CODE) + self.device.pack()


@dataclass(frozen=True)
class ExportReply:
    """OP_REP_EXPORT: status only."""

    status: Status = Status.ST_OK

    CODE: ClassVar[int] = OP_REP_EXPORT

    def pack(self) -> bytes:
        return _pack_header(self.CODE, self.status)


@dataclass(frozen=True)
class UnexportReply:
    """OP_REP_UNEXPORT: status only."""

    status: Status = Status.ST_OK

    CODE: ClassVar[int] = OP_REP_UNEXPORT

    def pack(self) -> bytes:
        return _pack_header(self.CODE, self.status)


Request: TypeAlias = DevlistRequest | ImportRequest | ExportRequest | UnexportRequest
Reply: TypeAlias = DevlistReply | ImportReply | ExportReply | UnexportReply

REQUEST_TYPES: dict[int, type[Request]] = {
    t.CODE: t for t in (DevlistRequest, ImportRequest, ExportRequest, UnexportRequest)
}
REPLY_TYPES: dict[int, type[Reply]] = {
    t.CODE: t for t in (DevlistReply, ImportReply, ExportReply, UnexportReply)
}


def _check_header(record: bytes) -> tuple[int, int]:
    version, code, status = _HEADER.unpack(record)
    if version != USBIP_VERSION:
        raise ProtocolError(f"unsupported USB/IP version 0x{version:04x} (want 0x0111)")
    return code, status


E = TypeVar("E")
Step = Callable[[bytes], E | None]


class _Decoder(Generic[E]):
    """Incremental decoding, one fixed-size record at a time.

    A PDU is a sequence of records (header, count, device, interface...) whose
    sizes the earlier ones determine.  The decoder keeps its place in that
    sequence (``_step`` parses the next record of ``_want`` bytes) and what it
    has decoded so far, and drops every byte it has parsed: each byte is
    examined once, whatever the size of the PDU or of the pieces it arrives
    in, and the buffer never holds more than one record plus the last piece
    received.  After a :class:`ProtocolError` the stream is unusable and every
    later :meth:`next_event` raises it again.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._error: ProtocolError | None = None
        self._begin()

    def _begin(self) -> None:
        """Wait for the header of the next PDU."""
        self._want = HEADER_SIZE
        self._step: Step[E] = self._header
        self._decoded = 0  # bytes of the PDU in progress already parsed and dropped

    def _header(self, record: bytes) -> E | None:
        raise NotImplementedError

    def _expect(self, size: int, step: Step[E]) -> None:
        """The next record is ``size`` bytes, parsed by ``step``."""
        self._want, self._step = size, step

    def receive_data(self, data: bytes) -> None:
        """Append bytes received from the peer."""
        self._buf += data

    def needed(self) -> int:
        """Bytes still missing before the next record can be parsed (0 if it can be, or
        after an error).  Reading exactly this many never reads past the PDU."""
        if self._error is not None:
            return 0
        return max(self._want - len(self._buf), 0)

    @property
    def unconsumed(self) -> bytes:
        """Bytes received and not parsed yet (after a PDU: what followed it)."""
        return bytes(self._buf)

    @property
    def pending(self) -> int:
        """Bytes received since the last complete PDU (parsed or not)."""
        return self._decoded + len(self._buf)

    def next_event(self) -> E | None:
        """The next complete PDU, or None if more bytes are needed.

        Raises :class:`ProtocolError` as soon as the bytes cannot be a valid PDU.
        """
        if self._error is not None:
            raise self._error
        pos = 0
        try:
            while len(self._buf) - pos >= self._want:
                record = bytes(self._buf[pos:pos + self._want])
                pos += self._want
                self._decoded += self._want
                event = self._step(record)
                if event is not None:
                    self._begin()
                    return event
            return None
        except ProtocolError as exc:
            self._error = exc
            raise
        finally:
            del self._buf[:pos]


class RequestDecoder(_Decoder[Request]):
    """Server side: turns received bytes into request PDUs."""

    def _header(self, record: bytes) -> Request | None:
        code, status = _check_header(record)
        if code not in REQUEST_TYPES:
            raise ProtocolError(f"unknown request code 0x{code:04x}")
        if status != 0:
            raise ProtocolError(f"request 0x{code:04x} carries status {status}, not 0")
        if code == OP_REQ_DEVLIST:
            return DevlistRequest()
        if code == OP_REQ_IMPORT:
            self._expect(SYSFS_BUS_ID_SIZE, self._busid)
        else:
            self._code = code
            self._expect(DEVICE_SIZE, self._device)
        return None

    def _busid(self, record: bytes) -> Request:
        busid = decode_cstr(record, "bus id", BUSID_CHARS)
        try:
            return ImportRequest(busid)
        except ValidationError as exc:
            raise ProtocolError(str(exc)) from exc

    def _device(self, record: bytes) -> Request:
        dev = UsbDevice.unpack(record)
        return ExportRequest(dev) if self._code == OP_REQ_EXPORT else UnexportRequest(dev)


class ReplyDecoder(_Decoder[Reply]):
    """Client side: turns received bytes into the reply to ``request``."""

    def __init__(self, request: Request) -> None:
        self.expect = request.CODE & ~OP_REQUEST
        super().__init__()

    def _begin(self) -> None:
        super()._begin()
        self._devices: list[ExportableDevice] = []
        self._count = 0

    def _header(self, record: bytes) -> Reply | None:
        code, raw_status = _check_header(record)
        if code != self.expect:
            raise ProtocolError(f"reply code 0x{code:04x}, expected 0x{self.expect:04x}")
        try:
            status = Status(raw_status)
        except ValueError:
            raise ProtocolError(f"unknown status {raw_status} in reply 0x{code:04x}") from None
        if code == OP_REP_EXPORT:
            return ExportReply(status)
        if code == OP_REP_UNEXPORT:
            return UnexportReply(status)
        if code == OP_REP_IMPORT:
            if status != Status.ST_OK:
                return ImportReply(status)
            self._expect(DEVICE_SIZE, self._import_device)
            return None
        # OP_REP_DEVLIST
        if status != Status.ST_OK:
            return DevlistReply((), status)
        self._expect(_COUNT.size, self._devlist_count)
        return None

    def _import_device(self, record: bytes) -> Reply:
        return ImportReply(Status.ST_OK, UsbDevice.unpack(record))

    def _devlist_count(self, record: bytes) -> Reply | None:
        (count,) = _COUNT.unpack(record)
        if count > MAX_DEVICES:
            raise ProtocolError(f"device list of {count} devices exceeds {MAX_DEVICES}")
        self._count = count
        return self._next_device()

    def _next_device(self) -> Reply | None:
        if len(self._devices) == self._count:
            return DevlistReply(tuple(self._devices))
        self._expect(DEVICE_SIZE, self._devlist_device)
        return None

    def _devlist_device(self, record: bytes) -> Reply | None:
        self._device = UsbDevice.unpack(record)
        self._interfaces: list[UsbInterface] = []
        if self._device.num_interfaces == 0:
            return self._device_done()
        self._expect(INTERFACE_SIZE, self._devlist_interface)
        return None

    def _devlist_interface(self, record: bytes) -> Reply | None:
        self._interfaces.append(UsbInterface.unpack(record))
        if len(self._interfaces) < self._device.num_interfaces:
            return None  # the same step again
        return self._device_done()

    def _device_done(self) -> Reply | None:
        self._devices.append(ExportableDevice(self._device, tuple(self._interfaces)))
        return self._next_device()


def decode_request(data: bytes) -> Request:
    """Decode exactly one complete request; trailing or missing bytes are errors."""
    dec = RequestDecoder()
    dec.receive_data(data)
    req = dec.next_event()
    if req is None:
        raise ProtocolError(f"truncated request: {len(data)} bytes, "
                            f"need at least {dec.needed()} more")
    if dec.unconsumed:
        raise ProtocolError(f"{len(dec.unconsumed)} bytes after the request")
    return req


def decode_reply(request: Request, data: bytes) -> Reply:
    """Decode exactly one complete reply to ``request``."""
    dec = ReplyDecoder(request)
    dec.receive_data(data)
    rep = dec.next_event()
    if rep is None:
        raise ProtocolError(f"truncated reply: {len(data)} bytes, "
                            f"need at least {dec.needed()} more")
    if dec.unconsumed:
        raise ProtocolError(f"{len(dec.unconsumed)} bytes after the reply")
    return rep
