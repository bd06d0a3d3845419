"""Ownership records: the lease each export holds, on disk, so that a successor can
release it.

A record is one JSON file per export key in a directory only root may use
(``connect`` keeps its own in ``/run/usbipx/exports``, the supervisor in its
``state_dir``).  The records decide what gets unbound, removed or killed, so
the store trusts nothing it did not make: the directory must be a real
directory owned by us (root) with mode 0700, files are written and read
with ``O_NOFOLLOW``, and every field read back is validated.  A record that
fails validation is reported and ignored, never acted on.

A record also names the process that wrote it (pid, start time and command
line): :meth:`OwnershipStore.writer_alive` tells a live writer from a reused
pid, so that a supervisor never waits for, or kills, a process that is not
its predecessor's worker.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from usbipx.errors import UsbipError, ValidationError
from usbipx.lease import Lease
from usbipx.log import logger
from usbipx.procfs import Proc

_KEY = re.compile(r"[A-Za-z0-9._:@-]{1,200}")
_REMOTE = re.compile(r"[A-Za-z0-9._:\[\]/%-]{1,300}")
_MAX_RECORD = 64 * 1024
TRANSPORTS = ("tcp", "ktls", "tls-relay", "wss-relay")


@dataclass(frozen=True)
class Owned:
    """One export's record: its lease, where it went, and who wrote it."""

    key: str
    lease: Lease | None = None
    remote: str | None = None
    transport: str | None = None
    """What carries the export's data (``tcp``, ``ktls``, ``tls-relay``)."""
    pid: int | None = None
    starttime: int | None = None
    cmdline: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "lease": self.lease.to_json() if self.lease else None,
                "remote": self.remote, "transport": self.transport, "pid": self.pid,
                "starttime": self.starttime,
                "cmdline": list(self.cmdline)}

    @classmethod
    def from_json(cls, data: object) -> Owned:
        """Validate a record read back; :class:`ValidationError` names the bad field."""
        if not isinstance(data, dict):
            raise ValidationError("not a JSON object")
        key = data.get("key")
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValidationError(f"bad key {key!r}")
        lease = Lease.from_json(data["lease"]) if data.get("lease") is not None else None
        remote = data.get("remote")
        if remote is not None and (not isinstance(remote, str) or not _REMOTE.fullmatch(remote)):
            raise ValidationError(f"bad remote {remote!r}")
        transport = data.get("transport")
        if transport is not None and transport not in TRANSPORTS:
            raise ValidationError(f"bad transport {transport!r}")
        pid = data.get("pid")
        if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool) or pid < 1):
            raise ValidationError(f"bad pid {pid!r}")
        start = data.get("starttime")
        if start is not None and (not isinstance(start, int) or isinstance(start, bool)
                                  or start < 0):
            raise ValidationError(f"bad starttime {start!r}")
        cmdline = data.get("cmdline", [])
        if not isinstance(cmdline, list) or not all(isinstance(a, str) for a in cmdline):
            raise ValidationError("bad cmdline")
        return cls(key, lease, remote, transport, pid, start, tuple(cmdline))


def _file_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", key) + ".json"


class OwnershipStore:
    """The records in ``directory`` (created 0700 if missing)."""

    def __init__(self, directory: str | os.PathLike[str], proc: Proc | None = None) -> None:
        self.dir = Path(directory)
        self.proc = proc or Proc()
        self._checked = False

    # -- the directory -------------------------------------------------------

    def check(self, create: bool = True) -> bool:
        """Make sure the directory is ours alone; False if it does not exist (and
        ``create`` is off).  :class:`UsbipError` if it is not to be trusted."""
        if self._checked:
            return True
        try:
            st = os.lstat(self.dir)
        except FileNotFoundError:
            if not create:
                return False
            try:
                os.makedirs(self.dir.parent, mode=0o755, exist_ok=True)
                os.mkdir(self.dir, 0o700)
            except OSError as exc:
                raise UsbipError(f"cannot create {self.dir}: {exc.strerror or exc}") from exc
            st = os.lstat(self.dir)
        except OSError as exc:
            raise UsbipError(f"cannot use {self.dir}: {exc.strerror or exc}") from exc
        if not stat.S_ISDIR(st.st_mode):
            raise UsbipError(f"{self.dir} is not a directory; refusing to use it for records")
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise UsbipError(
                f"{self.dir} must be a directory owned by uid {os.geteuid()} with mode 0700 "
                f"(it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}); "
                "refusing to trust its records")
        self._checked = True
        return True

    def path(self, key: str) -> Path:
        if not _KEY.fullmatch(key):
            raise ValidationError(f"bad record key {key!r}")
        return self.dir / _file_name(key)

    # -- records -------------------------------------------------------------

    def write(self, record: Owned) -> Owned:
        """Store ``record``, stamped with this process's pid, start time and command
        line; replaced atomically, never through a symlink."""
        self.check()
        pid = os.getpid()
        record = replace(record, pid=pid, starttime=self.proc.starttime(pid),
                         cmdline=tuple(self.proc.cmdline(pid) or ()))
        final = self.path(record.key)
        tmp = final.with_name(final.name + ".tmp")
        data = json.dumps(record.to_json()).encode()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a leftover (unlink never follows a symlink)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        return record

    def update(self, key: str, **values: Any) -> Owned:
        """Change some fields of ``key``'s record (a new record if there is none)."""
        return self.write(replace(self.read(key) or Owned(key), **values))

    def read(self, key: str) -> Owned | None:
        """The record of ``key``; None if there is none or it is not valid."""
        if not self.check(create=False):
            return None
        return self._load(self.path(key))

    def _load(self, path: Path) -> Owned | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            reason = "a symlink" if exc.errno == errno.ELOOP else exc.strerror
            logger.warning("ignoring ownership record {}: {}", path, reason)
            return None
        try:
            raw = os.read(fd, _MAX_RECORD + 1)
        finally:
            os.close(fd)
        try:
            if len(raw) > _MAX_RECORD:
                raise ValidationError("too large")
            rec = Owned.from_json(json.loads(raw))
            if path.name != _file_name(rec.key):
                raise ValidationError(f"key {rec.key!r} does not match the file name")
        except (ValueError, TypeError) as exc:  # ValidationError is a ValueError
            logger.warning("ignoring ownership record {}: {}", path, exc)
            return None
        return rec

    def remove(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(key))

    def all(self) -> list[Owned]:
        """Every valid record (invalid ones are reported and skipped)."""
        if not self.check(create=False):
            return []
        out = []
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".json"):
                rec = self._load(self.dir / name)
                if rec is not None:
                    out.append(rec)
        return out

    # -- the process that wrote a record ------------------------------------------

    def writer_alive(self, record: Owned) -> bool:
        """Whether the process that wrote ``record`` still runs: same pid, same start
        time, same command line (a pid reused by another program is not it)."""
        if record.pid is None or record.pid == os.getpid() or not record.cmdline:
            return False
        return (self.proc.starttime(record.pid) == record.starttime
                and tuple(self.proc.cmdline(record.pid) or ()) == record.cmdline)

    def end_writer(self, record: Owned, grace: float = 5.0, sig: int = signal.SIGKILL,
                   sleep: Callable[[float], None] = time.sleep) -> None:
        """Give the process that wrote ``record`` ``grace`` seconds to end by itself,
        then send it ``sig`` -- only if it is that process (:meth:`writer_alive`)."""
        steps = max(1, round(grace / 0.1))
        for _ in range(steps):
            if not self.writer_alive(record):
                return
            sleep(0.1)
        if record.pid is not None and self.writer_alive(record):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, sig)
