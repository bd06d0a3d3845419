"""The ``usbipx`` console script.

Kept small on purpose: ``usbipx --version`` answers without importing the
command-line framework, and every other command starts the typer
application of :mod:`usbipx.cli.app`, which imports only the command run.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Console-script entry point."""
    if sys.argv[1:] == ["--version"]:
        from usbipx import __version__

        sys.stdout.write(f"usbipx {__version__}\n")
        return
    from usbipx.cli.app import app

    app()
