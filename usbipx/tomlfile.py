"""Reading the TOML files usbipx takes (gadget specs, policies, supervisor config)."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

from usbipx.errors import ConfigError


def read_toml(path: str | Path, what: str = "") -> dict[str, Any]:
    """Parse ``path``; every failure is a :class:`ConfigError` naming the file.

    ``what`` ("policy", ...) is put before the path in the "cannot read" message.
    """
    label = f"{what} {path}" if what else str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {label}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def toml_int(value: Any, where: str, lo: int, hi: int) -> int:
    """``value`` if it is an integer in ``lo..hi`` (TOML booleans are not integers)."""
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{where} must be an integer {lo}..{hi}, got {value!r}")
    return value


def toml_number(value: Any, where: str, lo: float, hi: float) -> float:
    """``value`` as a float if it is a finite number in ``lo..hi``.

    TOML has nan and inf: neither is a usable delay, timeout or count.
    """
    if (not isinstance(value, int | float) or isinstance(value, bool)
            or not math.isfinite(value) or not lo <= value <= hi):
        raise ConfigError(f"{where} must be a number {lo:g}..{hi:g}, got {value!r}")
    return float(value)
