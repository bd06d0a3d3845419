"""What usbipx reads about processes, behind one small object with an injectable root.

Only the few facts the supervisor needs: a process's start time (tells a pid
from a reused one), its command line, and a process's open descriptors.
Tests point :class:`Proc` at a fake tree.
"""

from __future__ import annotations

import os
from pathlib import Path


class Proc:
    """``/proc`` (or a fake tree at ``root``)."""

    def __init__(self, root: str | os.PathLike[str] = "/proc") -> None:
        self.root = Path(root)

    def _pid_dir(self, pid: int | str) -> Path:
        if pid != "self" and not (isinstance(pid, int) and pid > 0):
            raise ValueError(f"bad pid {pid!r}")
        return self.root / str(pid)

    def starttime(self, pid: int) -> int | None:
        """Start time of ``pid`` in clock ticks since boot, or None if it is gone."""
        try:
            stat = (self._pid_dir(pid) / "stat").read_text()
        except OSError:
            return None
        # The command name (field 2) is in parentheses and may hold spaces
        # and parentheses itself: split after the last ')'.
        fields = stat.rsplit(")", 1)[-1].split()
        try:
            return int(fields[19])  # field 22 of proc(5), counted from field 3
        except (IndexError, ValueError):
            return None

    def cmdline(self, pid: int) -> list[str] | None:
        """The arguments ``pid`` was started with, or None if it is gone."""
        try:
            raw = (self._pid_dir(pid) / "cmdline").read_bytes()
        except OSError:
            return None
        return [a.decode(errors="replace") for a in raw.split(b"\0") if a]

    def fds(self, pid: int | str = "self") -> list[int]:
        """Open descriptors of ``pid`` (default: this process)."""
        try:
            names = os.listdir(self._pid_dir(pid) / "fd")
        except OSError:
            return []
        return sorted(int(n) for n in names if n.isdigit())
