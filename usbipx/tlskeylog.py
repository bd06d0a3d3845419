"""TLS secrets of our own connections, from an in-memory key log shared per SSLContext.

Kernel TLS needs each connection's traffic secrets; Python 3.11 has no API for
them.  The one stdlib route is OpenSSL's key log (``SSLContext.keylog_filename``,
NSS format: ``LABEL <client random> <secret>`` lines).  Its target here is a
``memfd`` reached as ``/proc/self/fd/N``: the secrets never touch a filesystem.

The key log belongs to the *context*, and daemons share one context between
connections, so:

* Each context gets one memfd, set as its key log once and never switched
  while it is in use.  (Switching it per connection would send a concurrent
  handshake's lines to the wrong file, and CPython frees the old log while
  another thread's keylog callback may still be writing to it.)
* Every engine takes a :class:`Lease` before its handshake starts.  After the
  handshake it :meth:`Lease.take` s the lines whose client random is its own;
  those lines are then overwritten with zeros in place (appends of other
  handshakes land after them, so this cannot race).  Whenever no lease on the
  context is open, the memfd is truncated to zero: no handshake is in flight
  that could still need, or be writing, a line.
* A forked child never touches its parent's memfd (the same memory object):
  its first lease on a context gives the context a fresh memfd of its own.

Secrets still pass through Python objects and OpenSSL's memory; Python offers
no way to wipe those.  A context handed to :class:`usbipx.tlsengine.TlsEngine`
should carry only engine connections: lines of other connections on it stay in
the memfd until it is next truncated.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import threading
import weakref

from usbipx.ktls import KtlsUnavailable
from usbipx.log import logger

# Reentrant: a context's finalizer (closing its log) may run from the garbage
# collector while this thread holds the lock for another context.
_lock = threading.RLock()
_logs: weakref.WeakKeyDictionary[ssl.SSLContext, _ContextLog] = weakref.WeakKeyDictionary()


class _ContextLog:
    """The memfd key log of one SSLContext in this process."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.pid = os.getpid()
        self.fd = os.memfd_create("usbipx-tls-keylog", os.MFD_CLOEXEC)
        self.path = f"/proc/self/fd/{self.fd}"
        self.users = 0
        try:
            ctx.keylog_filename = self.path
        except OSError:
            self.close()
            raise
        # Closing the context closes OpenSSL's FILE on the memfd; ours goes with it.
        weakref.finalize(ctx, self.close)

    def close(self) -> None:
        with _lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self.fd >= 0 and self.pid == os.getpid():
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            # Also a finalizer's work, which must not raise (the fd may be gone).
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.fd = -1

    def current(self) -> bool:
        """Still usable by this process (not inherited over fork, not closed)."""
        return self.fd >= 0 and self.pid == os.getpid()

    def take_lines(self, client_random: bytes) -> dict[str, bytes]:
        """The secrets of ``client_random`` (label -> secret), wiped from the memfd.
        Caller holds ``_lock``."""
        if not self.current() or not client_random:
            return {}
        want = client_random.hex().encode("ascii")
        size = os.fstat(self.fd).st_size
        data = os.pread(self.fd, size, 0) if size else b""
        found: dict[str, bytes] = {}
        ambiguous = False
        pos = 0
        # Only whole lines: another handshake may be appending right now.
        while (end := data.find(b"\n", pos)) >= 0:
            parts = data[pos:end].split()
            if len(parts) == 3 and parts[1].lower() == want:
                os.pwrite(self.fd, bytes(end - pos), pos)
                label, secret = parts[0].decode("ascii", "replace"), _unhex(parts[2])
                if label in found and found[label] != secret:
                    ambiguous = True
                found[label] = secret
            pos = end + 1
        if ambiguous:
            # Two handshakes with one client random: a replayed ClientHello.
            # We cannot tell which lines are ours; fail closed.
            raise KtlsUnavailable("the TLS key log holds two sessions with this client "
                                  "random (a replayed ClientHello?)")
        return found

    def leave(self) -> None:
        """One lease ended; truncate when none is open.  Caller holds ``_lock``."""
        self.users -= 1
        if self.users <= 0 and self.current():
            self.users = 0
            # Housekeeping only (every line is zeroed already), and this runs from
            # engines' finalizers too, where an error could only print.
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)


def _unhex(text: bytes) -> bytes:
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return b""


class Lease:
    """One connection's claim on its context's key log: open from before the
    handshake until :meth:`take` or :meth:`release` (whichever first)."""

    def __init__(self, log: _ContextLog, ctx: ssl.SSLContext) -> None:
        self._log: _ContextLog | None = log
        # Keeps the context (so its log) alive while the lease is open.
        self._ctx: ssl.SSLContext | None = ctx
        self.client_random = b""
        """Set by the owner once known, so :meth:`release` can wipe this
        connection's lines (e.g. after a failed handshake)."""

    def take(self, client_random: bytes) -> dict[str, bytes]:
        """This connection's secrets (label -> secret); ends the lease.

        Raises :class:`KtlsUnavailable` if the log cannot tell this connection's
        lines from another's.
        """
        with _lock:
            log, self._log, self._ctx = self._log, None, None
            if log is None:
                return {}
            try:
                return log.take_lines(client_random)
            finally:
                log.leave()

    def release(self) -> None:
        """End the lease without using the secrets (wiping them).  Idempotent."""
        with _lock:
            log, self._log, self._ctx = self._log, None, None
            if log is None:
                return
            try:
                log.take_lines(self.client_random)
            except (KtlsUnavailable, OSError):
                pass  # wiped anyway; nobody needs them
            finally:
                log.leave()


def lease(ctx: ssl.SSLContext) -> Lease:
    """A lease on ``ctx``'s key log, set up on the first call for ``ctx``.

    Raises :class:`KtlsUnavailable` if this system offers no memfd key log
    (no ``memfd_create``, no ``/proc``).
    """
    with _lock:
        log = _logs.get(ctx)
        if log is None or not log.current():
            try:
                log = _ContextLog(ctx)
            except OSError as exc:
                raise KtlsUnavailable(f"no in-memory TLS key log: {exc.strerror or exc}") \
                    from None
            _logs[ctx] = log
        elif ctx.keylog_filename != log.path:
            # Someone re-pointed the context's key log: take it back.
            logger.warning("TLS key log of a context was changed; resetting it")
            try:
                ctx.keylog_filename = log.path
            except OSError as exc:
                raise KtlsUnavailable(f"cannot reset the TLS key log: {exc.strerror or exc}") \
                    from None
        log.users += 1
        return Lease(log, ctx)


def _after_fork_in_child() -> None:
    """The parent's locks and memfds are not the child's to use."""
    global _lock
    _lock = threading.RLock()
    for log in list(_logs.values()):
        if log.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(log.fd)  # our copy only: the parent's memfd lives on
        log.fd = -1
    _logs.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
