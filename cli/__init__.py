"""usbipx package."""
