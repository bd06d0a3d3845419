"""usbipx: the USB/IP userspace tools, with export from the device side."""

__version__ = "0.1.0"
"""The one source of the version (pyproject.toml reads it from here)."""
