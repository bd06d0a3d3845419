"""The configfs ``usb_gadget`` tree, typed, over a :class:`~usbipx.sysfs.Sysfs`.

Everything goes through a Sysfs (injectable root), at
``/sys/kernel/config/usb_gadget``.  Every path is built by
:meth:`Configfs.gadget` from a gadget name checked against
:data:`~usbipx.gadget.spec.GADGET_NAME` and a relative path without ``..``,
so no caller can reach outside a gadget's directory.

The kernel's conventions this module follows:

* binary attributes (HID ``report_desc``) are written as raw bytes; configfs
  refuses empty writes (EFAULT), so "empty" is a lone newline
  (:func:`~usbipx.gadget.attrs.encode`);
* configfs lists a directory newest entry first; that order is the only
  record of the order a config's links were made, which is the order of
  its interfaces (:meth:`Configfs.created_order`).

What to change and in which order is :mod:`usbipx.gadget.plan`'s job;
reading a gadget back is :mod:`usbipx.gadget.live`'s.
"""

from __future__ import annotations

import stat
from pathlib import PurePosixPath

from usbipx.errors import ModuleNotLoaded, ValidationError
from usbipx.gadget.attrs import Attr, AttrValue, decode, encode
from usbipx.gadget.spec import is_gadget_name, validate_gadget_name
from usbipx.log import logger
from usbipx.sysfs import Sysfs

CONFIGFS = "/sys/kernel/config"
GADGET_ROOT = f"{CONFIGFS}/usb_gadget"


class Configfs:
    """The usb_gadget tree over a :class:`Sysfs`, with configfs' write conventions."""

    def __init__(self, sysfs: Sysfs) -> None:
        self.sysfs = sysfs

    def gadget(self, name: str, *parts: str) -> str:
        """Kernel path of gadget ``name`` or of ``parts`` (relative, no ``..``) inside it.

        Raises :class:`ValidationError` for a name that is not a gadget name,
        before any path exists.
        """
        validate_gadget_name(name)
        rel = PurePosixPath(*parts)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValidationError(f"gadget {name}: {str(rel)!r} is not a path inside it")
        return str(PurePosixPath(GADGET_ROOT, name, rel))

    def require(self) -> None:
        """Raise a clear error unless usb_gadget/ is there (configfs mounted, libcomposite)."""
        if self.sysfs.is_dir(GADGET_ROOT):
            return
        if self.sysfs.is_dir("/sys/module/libcomposite"):
            raise ModuleNotLoaded(
                "configfs", f" (or it is not mounted: mount -t configfs none {CONFIGFS})")
        raise ModuleNotLoaded("libcomposite", f" (and configfs mounted at {CONFIGFS})")

    def gadgets(self) -> list[str]:
        """Names of the gadget directories; one another tool named otherwise is left out."""
        out = []
        for n in self.sysfs.listdir(GADGET_ROOT):
            if not self.sysfs.is_dir(f"{GADGET_ROOT}/{n}"):
                continue
            if is_gadget_name(n):
                out.append(n)
            else:
                logger.warning("gadget {!r} in {} is not a name usbipx handles; skipped",
                               n, GADGET_ROOT)
        return out

    def exists(self, name: str) -> bool:
        """Whether gadget ``name`` exists (:class:`ValidationError` if it is no gadget name)."""
        return self.sysfs.is_dir(self.gadget(name))

    # ------------------------------------------------------------ listings

    def attr_files(self, rel: str) -> list[str]:
        """Regular files of a directory that are both readable and writable."""
        out = []
        for n in self.sysfs.listdir(rel):
            m = self.sysfs.lmode(f"{rel}/{n}")
            if stat.S_ISREG(m) and m & 0o444 and m & 0o222:
                out.append(n)
        return out

    def created_order(self, rel: str) -> list[str]:
        """Entries of a configfs directory, oldest first.

        configfs lists a directory newest entry first; that order is the only
        record of the order links were made, which is the order of the
        config's interfaces, so it is kept (``gadget save`` relies on it).
        """
        return list(reversed(self.sysfs.listdir_unsorted(rel)))

    def subdirs(self, rel: str, created_order: bool = False) -> list[str]:
        """Sub-directories (not links) of ``rel``, by name or oldest first."""
        names = self.created_order(rel) if created_order else self.sysfs.listdir(rel)
        return [n for n in names
                if not self.sysfs.is_symlink(f"{rel}/{n}") and self.sysfs.is_dir(f"{rel}/{n}")]

    def links(self, rel: str) -> list[tuple[str, str]]:
        """(link name, function name) of a config directory's symlinks, oldest first."""
        out = []
        for n in self.created_order(rel):
            if not self.sysfs.is_symlink(f"{rel}/{n}"):
                continue
            target = self.sysfs.readlink_name(f"{rel}/{n}")
            if target is not None:
                out.append((n, target))
        return out

    # ------------------------------------------------------------ values

    def read_value(self, rel: str, attr: Attr) -> AttrValue | None:
        """The decoded value of an attribute; None if it is missing or can't be written back."""
        if not self.sysfs.exists(rel):
            return None
        return decode(attr, self.sysfs.read_bytes(rel))

    def write_value(self, rel: str, attr: Attr, value: AttrValue) -> None:
        """Write ``value`` as configfs takes it (one write; empty is a lone newline)."""
        self.sysfs.write(rel, encode(attr, value))

    def udc_of(self, name: str) -> str | None:
        """The UDC gadget ``name`` is bound to, or None."""
        udc = self.sysfs.read_optional(self.gadget(name, "UDC"))
        return udc or None

    def bind(self, name: str, udc: str) -> None:
        self.sysfs.write(self.gadget(name, "UDC"), udc)

    def unbind(self, name: str) -> None:
        # An empty write is EFAULT; a lone newline unbinds.
        self.sysfs.write(self.gadget(name, "UDC"), "\n")


__all__ = ["CONFIGFS", "GADGET_ROOT", "Configfs"]
