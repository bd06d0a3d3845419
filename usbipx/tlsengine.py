"""A sans-IO TLS engine (bytes in, bytes out) that can hand its session to kernel TLS.

:class:`TlsEngine` runs OpenSSL (``SSLContext.wrap_bio`` over two MemoryBIOs)
and moves no bytes itself: the caller feeds what it reads from the network
with :meth:`~TlsEngine.receive` and sends what :meth:`~TlsEngine.outgoing`
returns.  Input is taken one TLS record at a time (:meth:`~TlsEngine.needed`
says how many bytes the current record still wants), so a caller never reads
past the last record user space needs: what follows belongs to the kernel.

The engine counts the records each way under the application keys, which
become the kernel's first record sequence numbers:

* TLS 1.3: records after the handshake completed.  A server's completing step
  may already write under the application keys (session tickets); a client's
  (its Finished) does not.  Records received count from the first one OpenSSL
  had not yet consumed when the handshake completed.
* TLS 1.2: records after each direction's ChangeCipherSpec (Finished is 0).

:meth:`~TlsEngine.kernel_crypto` derives the kernel's structs from the traffic
secrets (see :mod:`usbipx.tlskeylog` for how they are obtained) and those
counts.  Then the engine is spent: the kernel owns the connection.

:mod:`usbipx.tlsio` drives an engine over a socket, one record at a time.
"""

from __future__ import annotations

import bisect
import re
import ssl
import weakref
from typing import Any, cast

from usbipx import ktls, tlskeylog
from usbipx.errors import UsbipError
from usbipx.ktls import KtlsUnavailable
from usbipx.tlsrecord import (
    CT_APPLICATION_DATA,
    CT_CHANGE_CIPHER_SPEC,
    HS_CLIENT_HELLO,
    HS_SERVER_HELLO,
    RECORD_HEADER,
    HelloRandom,
    RecordFramer,
)

_READ_CHUNK = 1 << 16


class TlsError(UsbipError):
    """A TLS handshake or connection failed; the message is one line and names no
    peer (callers prefix it)."""


class TlsClosed(TlsError):
    """The peer ended the TLS connection in order (close_notify)."""


