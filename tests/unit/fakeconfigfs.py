"""A fake configfs + UDC class that enforces the kernel's rules, over pyfakefs.

pyfakefs gives plain files; the kernel's configfs runs code on every mkdir,
write, link and rmdir.  :class:`FakeConfigfs` is a ``Sysfs`` whose mutating
methods first apply the rules libcomposite applies (as observed on the lab
kernel, Debian 6.1) and then change the fake tree as the kernel would:

* mkdir ``usb_gadget/<g>`` creates the gadget's attribute files and default
  groups; ``functions/<type>.<n>`` creates the type's attribute files (and
  ``lun.0`` for mass_storage), ENOENT for a type without a module, EINVAL
  without a dot; ``configs/<label>.<n>`` needs n >= 1;
* writing a function attribute while the function is linked: EBUSY (LUN
  file/removable/nofua/inquiry_string excepted); mass_storage ro/cdrom while
  a file is open: EBUSY; an empty write: EFAULT; strings over 126 bytes:
  EOVERFLOW; values are stored as the kernel shows them (idVendor 7531 reads
  0x1d6b ...), invalid ones are EINVAL/ERANGE;
* rmdir in the wrong order: ENOTEMPTY (config with links or strings, function
  with lun.N, gadget with configs/functions/strings), EBUSY (linked function),
  EPERM (lun.0, default groups);
* links while bound: EINVAL; unlink while bound unbinds (as the kernel does);
* UDC: EBUSY when already bound, the UDC is held or unknown, or a config has
  no function; ENODEV when unbinding an unbound gadget;
* os_desc/: one link, to a config of the gadget (a second: EBUSY; anything
  else: EINVAL), made while bound too; unlinking it while bound unbinds; a
  config it links can't be removed (EBUSY); ``b_vendor_code`` reads back as a
  sign-extended char (0xffffffcd); ``qw_sign`` takes at most 7 bytes and keeps
  the rest of the old value, a lone newline is a write of 0 bytes; rndis and
  ncm have os_desc/interface.<type>/compatible_id and sub_compatible_id, 8 raw
  bytes each of which a shorter write replaces only its length.

``ops`` logs every successful mutation; ``fail_at`` makes the N-th mutating
call fail with ``fail_errno`` (to test rollback from every step).

configfs lists a directory newest entry first (the order links were made is
the order of a config's interfaces, and the only trace of it); the fake keeps
pyfakefs' listing in insertion order and moves each new entry to the front.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from usbipx.errors import kernel_error
from usbipx.sysfs import Sysfs

GADGETS = "/sys/kernel/config/usb_gadget"
UDC_CLASS = "/sys/class/udc"

RW, RO, WO = 0o644, 0o444, 0o200

# attribute -> (mode, initial content, kind).  Kinds are how the store parses.
Files = dict[str, tuple[int, bytes, str]]

GADGET_FILES: Files = {
    "UDC": (RW, b"\n", "udc"),
    "bDeviceClass": (RW, b"0x00\n", "hex8"),
    "bDeviceProtocol": (RW, b"0x00\n", "hex8"),
    "bDeviceSubClass": (RW, b"0x00\n", "hex8"),
    "bMaxPacketSize0": (RW, b"0x00\n", "hex8"),
    "bcdDevice": (RW, b"0x0601\n", "hex16"),
    "bcdUSB": (RW, b"0x0000\n", "hex16"),
    "idProduct": (RW, b"0x0000\n", "hex16"),
    "idVendor": (RW, b"0x0000\n", "hex16"),
    "max_speed": (RW, b"super-speed-plus\n", "speed"),
}
OS_DESC_FILES: Files = {
    "b_vendor_code": (RW, b"0x00\n", "char8"),
    "qw_sign": (RW, b"\n", "qwsign"),
    "use": (RW, b"0\n", "bool"),
}
INTERFACE_FILES: Files = {"compatible_id": (RW, b"\0" * 8, "compat8"),
                          "sub_compatible_id": (RW, b"\0" * 8, "compat8")}
# Function types with os_desc/interface.<name>/ (usb_os_desc_prepare_interf_dir).
OS_DESC_INTERFACES = {"rndis": "rndis", "ncm": "ncm"}
CONFIG_FILES: Files = {"MaxPower": (RW, b"2\n", "int"), "bmAttributes": (RW, b"0x80\n", "bmattr")}
GADGET_STRING_FILES: Files = {n: (RW, b"", "string") for n in ("manufacturer", "product",
                                                                 "serialnumber")}
CONFIG_STRING_FILES: Files = {"configuration": (RW, b"", "string")}
LUN_FILES: Files = {
    "cdrom": (RW, b"0\n", "lunflag"),
    "file": (RW, b"", "path"),
    "forced_eject": (WO, b"", "wo"),
    "inquiry_string": (RW, b"\n", "inquiry"),
    "nofua": (RW, b"0\n", "bool"),
    "removable": (RW, b"1\n", "bool"),
    "ro": (RW, b"0\n", "lunflag"),
}
_ETHER: Files = {
    "dev_addr": (RW, b"f2:80:bc:a0:14:1c\x00\n", "mac"),
    "host_addr": (RW, b"7e:3e:0e:13:64:2d\x00\n", "mac"),
    "ifname": (RW, b"(unnamed net_device)\n", "ifname"),
    "qmult": (RW, b"5\n", "int"),
}
FUNCTION_FILES: dict[str, Files] = {
    "mass_storage": {"stall": (RW, b"0", "bool-no-newline")},  # shown as "%d"
    "acm": {"port_num": (RO, b"0\n", "ro")},
    "gser": {"port_num": (RO, b"1\n", "ro")},
    "obex": {"port_num": (RO, b"2\n", "ro")},
    "ecm": dict(_ETHER),
    "ncm": dict(_ETHER),
    "eem": dict(_ETHER),
    "geth": dict(_ETHER),
    "rndis": {**_ETHER, "class": (RW, b"02\n", "barehex8"), "subclass": (RW, b"06\n", "barehex8"),
              "protocol": (RW, b"00\n", "barehex8")},
    "hid": {"dev": (RO, b"245:0\n", "ro"), "no_out_endpoint": (RW, b"0\n", "bool"),
            "protocol": (RW, b"0\n", "int"), "report_desc": (RW, b"", "binary"),
            "report_length": (RW, b"0\n", "int"), "subclass": (RW, b"0\n", "int")},
    "midi": {"buflen": (RW, b"512\n", "int"), "id": (RW, b"", "str"),
             "in_ports": (RW, b"1\n", "int"), "index": (RW, b"-1\n", "int"),
             "out_ports": (RW, b"1\n", "int"), "qlen": (RW, b"32\n", "int")},
    "printer": {"pnp_string": (RW, b"", "raw"), "q_len": (RW, b"10\n", "int")},
    "Loopback": {"bulk_buflen": (RW, b"4096\n", "int"), "qlen": (RW, b"32\n", "int")},
    "SourceSink": {"bulk_buflen": (RW, b"4096\n", "int"), "bulk_qlen": (RW, b"1\n", "int"),
                   "iso_qlen": (RW, b"8\n", "int"), "isoc_interval": (RW, b"4\n", "int"),
                   "isoc_maxburst": (RW, b"0\n", "int"), "isoc_maxpacket": (RW, b"1024\n", "int"),
                   "isoc_mult": (RW, b"0\n", "int"), "pattern": (RW, b"0\n", "int")},
    "uac2": {"c_sync": (RW, b"async\n", "choice:async,adaptive"),
             "c_srate": (RW, b"64000\n", "int"), "function_name": (RW, b"Source/Sink", "raw")},
}
SPEEDS = ("low-speed", "full-speed", "high-speed", "super-speed", "super-speed-plus")


def _oserror(err: int) -> OSError:
    return OSError(err, os.strerror(err))


class FakeConfigfs(Sysfs):
    """``Sysfs`` over a pyfakefs tree that answers like configfs and the UDC class."""

    def __init__(self, root: str | os.PathLike[str] = "/", modules: set[str] | None = None) -> None:
        super().__init__(root)
        self.modules = set(FUNCTION_FILES) if modules is None else modules
        self.ops: list[str] = []
        self.fail_at: int | None = None
        self.fail_errno = errno.EIO
        self.fail_when: Callable[[str, str], int | None] | None = None
        self._count = 0

    # ------------------------------------------------------------ set-up

    @classmethod
    def build(cls, fs: Any, root: str = "/", udcs: tuple[str, ...] = (
            "dummy_udc.0", "dummy_udc.1", "usbip-vudc.0", "usbip-vudc.1")) -> FakeConfigfs:
        """Create the empty kernel tree (configfs mounted, libcomposite, UDCs) and the fake.

        ``fs`` is pyfakefs' fake filesystem (the ``fs`` fixture).
        """
        fs.shuffle_listdir_results = False  # the listing order is modelled, see above
        k = cls(root)
        for d in (GADGETS, "/sys/module/libcomposite", UDC_CLASS):
            os.makedirs(k.path(d), exist_ok=True)
        for u in udcs:
            k.add_udc(u)
        return k

    def add_udc(self, name: str, holder: str = "") -> None:
        d = self.path(f"{UDC_CLASS}/{name}")
        os.makedirs(d, exist_ok=True)
        self._put(d / "function", (holder + "\n").encode() if holder else b"", RO)
        self._put(d / "state", b"not attached\n", RO)

    # ------------------------------------------------------------ helpers

    @staticmethod
    def _put(p: Path, data: bytes, mode: int = RW) -> None:
        if p.exists():
            os.chmod(p, 0o644)
        p.write_bytes(data)
        os.chmod(p, mode)

    def _populate(self, d: Path, files: Files) -> None:
        for name, (mode, content, _) in files.items():
            self._put(d / name, content, mode)

    def _split(self, rel: str | PurePosixPath) -> tuple[str, ...] | None:
        """Parts below usb_gadget/ (gadget, ...), or None outside configfs."""
        p = PurePosixPath(rel)
        base = PurePosixPath(GADGETS)
        if p == base or base not in p.parents:
            return None
        return p.relative_to(base).parts

    @staticmethod
    def _to_front(p: Path) -> None:
        """Make ``p`` the first entry its directory lists, as configfs lists the newest first."""
        parent = p.parent
        for n in os.listdir(parent):
            if n != p.name:
                os.rename(parent / n, parent / f".{n}.tmp")
                os.rename(parent / f".{n}.tmp", parent / n)

    def _gadget_dir(self, g: str) -> Path:
        return self.path(f"{GADGETS}/{g}")

    def _linked(self, g: str, fname: str) -> bool:
        target = os.path.realpath(self._gadget_dir(g) / "functions" / fname)
        cdir = self._gadget_dir(g) / "configs"
        for c in os.listdir(cdir):
            for n in os.listdir(cdir / c):
                p = cdir / c / n
                if os.path.islink(p) and os.path.realpath(p) == target:
                    return True
        return False

    def _os_desc_link(self, g: str) -> str | None:
        """The config os_desc/ links to, or None."""
        d = self._gadget_dir(g) / "os_desc"
        for n in os.listdir(d):
            if os.path.islink(d / n):
                return os.path.basename(os.readlink(d / n))
        return None

    def _bound(self, g: str) -> str:
        return (self._gadget_dir(g) / "UDC").read_bytes().decode().strip()

    def _gate(self, op: str, rel: str | PurePosixPath) -> None:
        """Fault injection: the fail_at-th mutating call (or fail_when) fails."""
        self._count += 1
        err = None
        if self.fail_at is not None and self._count == self.fail_at:
            err = self.fail_errno
        elif self.fail_when is not None:
            err = self.fail_when(op, str(rel))
        if err:
            raise kernel_error(_oserror(err), str(rel), op)

    def _raise(self, err: int, rel: str | PurePosixPath, op: str) -> None:
        raise kernel_error(_oserror(err), str(rel), op)

    # ------------------------------------------------------------ mkdir

    def mkdir(self, rel: str | PurePosixPath) -> None:
        parts = self._split(rel)
        if parts is None:
            super().mkdir(rel)
            return
        self._gate("mkdir", rel)
        if self.path(rel).exists():
            self._raise(errno.EEXIST, rel, "mkdir")
        err = self._mkdir_rule(parts)
        if err:
            self._raise(err, rel, "mkdir")
        d = self.path(rel)
        os.mkdir(d)
        self._mkdir_effect(parts, d)
        self._to_front(d)
        self.ops.append(f"mkdir {rel}")

    def _mkdir_rule(self, parts: tuple[str, ...]) -> int:
        n = len(parts)
        if n == 1:
            return 0
        g = parts[0]
        if n == 3 and parts[1] == "functions":
            name = parts[2]
            if "." not in name:
                return errno.EINVAL
            if len(name) >= 40:
                return errno.ENAMETOOLONG
            ftype = name.split(".", 1)[0]
            return 0 if ftype in self.modules else errno.ENOENT
        if n == 4 and parts[1] == "functions" and parts[2].startswith("mass_storage."):
            m = re.fullmatch(r"lun\.([0-9]+)", parts[3])
            if not m:
                return errno.EINVAL
            if int(m.group(1)) >= 16:
                return errno.ERANGE
            return errno.EBUSY if self._linked(g, parts[2]) else 0
        if n == 3 and parts[1] == "configs":
            m = re.fullmatch(r".+\.([0-9]+)", parts[2])
            return 0 if m and int(m.group(1)) >= 1 else errno.EINVAL
        if (n == 3 and parts[1] == "strings") or (n == 5 and parts[1] == "configs"
                                                  and parts[3] == "strings"):
            return 0 if re.fullmatch(r"0x[0-9a-fA-F]+", parts[-1]) else errno.EINVAL
        return errno.EPERM

    def _mkdir_effect(self, parts: tuple[str, ...], d: Path) -> None:
        n = len(parts)
        if n == 1:
            self._populate(d, GADGET_FILES)
            for sub in ("configs", "functions", "strings", "os_desc"):
                os.mkdir(d / sub)
            self._populate(d / "os_desc", OS_DESC_FILES)
        elif n == 3 and parts[1] == "functions":
            ftype = parts[2].split(".", 1)[0]
            self._populate(d, FUNCTION_FILES.get(ftype, {}))
            if ftype in OS_DESC_INTERFACES:
                i = d / "os_desc" / f"interface.{OS_DESC_INTERFACES[ftype]}"
                os.makedirs(i)
                self._populate(i, INTERFACE_FILES)
            if ftype == "mass_storage":
                os.mkdir(d / "lun.0")
                self._populate(d / "lun.0", LUN_FILES)
        elif n == 4 and parts[1] == "functions":
            self._populate(d, LUN_FILES)
        elif n == 3 and parts[1] == "configs":
            self._populate(d, CONFIG_FILES)
            os.mkdir(d / "strings")
        elif n == 3 and parts[1] == "strings":
            self._populate(d, GADGET_STRING_FILES)
        elif n == 5:
            self._populate(d, CONFIG_STRING_FILES)

    # ------------------------------------------------------------ rmdir

    def rmdir(self, rel: str | PurePosixPath) -> None:
        parts = self._split(rel)
        if parts is None:
            super().rmdir(rel)
            return
        self._gate("rmdir", rel)
        d = self.path(rel)
        if not d.is_dir() or d.is_symlink():
            self._raise(errno.ENOENT if not d.exists() else errno.ENOTDIR, rel, "rmdir")
        err = self._rmdir_rule(parts, d)
        if err:
            self._raise(err, rel, "rmdir")
        self._remove_tree(d)
        self.ops.append(f"rmdir {rel}")

    def _rmdir_rule(self, parts: tuple[str, ...], d: Path) -> int:
        n = len(parts)
        g = parts[0]
        if n == 1:
            for sub in ("configs", "functions", "strings"):
                if os.listdir(d / sub):
                    return errno.ENOTEMPTY
            return 0
        if n == 3 and parts[1] == "functions":
            if self._linked(g, parts[2]):
                return errno.EBUSY
            if any(x.startswith("lun.") and x != "lun.0" for x in os.listdir(d)):
                return errno.ENOTEMPTY
            return 0
        if n == 4 and parts[1] == "functions" and parts[3].startswith("lun."):
            if parts[3] == "lun.0":
                return errno.EPERM
            return errno.EBUSY if self._linked(g, parts[2]) else 0
        if n == 3 and parts[1] == "configs":
            if self._os_desc_link(g) == parts[2]:
                return errno.EBUSY  # the target of os_desc/'s link
            if any(os.path.islink(d / x) for x in os.listdir(d)) or os.listdir(d / "strings"):
                return errno.ENOTEMPTY
            return 0
        if (n == 3 and parts[1] == "strings") or (n == 5 and parts[3] == "strings"):
            return 0
        return errno.EPERM  # default groups and anything else

    @staticmethod
    def _remove_tree(d: Path) -> None:
        for p in sorted(d.rglob("*"), key=lambda x: len(x.parts), reverse=True):
            if p.is_symlink() or not p.is_dir():
                p.unlink()
            else:
                p.rmdir()
        d.rmdir()

    # ------------------------------------------------------------ links

    def symlink(self, target: str | PurePosixPath, rel: str | PurePosixPath) -> None:
        parts = self._split(rel)
        if parts is None:
            super().symlink(target, rel)
            return
        self._gate("link", rel)
        tparts = self._split(target)
        if len(parts) == 3 and parts[1] == "os_desc":
            self._symlink_os_desc(parts, tparts, target, rel)
            return
        ok = (len(parts) == 4 and parts[1] == "configs" and tparts is not None
              and len(tparts) == 3 and tparts[0] == parts[0] and tparts[1] == "functions"
              and self.path(target).is_dir())
        if not ok:
            self._raise(errno.EINVAL if self.path(target).exists() else errno.ENOENT, rel, "link")
        g = parts[0]
        if self._bound(g):
            self._raise(errno.EINVAL, rel, "link")
        cdir = self.path(rel).parent
        tgt = os.path.realpath(self.path(target))
        if self.path(rel).exists() or self.path(rel).is_symlink() or any(
                os.path.islink(cdir / x) and os.path.realpath(cdir / x) == tgt
                for x in os.listdir(cdir)):
            self._raise(errno.EEXIST, rel, "link")
        os.symlink(self.path(target), self.path(rel))
        self._to_front(self.path(rel))
        self.ops.append(f"link {rel}")

    def _symlink_os_desc(self, parts: tuple[str, ...], tparts: tuple[str, ...] | None,
                         target: str | PurePosixPath, rel: str | PurePosixPath) -> None:
        """os_desc/<name> -> configs/<c>: one config of this gadget; allowed while bound."""
        if not (tparts is not None and len(tparts) == 3 and tparts[0] == parts[0]
                and tparts[1] == "configs" and self.path(target).is_dir()):
            self._raise(errno.EINVAL if self.path(target).exists() else errno.ENOENT, rel, "link")
        if self.path(rel).exists() or self.path(rel).is_symlink():
            self._raise(errno.EEXIST, rel, "link")
        if self._os_desc_link(parts[0]) is not None:
            self._raise(errno.EBUSY, rel, "link")
        os.symlink(self.path(target), self.path(rel))
        self._to_front(self.path(rel))
        self.ops.append(f"link {rel}")

    def unlink(self, rel: str | PurePosixPath) -> None:
        parts = self._split(rel)
        if parts is None:
            super().unlink(rel)
            return
        self._gate("unlink", rel)
        p = self.path(rel)
        if not p.is_symlink():
            self._raise(errno.ENOENT if not p.exists() else errno.EPERM, rel, "unlink")
        g = parts[0]
        if self._bound(g):
            # libcomposite can't drop a function from a bound gadget: it unbinds first.
            self._unbind(g)
        p.unlink()
        self.ops.append(f"unlink {rel}")

    # ------------------------------------------------------------ writes

    def write(self, rel: str | PurePosixPath, value: str | bytes) -> None:
        parts = self._split(rel)
        if parts is None:
            super().write(rel, value)
            return
        self._gate("write", rel)
        data = value.encode() if isinstance(value, str) else value
        p = self.path(rel)
        if not p.is_file():
            self._raise(errno.ENOENT if not p.exists() else errno.EISDIR, rel, "write")
        if not data:
            self._raise(errno.EFAULT, rel, "write")
        kind = self._kind(parts)
        err, stored = self._store(parts, kind, data)
        if err:
            self._raise(err, rel, "write")
        if stored is not None:
            self._put(p, stored, stat.S_IMODE(os.stat(p).st_mode))
        self.ops.append(f"write {rel}={data[:40]!r}")

    def _kind(self, parts: tuple[str, ...]) -> str:
        n = len(parts)
        name = parts[-1]
        if n == 2:
            return GADGET_FILES.get(name, (0, b"", "?"))[2]
        if n == 3 and parts[1] == "os_desc":
            return OS_DESC_FILES.get(name, (0, b"", "?"))[2]
        if n == 6 and parts[1] == "functions" and parts[3] == "os_desc":
            return INTERFACE_FILES.get(name, (0, b"", "?"))[2]
        if parts[1] == "configs":
            if n == 3:
                return CONFIG_FILES.get(name, (0, b"", "?"))[2]
            return "string"
        if parts[1] == "strings":
            return "string"
        if parts[1] == "functions":
            ftype = parts[2].split(".", 1)[0]
            if n == 5 and parts[3].startswith("lun."):
                return LUN_FILES.get(name, (0, b"", "?"))[2]
            if n == 4:
                return FUNCTION_FILES.get(ftype, {}).get(name, (0, b"", "?"))[2]
        return "?"

    def _store(self, parts: tuple[str, ...], kind: str, data: bytes) -> tuple[int, bytes | None]:
        """(errno, bytes the kernel will show) for a store, as libcomposite does it."""
        g = parts[0]
        if kind == "udc":
            return self._store_udc(g, data.decode().strip())
        if kind in ("compat8", "qwsign"):
            return self._store_partial(parts, kind, data)
        in_function = len(parts) >= 4 and parts[1] == "functions"
        if in_function:
            fname = parts[2]
            is_lun = len(parts) == 5
            live = is_lun and parts[-1] in ("file", "removable", "nofua", "inquiry_string")
            if self._linked(g, fname) and not live:
                return errno.EBUSY, None
            if kind == "lunflag":
                lun_file = self.path(f"{GADGETS}/{'/'.join(parts[:4])}/file").read_bytes()
                if lun_file.strip():
                    return errno.EBUSY, None
        text = data.decode(errors="replace")
        body = text[:-1] if text.endswith("\n") else text
        try:
            return self._format(kind, body, data)
        except ValueError:
            return errno.EINVAL, None

    def _store_partial(self, parts: tuple[str, ...], kind: str,
                       data: bytes) -> tuple[int, bytes | None]:
        """Fixed-size fields a write overwrites only as far as it goes (os_desc)."""
        old = self.path(f"{GADGETS}/{'/'.join(parts)}").read_bytes()
        size = 8 if kind == "compat8" else 7
        n = min(size, len(data))
        if data[n - 1:n] == b"\n":
            n -= 1
        if kind == "compat8":  # memcpy of n bytes over the 8; shown raw
            return 0, data[:n] + old[n:]
        if n == 0:
            return errno.EIO, None  # the store returns 0: a short write
        try:
            new = data[:n].decode()
        except UnicodeDecodeError:
            return errno.EINVAL, None
        shown = old.decode().rstrip("\n")
        return 0, (new + shown[len(new):]).encode() + b"\n"

    def _format(self, kind: str, body: str, data: bytes) -> tuple[int, bytes | None]:
        if kind in ("ro", "wo"):
            return (errno.EACCES if kind == "ro" else 0), None
        if kind in ("bool", "lunflag", "bool-no-newline"):
            nl = b"" if kind == "bool-no-newline" else b"\n"
            v = body.strip().lower()
            if v in ("1", "y", "yes", "on", "true"):
                return 0, b"1" + nl
            if v in ("0", "n", "no", "off", "false"):
                return 0, b"0" + nl
            return errno.EINVAL, None
        if kind == "int":
            return 0, f"{int(body.strip(), 10)}\n".encode()
        if kind in ("hex16", "hex8", "bmattr"):
            v = int(body.strip(), 0)
            limit = 0xFFFF if kind == "hex16" else 0xFF
            if not 0 <= v <= limit:
                return errno.ERANGE, None
            if kind == "bmattr" and (not v & 0x80 or v & ~0xE0):
                return errno.EINVAL, None
            return 0, (f"0x{v:04x}\n" if kind == "hex16" else f"0x{v:02x}\n").encode()
        if kind == "char8":  # a C char printed with %02x: sign-extended
            v = int(body.strip(), 0)
            if not 0 <= v <= 0xFF:
                return errno.ERANGE, None
            return 0, f"0x{v if v < 0x80 else 0xFFFFFF00 | v:02x}\n".encode()
        if kind == "barehex8":
            return 0, f"{int(body.strip(), 16) & 0xFF:02x}\n".encode()
        if kind == "speed":
            return (0, f"{body}\n".encode()) if body in SPEEDS else (errno.EINVAL, None)
        if kind.startswith("choice:"):
            ok = body in kind.split(":", 1)[1].split(",")
            return (0, f"{body}\n".encode()) if ok else (errno.EINVAL, None)
        if kind == "string":
            if len(body.encode()) > 126:
                return errno.EOVERFLOW, None
            return 0, f"{body}\n".encode() if body else b""
        if kind == "str":
            return 0, f"{body}\n".encode() if body else b""
        if kind == "raw":
            return 0, data
        if kind == "binary":
            return 0, data[:4095]
        if kind == "mac":
            if not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", body) or int(body[:2], 16) & 1:
                return errno.EINVAL, None
            return 0, body.lower().encode() + b"\x00\n"
        if kind == "ifname":
            if body.count("%d") != 1 or len(body) > 15:
                return errno.EINVAL, None
            return 0, f"{body}\n".encode()
        if kind == "inquiry":
            return 0, (body[:28].ljust(28) + "\n").encode() if body else b"\n"
        if kind == "path":
            if not body:
                return 0, b""
            if not os.path.isabs(body) or not os.path.exists(body):
                return errno.ENOENT, None
            return 0, f"{os.path.realpath(body)}\n".encode()
        return errno.ENOENT, None

    # ------------------------------------------------------------ UDC

    def _store_udc(self, g: str, name: str) -> tuple[int, bytes | None]:
        if not name:
            if not self._bound(g):
                return errno.ENODEV, None
            self._unbind(g)
            return 0, None
        if self._bound(g):
            return errno.EBUSY, None
        udc = self.path(f"{UDC_CLASS}/{name}")
        if not udc.is_dir() or (udc / "function").read_bytes().strip():
            return errno.EBUSY, None  # the kernel says EBUSY for unknown UDCs too
        cdir = self._gadget_dir(g) / "configs"
        configs = os.listdir(cdir)
        if not configs or any(not any(os.path.islink(cdir / c / x) for x in os.listdir(cdir / c))
                              for c in configs):
            return errno.EBUSY, None  # composite bind fails: a config without functions
        self._put(udc / "function", f"{g}\n".encode(), RO)
        self._put(udc / "state", b"configured\n", RO)
        return 0, f"{name}\n".encode()

    def _unbind(self, g: str) -> None:
        name = self._bound(g)
        udc = self.path(f"{UDC_CLASS}/{name}")
        if udc.is_dir():
            self._put(udc / "function", b"", RO)
            self._put(udc / "state", b"not attached\n", RO)
        self._put(self._gadget_dir(g) / "UDC", b"\n")


def snapshot(sysfs: Sysfs) -> dict[str, object]:
    """Everything under usb_gadget/ and the UDCs' holders: dirs, links, file contents."""
    out: dict[str, object] = {}
    base = sysfs.path(GADGETS)
    for dirpath, dirnames, filenames in os.walk(base):
        rel = os.path.relpath(dirpath, base)
        for n in sorted(dirnames):
            p = os.path.join(dirpath, n)
            key = os.path.normpath(os.path.join(rel, n))
            out[key] = ("link", os.path.basename(os.readlink(p))) if os.path.islink(p) else "dir"
        for n in sorted(filenames):
            p = os.path.join(dirpath, n)
            key = os.path.normpath(os.path.join(rel, n))
            if os.path.islink(p):
                out[key] = ("link", os.path.basename(os.readlink(p)))
            elif not os.stat(p).st_mode & 0o444:
                out[key] = "write-only"
            else:
                with open(p, "rb") as fh:
                    out[key] = fh.read()
    udc = sysfs.path(UDC_CLASS)
    if udc.is_dir():
        for u in sorted(os.listdir(udc)):
            out[f"udc:{u}"] = (udc / u / "function").read_bytes()
    return out
