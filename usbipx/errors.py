"""Exceptions raised by usbipx.

Every exception's ``str()`` is a one-line reason fit for a user; the CLI prints
it and exits with the class's ``exit_code``.  Catch :class:`UsbipError` to
handle every failure of this library.
"""

from __future__ import annotations

import errno as _errno
import os

from usbipx.status import status_text


class UsbipError(Exception):
    """Base of every usbipx error."""

    exit_code = 1


class ProtocolError(UsbipError):
    """A PDU on the wire is malformed, truncated, oversized or unexpected."""


class ValidationError(UsbipError, ValueError):
    """A value given by a user or a peer is not acceptable (bad bus id, bad spec...)."""

    exit_code = 2


class ConfigError(ValidationError):
    """A configuration or spec file is invalid; nothing was changed."""


class DeviceNotFound(UsbipError):
    """No device with that bus id (or vUDC name, or port) exists."""


class DeviceBusy(UsbipError):
    """The device is already bound, exported or attached."""


class NoFreePort(UsbipError):
    """vhci_hcd has no free port of the speed the device needs."""


class ModuleNotLoaded(UsbipError):
    """A kernel module this operation needs is not loaded."""

    def __init__(self, module: str, hint: str = "") -> None:
        self.module = module
        super().__init__(
            f"kernel module {module} is not loaded (run: modprobe {module}){hint}"
        )


class PermissionDenied(UsbipError):
    """The operation needs privileges the process does not have."""

    exit_code = 77


class RemoteError(UsbipError):
    """The peer answered a request with a non-OK status."""

    def __init__(self, status: int, what: str, op: int | None = None) -> None:
        """``op``: the op code of the request refused, for the status's meaning in
        the reply to it (see :func:`usbipx.status.status_text`)."""
        self.status = status
        super().__init__(f"{what}: {status_text(status, op)}")


class KernelError(UsbipError):
    """A write or read on a kernel interface (sysfs, configfs) failed.

    ``errno`` is the kernel's error number; the message names the file and
    the error in words.
    """

    def __init__(self, path: str, err: int, action: str = "write") -> None:
        self.path = path
        self.errno = err
        super().__init__(f"{action} {path}: {describe_errno(err)}")


def describe_errno(err: int) -> str:
    """``EBUSY (Device or resource busy)`` for an errno value."""
    name = _errno.errorcode.get(err, f"errno {err}")
    return f"{name} ({os.strerror(err)})"


def kernel_error(exc: OSError, path: str, action: str = "write") -> UsbipError:
    """Map an OSError from a kernel file to the most precise usbipx error."""
    err = exc.errno or _errno.EIO
    if err in (_errno.EACCES, _errno.EPERM):
        return PermissionDenied(f"{action} {path}: {describe_errno(err)}; are you root?")
    return KernelError(path, err, action)


def with_context(exc: UsbipError, context: str) -> UsbipError:
    """A copy of ``exc`` (same class, exit code and attributes) whose message
    starts with ``context``; raise it ``from exc``."""
    new = type(exc).__new__(type(exc))
    new.__dict__.update(exc.__dict__)
    new.args = (f"{context}: {exc}",)
    return new
