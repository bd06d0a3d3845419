"""Reading the TOML files usbipx takes (gadget specs, policies, supervisor config)."""

from __future__ import annotations

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
