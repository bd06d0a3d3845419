"""``usbipx gadget``: provision USB gadgets through configfs."""

from __future__ import annotations

import typer

app = typer.Typer(help="Provision USB gadgets through configfs.", no_args_is_help=True)
