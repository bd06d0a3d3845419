"""The steps of a gadget plan: what to do in configfs, and how to undo it.

Each step is a small frozen dataclass (sans-IO, in the manner of h11): it
holds a path relative to the gadget's directory (``""`` is the directory
itself) and whatever its undo needs, e.g. a :class:`Write`'s old value or
the steps that rebuild what an :class:`Rmdir` removes.  :meth:`undo` gives
the steps that take it back; :meth:`what` describes it for logs and errors
(``write functions/hid.kbd/protocol``).  Carrying steps out is
:mod:`usbipx.gadget.transaction`'s job; choosing them :mod:`usbipx.gadget.plan`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from usbipx.gadget.attrs import Attr, AttrValue, Kind

TEXT = Attr("string", Kind.STR)
"""How a USB string (``strings/0x409/product`` ...) is written: text, "" as a newline."""


@dataclass(frozen=True)
class Mkdir:
    """Create a directory (the kernel fills in its attributes and default groups)."""

    path: str

    def what(self, gadget: str) -> str:
        return f"mkdir {_shown(self.path, gadget)}"

    def undo(self) -> tuple[Step, ...]:
        return (Rmdir(self.path),)


@dataclass(frozen=True)
class Rmdir:
    """Remove a directory; ``restore`` are the steps that make it again as it was."""

    path: str
    restore: tuple[Step, ...] = ()

    def what(self, gadget: str) -> str:
        return f"rmdir {_shown(self.path, gadget)}"

    def undo(self) -> tuple[Step, ...]:
        return self.restore


@dataclass(frozen=True)
class Write:
    """Write an attribute; ``old`` is its value before (None: nothing to restore,
    as in a directory this plan creates)."""

    path: str
    attr: Attr
    value: AttrValue
    old: AttrValue | None = None

    def what(self, gadget: str) -> str:
        return f"write {self.path}"

    def undo(self) -> tuple[Step, ...]:
        return () if self.old is None else (Write(self.path, self.attr, self.old),)


@dataclass(frozen=True)
class Link:
    """Link function ``function`` into config ``config`` as ``name`` (default: its name)."""

    config: str
    function: str
    name: str = ""

    @property
    def link(self) -> str:
        return f"configs/{self.config}/{self.name or self.function}"

    def what(self, gadget: str) -> str:
        return f"link {self.link}"

    def undo(self) -> tuple[Step, ...]:
        return (Unlink(self.config, self.name or self.function, self.function),)


@dataclass(frozen=True)
class Unlink:
    """Remove link ``name`` (to function ``function``) from config ``config``."""

    config: str
    name: str
    function: str

    @property
    def link(self) -> str:
        return f"configs/{self.config}/{self.name}"

    def what(self, gadget: str) -> str:
        return f"unlink {self.link}"

    def undo(self) -> tuple[Step, ...]:
        return (Link(self.config, self.function, "" if self.name == self.function else self.name),)


@dataclass(frozen=True)
class OsDescLink:
    """Link ``os_desc/`` to config ``config`` as ``name`` (default: the config's name):
    the configuration that carries the Microsoft OS descriptors."""

    config: str
    name: str = ""

    @property
    def link(self) -> str:
        return f"os_desc/{self.name or self.config}"

    def what(self, gadget: str) -> str:
        return f"link {self.link}"

    def undo(self) -> tuple[Step, ...]:
        return (OsDescUnlink(self.name or self.config, self.config),)


@dataclass(frozen=True)
class OsDescUnlink:
    """Remove link ``name`` (to config ``config``) from ``os_desc/``."""

    name: str
    config: str

    @property
    def link(self) -> str:
        return f"os_desc/{self.name}"

    def what(self, gadget: str) -> str:
        return f"unlink {self.link}"

    def undo(self) -> tuple[Step, ...]:
        return (OsDescLink(self.config, "" if self.name == self.config else self.name),)


@dataclass(frozen=True)
class BindUdc:
    """Bind the gadget to UDC ``udc``."""

    udc: str

    def what(self, gadget: str) -> str:
        return f"bind UDC {self.udc}"

    def undo(self) -> tuple[Step, ...]:
        return (UnbindUdc(self.udc),)


@dataclass(frozen=True)
class UnbindUdc:
    """Unbind the gadget from UDC ``udc`` (the one it is bound to)."""

    udc: str

    def what(self, gadget: str) -> str:
        return f"unbind UDC {self.udc}"

    def undo(self) -> tuple[Step, ...]:
        return (BindUdc(self.udc),)


Step = Mkdir | Rmdir | Write | Link | Unlink | OsDescLink | OsDescUnlink | BindUdc | UnbindUdc


def _shown(path: str, gadget: str) -> str:
    return path or f"usb_gadget/{gadget}"


__all__ = ["TEXT", "BindUdc", "Link", "Mkdir", "OsDescLink", "OsDescUnlink", "Rmdir", "Step",
           "UnbindUdc", "Unlink", "Write"]
