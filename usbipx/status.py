"""USB/IP operation status codes and what they mean to the user.

A leaf module: :mod:`usbipx.protocol` (the codec) and :mod:`usbipx.errors`
(``RemoteError``'s message) both take the codes and their texts from here.

A reply carries nothing but the code, so the words must come from the side
that prints them.  Most codes mean the same for every request; a few mean
something more precise in the reply to an export, where the application
side (usbipa) decides: :func:`status_text` takes the request's op code for
that.
"""

from __future__ import annotations

from enum import IntEnum

OP_EXPORT = 0x06
"""The op code of OP_REQ_EXPORT/OP_REP_EXPORT (without the request/reply bit)."""


class Status(IntEnum):
    """Operation status codes, as mainline's ``usbip_common.h`` names them."""

    ST_OK = 0
    ST_NA = 1
    ST_DEV_BUSY = 2
    ST_DEV_ERR = 3
    ST_NODEV = 4
    ST_ERROR = 5


_TEXT = {
    Status.ST_OK: "request completed successfully",
    Status.ST_NA: "request refused (not allowed or not available)",
    Status.ST_DEV_BUSY: "device busy (exported or no free port)",
    Status.ST_DEV_ERR: "device in error state",
    Status.ST_NODEV: "device not found",
    Status.ST_ERROR: "unexpected response",
}

_EXPORT_TEXT = {
    Status.ST_DEV_BUSY: "this address already has a live attachment of this bus id there "
                        "(another board behind the same address?), or no vhci port is free",
    Status.ST_DEV_ERR: "the usbipa's kernel refused to attach the device",
    Status.ST_ERROR: "the usbipa cannot attach devices (vhci-hcd not loaded?)",
}
"""What usbipa (usbipx.daemon.usbipa) means by each refusal of an export."""


def status_text(status: int, op: int | None = None) -> str:
    """The status code in words, e.g. ``ST_NODEV: device not found``.

    ``op`` is the op code of the request answered (either direction bit set
    or not); the reply to an export gets the usbipa's meaning of the code.
    """
    try:
        st = Status(status)
    except ValueError:
        return f"unknown status {status}"
    text = _EXPORT_TEXT.get(st) if op is not None and op & 0xFF == OP_EXPORT else None
    return f"{st.name}: {text or _TEXT[st]}"
