"""TLS records on the wire: their headers, cutting a stream into whole records, and
the hello randoms in the plaintext handshake.

Only what :mod:`usbipx.tlsengine` must see itself: OpenSSL does the rest.
"""

from __future__ import annotations

RECORD_HEADER = 5
MAX_RECORD_BODY = (1 << 14) + 2048
"""TLSCiphertext.length limit (RFC 5246 6.2.3; TLS 1.3 allows less)."""

CT_CHANGE_CIPHER_SPEC = 20
CT_ALERT = 21
CT_HANDSHAKE = 22
CT_APPLICATION_DATA = 23

HS_CLIENT_HELLO = 1
HS_SERVER_HELLO = 2
_HELLO_PREFIX = 38
"""Handshake header (4), legacy_version (2), random (32)."""


def record_length(header: bytes | bytearray) -> int:
    """The body length of a record header; ValueError if it is no TLS record."""
    content_type, major, length = header[0], header[1], int.from_bytes(header[3:5], "big")
    if (content_type not in (CT_CHANGE_CIPHER_SPEC, CT_ALERT, CT_HANDSHAKE, CT_APPLICATION_DATA)
            or major != 3 or length > MAX_RECORD_BODY):
        raise ValueError(f"not a TLS record (header {bytes(header).hex()})")
    return length


class RecordFramer:
    """Cuts a byte stream into whole TLS records, checking each header."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._size = RECORD_HEADER  # of the current record: header only until it is known

    def needed(self) -> int:
        """Bytes the current record still wants (5 for a header)."""
        return self._size - len(self._buf)

    @property
    def held(self) -> int:
        """Bytes of an incomplete record."""
        return len(self._buf)

    def push(self, data: bytes | memoryview) -> bytes | None:
        """Add at most :meth:`needed` bytes; the record they complete, if any.
        ValueError for a header that is no TLS record (the stream is lost then)."""
        self._buf += data
        if self._size == RECORD_HEADER and len(self._buf) == RECORD_HEADER:
            self._size += record_length(self._buf)
        if len(self._buf) < self._size:
            return None
        record = bytes(self._buf)
        self._buf.clear()
        self._size = RECORD_HEADER
        return record


class HelloRandom:
    """The random of one direction's first handshake message (a plaintext hello),
    which may be split over several records."""

    def __init__(self, msg_type: int) -> None:
        self._type = msg_type
        self._buf = bytearray()
        self.done = False
        self.value = b""

    def feed(self, record: bytes) -> None:
        """Look at the next record of this direction."""
        if self.done:
            return
        if record[0] != CT_HANDSHAKE:
            self.done = True  # no hello first: nothing to learn
            return
        self._buf += record[RECORD_HEADER:RECORD_HEADER + _HELLO_PREFIX - len(self._buf)]
        if len(self._buf) >= _HELLO_PREFIX:
            self.done = True
            if self._buf[0] == self._type:
                self.value = bytes(self._buf[6:_HELLO_PREFIX])
