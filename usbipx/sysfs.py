"""Access to the kernel's virtual filesystems under an injectable root.

Every driver in usbipx reaches the kernel through one :class:`Sysfs` object.
Production code uses ``Sysfs()`` (root ``/``); tests point it at a fake tree
(pyfakefs or a temporary directory).  Paths are always given relative to the
root as ``/sys/...``-style strings built from *validated* names; the object
refuses any path that would escape the root.

Writes follow the kernel tools: ``open(O_WRONLY)`` and a single ``write()``
of the whole value without a trailing newline, so the kernel sees exactly one
store call.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path, PurePosixPath

from usbipx.errors import DeviceNotFound, UsbipError, kernel_error


class Sysfs:
    """The kernel-facing filesystem (sysfs, configfs, /var/run) under ``root``."""

    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        self.root = Path(root)
        self._prefix = str(self.root).rstrip("/")

    def host(self, rel: str | PurePosixPath) -> str:
        """Host path of ``rel`` as a string: :meth:`path` without building a Path.

        Daemons read vhci_hcd's state on every request, and on a slow CPU
        pathlib's parsing cost more than the reads themselves.
        """
        text = os.fspath(rel)
        if not text.startswith("/") or ".." in text.split("/"):
            raise ValueError(f"unsafe kernel path {text!r}")
        return self._prefix + text

    def __repr__(self) -> str:
        return f"Sysfs(root={str(self.root)!r})"

    def path(self, rel: str | PurePosixPath) -> Path:
        """Host path of ``rel`` (an absolute path as seen by the kernel)."""
        return Path(self.host(rel))

    def exists(self, rel: str | PurePosixPath) -> bool:
        """Whether ``rel`` exists (a dangling symlink counts as missing)."""
        return os.path.exists(self.host(rel))

    def is_dir(self, rel: str | PurePosixPath) -> bool:
        return os.path.isdir(self.host(rel))

    def listdir(self, rel: str | PurePosixPath) -> list[str]:
        """Sorted entries of a directory; empty if it does not exist."""
        try:
            return sorted(os.listdir(self.host(rel)))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise kernel_error(exc, str(rel), "list") from exc

    def read_bytes(self, rel: str | PurePosixPath) -> bytes:
        """Raw content of an attribute (binary attributes such as ``dev_desc``)."""
        try:
            with open(self.host(rel), "rb") as fh:
                return fh.read()
        except FileNotFoundError as exc:
            raise DeviceNotFound(f"{rel} does not exist") from exc
        except OSError as exc:
            raise kernel_error(exc, str(rel), "read") from exc

    def read(self, rel: str | PurePosixPath) -> str:
        """Text of an attribute with surrounding whitespace removed."""
        return self.read_bytes(rel).decode("utf-8", "replace").strip()

    def read_optional(self, rel: str | PurePosixPath, default: str = "") -> str:
        """Like :meth:`read` but ``default`` when the attribute is missing or unreadable."""
        try:
            return self.read(rel)
        except UsbipError:
            return default

    def read_int(self, rel: str | PurePosixPath, base: int = 10, default: int | None = None) -> int:
        """An integer attribute; ``default`` (if given) when missing or empty."""
        try:
            text = self.read(rel)
        except UsbipError:
            if default is None:
                raise
            return default
        if not text:
            if default is None:
                raise UsbipError(f"{rel} is empty")
            return default
        try:
            return int(text, base)
        except ValueError as exc:
            raise UsbipError(f"{rel}: not a number: {text!r}") from exc

    def write(self, rel: str | PurePosixPath, value: str | bytes) -> None:
        """Store ``value`` with one ``write()``; kernel errors become usbipx errors."""
        data = value.encode() if isinstance(value, str) else value
        path = self.host(rel)
        try:
            fd = os.open(path, os.O_WRONLY)
        except FileNotFoundError as exc:
            raise DeviceNotFound(f"{rel} does not exist") from exc
        except OSError as exc:
            raise kernel_error(exc, str(rel)) from exc
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise kernel_error(OSError(errno.EIO, "short write"), str(rel))
        except OSError as exc:
            raise kernel_error(exc, str(rel)) from exc
        finally:
            os.close(fd)

    def readlink_name(self, rel: str | PurePosixPath) -> str | None:
        """Last component of a symlink's target (e.g. a device's driver), or None."""
        try:
            return os.path.basename(os.readlink(self.host(rel)))
        except OSError:
            return None

    def realpath(self, rel: str | PurePosixPath) -> str:
        """Canonical kernel path of ``rel`` (symlinks resolved), as seen from the root."""
        real = Path(os.path.realpath(self.path(rel)))
        try:
            return "/" + str(real.relative_to(self.root.resolve()))
        except ValueError:
            return str(real)

    def mkdir(self, rel: str | PurePosixPath) -> None:
        try:
            os.mkdir(self.host(rel))
        except OSError as exc:
            raise kernel_error(exc, str(rel), "mkdir") from exc

    def rmdir(self, rel: str | PurePosixPath) -> None:
        try:
            os.rmdir(self.host(rel))
        except OSError as exc:
            raise kernel_error(exc, str(rel), "rmdir") from exc

    def symlink(self, target: str | PurePosixPath, rel: str | PurePosixPath) -> None:
        """Create symlink ``rel`` pointing at ``target`` (both kernel paths)."""
        try:
            os.symlink(self.host(target), self.host(rel))
        except OSError as exc:
            raise kernel_error(exc, str(rel), "link") from exc

    def unlink(self, rel: str | PurePosixPath, missing_ok: bool = False) -> None:
        """Remove a file or symlink; with ``missing_ok`` a missing one (or a parent that
        is not a directory) is no error."""
        try:
            os.unlink(self.host(rel))
        except OSError as exc:
            if missing_ok and isinstance(exc, FileNotFoundError | NotADirectoryError):
                return
            raise kernel_error(exc, str(rel), "unlink") from exc

    # -- state files of the tools (/var/run/vhci_hcd) -------------------------

    def makedirs(self, rel: str | PurePosixPath, mode: int = 0o755) -> None:
        """Create directory ``rel`` and any missing parents; an existing one is fine."""
        try:
            os.makedirs(self.host(rel), mode=mode, exist_ok=True)
        except OSError as exc:
            raise kernel_error(exc, str(rel), "mkdir") from exc

    def replace_text(self, rel: str | PurePosixPath, text: str) -> None:
        """Make ``rel`` hold ``text``: written to ``<rel>.tmp``, then renamed over it, so
        a reader never sees half of it; the temporary file never outlives a failure."""
        path = self.host(rel)
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as fh:
                fh.write(text)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise kernel_error(exc, str(rel)) from exc

    # -- configfs listings: order and entry types matter there --------------

    def listdir_unsorted(self, rel: str | PurePosixPath) -> list[str]:
        """Entries of a directory in the order the filesystem lists them; empty if missing.

        configfs lists the newest entry first, the only record of the order
        links were made in (see :mod:`usbipx.gadget.configfs`).
        """
        try:
            return os.listdir(self.host(rel))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise kernel_error(exc, str(rel), "list") from exc

    def mtime(self, rel: str | PurePosixPath) -> float | None:
        """When ``rel`` (not followed if a symlink) was last modified; None if missing."""
        try:
            return os.lstat(self.host(rel)).st_mtime
        except FileNotFoundError:
            return None

    def is_symlink(self, rel: str | PurePosixPath) -> bool:
        """Whether ``rel`` itself is a symlink (a configfs link into functions/)."""
        return os.path.islink(self.host(rel))

    def lmode(self, rel: str | PurePosixPath) -> int:
        """``st_mode`` of ``rel`` itself, not of what a symlink points to."""
        try:
            return os.lstat(self.host(rel)).st_mode
        except FileNotFoundError as exc:
            raise DeviceNotFound(f"{rel} does not exist") from exc
        except OSError as exc:
            raise kernel_error(exc, str(rel), "stat") from exc