def describe_ssl_error(exc: ssl.SSLError) -> str:
    """OpenSSL's reason in words: ``certificate verify failed (certificate has
    expired)``, ``peer sent TLS alert unknown ca``..."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed ({exc.verify_message})"
    if isinstance(exc, ssl.SSLZeroReturnError):
        return "peer closed the TLS connection"
    reason = exc.reason or ""
    alert = re.fullmatch(r"(?:SSLV3|TLSV1|TLSV13)_ALERT_(\w+)", reason)
    if alert:
        return f"peer sent TLS alert {alert[1].lower().replace('_', ' ')}"
    if reason:
        return reason.lower().replace("_", " ")
    return str(exc) or type(exc).__name__


class TlsEngine:
    """One TLS connection, sans IO; not thread-safe.

    ``ctx`` may be shared between connections (its key log is, see
    :mod:`usbipx.tlskeylog`).  Without a usable key log the engine still works;
    only :meth:`kernel_crypto` then raises :class:`KtlsUnavailable`.
    Call :meth:`close` when done (a forgotten engine is cleaned up when
    collected).
    """

    def __init__(self, ctx: ssl.SSLContext, server_side: bool,
                 server_hostname: str | None = None) -> None:
        self._server_side = server_side
        self._no_ktls = ""  # why kernel_crypto cannot work, once known
        self._lease: tlskeylog.Lease | None = None
        try:
            self._lease = tlskeylog.lease(ctx)
        except KtlsUnavailable as exc:
            self._no_ktls = str(exc)
        self._in = ssl.MemoryBIO()
        self._out_bio = ssl.MemoryBIO()
        try:
            self._obj = ctx.wrap_bio(self._in, self._out_bio, server_side=server_side,
                                     server_hostname=server_hostname)
        except BaseException:
            if self._lease is not None:
                self._lease.release()
            raise
        self._release = weakref.finalize(self, _release, self._lease)
        self._rx = RecordFramer()
        self._tx = RecordFramer()
        self._out = bytearray()
        self._hello_in = HelloRandom(HS_CLIENT_HELLO if server_side else HS_SERVER_HELLO)
        self._hello_out = HelloRandom(HS_SERVER_HELLO if server_side else HS_CLIENT_HELLO)
        self._rx_count = 0
        self._tx_count = 0
        self._rx_ccs: list[int] = []  # record counts right after each ChangeCipherSpec
        self._tx_ccs: list[int] = []
        self._rx_fed = 0  # bytes given to OpenSSL
        self._rx_ends: list[int] = []  # where each record fed before completion ends
        self._rx_app_base = 0  # TLS 1.3: records before the application keys
        self._tx_app_base = 0
        self._tx_last_nonce = b""  # first 8 body bytes of the last record sent
        self._complete = False
        self._failure: TlsError | None = None
        self._closed: TlsError | None = None  # the peer ended the connection
        self._spent = ""  # why the engine may no longer be used
        self._secrets: dict[str, bytes] = {}

    # -- input and output ------------------------------------------------------

    def needed(self) -> int:
        """Bytes the next :meth:`receive` wants: 5 for a record header, else the
        rest of the current record's body.  Never more than that record."""
        return self._rx.needed()

    def receive(self, data: bytes) -> None:
        """Feed at most :meth:`needed` bytes read from the network."""
        self._check_usable()
        if self._failure is not None:
            raise TlsError(str(self._failure))
        if len(data) > self._rx.needed():
            raise ValueError(f"receive: {len(data)} bytes, but the record wants "
                             f"{self._rx.needed()}")
        if not data:
            return
        try:
            record = self._rx.push(data)
        except ValueError as exc:  # not a TLS record: no way to resync
            self._failure = TlsError(str(exc))
            raise TlsError(str(exc)) from None
        if record is not None:
            self._received(record)

    def receive_any(self, data: bytes) -> None:
        """Feed any amount (for the relay, when record-exact reads do not matter)."""
        view = memoryview(data)
        while view:
            n = min(self._rx.needed(), len(view))
            self.receive(bytes(view[:n]))
            view = view[n:]

    def outgoing(self) -> bytes:
        """Everything to send now (b"" if nothing)."""
        self._check_usable()
        self._collect()
        data = bytes(self._out)
        self._out.clear()
        return data

    @property
    def records_received(self) -> int:
        """Whole records received so far (lets a driver read exactly one)."""
        return self._rx_count

    @property
    def records_sent(self) -> int:
        """Whole records OpenSSL has written so far."""
        return self._tx_count

    def _received(self, record: bytes) -> None:
        self._rx_count += 1
        self._hello_in.feed(record)
        self._note_randoms()
        if record[0] == CT_CHANGE_CIPHER_SPEC:
            self._rx_ccs.append(self._rx_count)
        elif self._complete and record[0] != CT_APPLICATION_DATA:
            self._irregular(f"the peer sent a TLS record of type {record[0]} after the handshake")
        self._in.write(record)
        self._rx_fed += len(record)
        if not self._complete:
            self._rx_ends.append(self._rx_fed)

    def _collect(self) -> None:
        """Move what OpenSSL wrote to our buffer, counting its records."""
        data = self._out_bio.read()
        view = memoryview(data)
        while view:
            n = min(self._tx.needed(), len(view))
            record = self._tx.push(view[:n])
            view = view[n:]
            if record is not None:
                self._sent(record)
        self._out += data

    def _sent(self, record: bytes) -> None:
        self._tx_count += 1
        self._hello_out.feed(record)
        self._note_randoms()
        if record[0] == CT_CHANGE_CIPHER_SPEC:
            self._tx_ccs.append(self._tx_count)
        elif self._complete and record[0] != CT_APPLICATION_DATA:
            self._irregular(f"we sent a TLS record of type {record[0]} after the handshake")
        self._tx_last_nonce = record[RECORD_HEADER:RECORD_HEADER + 8]

    def _note_randoms(self) -> None:
        if self._lease is not None and not self._lease.client_random:
            self._lease.client_random = self._client_random()

    def _client_random(self) -> bytes:
        return (self._hello_in if self._server_side else self._hello_out).value

    def _server_random(self) -> bytes:
        # TLS 1.2 only (1.3 keys do not use it), where no HelloRetryRequest exists.
        return (self._hello_out if self._server_side else self._hello_in).value

    def _irregular(self, why: str) -> None:
        if not self._no_ktls:
            self._no_ktls = f"{why}: the session cannot go to the kernel"

    # -- handshake -------------------------------------------------------------

    def handshake(self) -> bool:
        """One handshake step; True once complete.  TlsError on failure, after
        which :meth:`outgoing` may hold an alert to send."""
        self._check_usable()
        if self._complete:
            return True
        if self._failure is not None:
            raise TlsError(str(self._failure))
        sent_before = self._tx_count
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            self._collect()
            return False
        except ssl.SSLError as exc:
            self._collect()
            self._failure = TlsError(f"TLS handshake failed: {describe_ssl_error(exc)}")
            self._end_lease()  # wipe the handshake secrets now
            raise TlsError(str(self._failure)) from None
        self._collect()
        self._completed(sent_before)
        return True

    def _completed(self, sent_before: int) -> None:
        self._complete = True
        # TLS 1.3 application keys start now.  A server's completing step may have
        # written under them already (tickets); a client's (Finished) has not.
        self._tx_app_base = sent_before if self._server_side else self._tx_count
        consumed = self._rx_fed - self._in.pending
        self._rx_app_base = bisect.bisect_right(self._rx_ends, consumed)
        if consumed and (not self._rx_app_base or self._rx_ends[self._rx_app_base - 1] != consumed):
            self._irregular("OpenSSL stopped inside a record at the end of the handshake")
        self._rx_ends.clear()
        if self._lease is not None:
            self._release.detach()
            lease, self._lease = self._lease, None
            try:
                found = lease.take(self._client_random())
            except KtlsUnavailable as exc:
                self._no_ktls = str(exc)
            else:  # keep no more than the kernel needs (no handshake or exporter secrets)
                self._secrets = {k: v for k, v in found.items() if k in ktls.KEY_LABELS}

    def _end_lease(self) -> None:
        """Give the key log lease back without taking the secrets (wiping them)."""
        self._release()  # runs the finalizer once: lease.release()
        self._lease = None

    @property
    def complete(self) -> bool:
        """The handshake is complete."""
        return self._complete

    def peercert(self) -> dict[str, Any] | None:
        """The peer's certificate as :meth:`ssl.SSLObject.getpeercert` gives it,
        once the handshake is complete."""
        if not self._complete:
            return None
        return cast("dict[str, Any] | None", self._obj.getpeercert())

    @property
    def version(self) -> str | None:
        """``TLSv1.3``/``TLSv1.2`` once the handshake is complete."""
        return self._obj.version() if self._complete else None

    @property
    def cipher(self) -> str | None:
        """The negotiated suite's OpenSSL name once the handshake is complete."""
        info = self._obj.cipher() if self._complete else None
        return info[0] if info else None

    # -- application data ------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Encrypt ``data``: its records appear in :meth:`outgoing`."""
        self._check_ready()
        try:
            self._obj.write(data)
        except ssl.SSLError as exc:
            raise TlsError(f"TLS connection failed: {describe_ssl_error(exc)}") from None
        finally:
            self._collect()

    def read(self) -> bytes:
        """All plaintext available now (b"" if none).  :class:`TlsClosed` once the
        peer sent close_notify, TlsError after an alert or a bad record; plaintext
        that came before either is returned first."""
        self._check_ready()
        chunks: list[bytes] = []
        while self._closed is None:
            try:
                chunk = self._obj.read(_READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._closed = TlsClosed("peer closed the TLS connection")
            except ssl.SSLError as exc:
                self._closed = TlsError(f"TLS connection failed: {describe_ssl_error(exc)}")
            else:
                if chunk:
                    chunks.append(chunk)
                else:  # how SSLObject reports a close_notify
                    self._closed = TlsClosed("peer closed the TLS connection")
        self._collect()
        if chunks or self._closed is None:
            return b"".join(chunks)
        raise type(self._closed)(str(self._closed))

    def pending(self) -> int:
        """Input bytes still in user space: plaintext not yet read, records not
        yet decrypted, and a partial record.  Must be 0 before a kernel handoff."""
        return self._obj.pending() + self._in.pending + self._rx.held

    # -- the handoff -----------------------------------------------------------

    def kernel_crypto(self) -> tuple[bytes, bytes]:
        """(tx_info, rx_info) for :func:`usbipx.ktls.install`, with the next record
        sequence number of each direction.

        :class:`KtlsUnavailable` if the session cannot go to the kernel (version,
        suite, no secrets, input still in user space...); the engine then stays
        usable (e.g. for the relay).  TlsError if the peer already ended the
        connection.  On success the engine is spent: any further
        use raises.  Everything :meth:`outgoing` returned must be sent before the
        kernel sends anything; unsent output here is a RuntimeError.
        """
        self._check_ready()
        if self._out or self._out_bio.pending:
            raise RuntimeError("kernel_crypto: send outgoing() first")
        if self._closed is not None:
            raise type(self._closed)(str(self._closed))
        pending = self.pending()
        if pending:
            raise KtlsUnavailable(f"{pending} bytes of TLS input are still in user space")
        try:
            if self._no_ktls:
                raise KtlsUnavailable(self._no_ktls)
            version, cipher = self.version or "", self.cipher or ""
            tx_seq, rx_seq = self._sequence_numbers(version)
            nonce = (int.from_bytes(self._tx_last_nonce, "big") + 1
                     if len(self._tx_last_nonce) == 8 else None)
            info = ktls.key_info(version, cipher, self._secrets, server_side=self._server_side,
                                 tx_seq=tx_seq, rx_seq=rx_seq,
                                 client_random=self._client_random(),
                                 server_random=self._server_random(), tx_explicit_nonce=nonce)
        except KtlsUnavailable:
            self._secrets.clear()  # permanent: the relay does not need them
            raise
        self._spent = "it was handed to the kernel"
        self._secrets.clear()
        return info

    def _sequence_numbers(self, version: str) -> tuple[int, int]:
        if version == "TLSv1.3":
            return self._tx_count - self._tx_app_base, self._rx_count - self._rx_app_base
        if len(self._tx_ccs) != 1 or len(self._rx_ccs) != 1:
            raise KtlsUnavailable("TLS 1.2 session without exactly one ChangeCipherSpec "
                                  "each way (renegotiated?)")
        return self._tx_count - self._tx_ccs[0], self._rx_count - self._rx_ccs[0]

    def close(self) -> None:
        """Drop the secrets and release the key log.  Idempotent."""
        if not self._spent:
            self._spent = "it was closed"
        self._secrets.clear()
        self._end_lease()

    # -- guards ----------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._spent:
            raise RuntimeError(f"TLS engine used after {self._spent}")

    def _check_ready(self) -> None:
        self._check_usable()
        if not self._complete:
            raise RuntimeError("TLS engine: the handshake is not complete")


def _release(lease: tlskeylog.Lease | None) -> None:
    if lease is not None:
        lease.release()
