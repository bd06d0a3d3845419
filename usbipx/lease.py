"""Leases: who made a device ready for export, and what to give back.

Whoever prepares a device for export takes a :class:`Lease`: for a real USB
device the driver it had and whether *we* bound it to usbip-host; for a vUDC
the gadget on it and whether *we* created that gadget.  The lease is what an
ownership record stores (:mod:`usbipx.ownership`), and a driver's
``release(lease)`` is the only code that unbinds, rebinds or removes: a
device someone else bound stays bound, a gadget someone else made stays.

Leases are read back from records on disk, so :meth:`Lease.from_json`
validates every field before anything acts on it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from usbipx.errors import ValidationError
from usbipx.names import GADGET_NAME, is_usb_busid, is_vudc_busid

STUB = "usbip-host"
VUDC = "usbip-vudc"

# A kernel driver name as it appears in /sys/bus/usb/drivers (usb, usbhid,
# usb-storage, ...).
_DRIVER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,63}")


@dataclass(frozen=True)
class Lease:
    """What preparing one device for export took.

    ``busid`` is the USB bus id or the vUDC (None while a gadget is not yet
    bound to one).  Stub mode: ``bound_here`` says we bound the device to
    usbip-host and ``original_driver`` is the driver it had.  vUDC mode:
    ``gadget`` is the gadget exported and ``created_here`` says we created it.
    """

    driver: str
    busid: str | None
    bound_here: bool = False
    original_driver: str | None = None
    gadget: str | None = None
    created_here: bool = False

    def __post_init__(self) -> None:
        if self.driver == STUB:
            if self.busid is None or not is_usb_busid(self.busid):
                raise ValidationError(f"lease: bad USB bus id {self.busid!r}")
            if self.gadget is not None or self.created_here:
                raise ValidationError("lease: a usbip-host lease holds no gadget")
        elif self.driver == VUDC:
            if self.busid is not None and not is_vudc_busid(self.busid):
                raise ValidationError(f"lease: bad vUDC name {self.busid!r}")
            if self.bound_here or self.original_driver is not None:
                raise ValidationError("lease: a usbip-vudc lease binds no USB device")
            if self.gadget is not None and not GADGET_NAME.fullmatch(self.gadget):
                raise ValidationError(f"lease: bad gadget name {self.gadget!r}")
            if self.created_here and self.gadget is None:
                raise ValidationError("lease: created_here without a gadget")
        else:
            raise ValidationError(f"lease: unknown driver {self.driver!r}")
        if self.original_driver is not None and not _DRIVER_NAME.fullmatch(
                self.original_driver):
            raise ValidationError(f"lease: bad driver name {self.original_driver!r}")

    @property
    def owns_something(self) -> bool:
        """Whether releasing this lease changes anything."""
        return self.bound_here or self.created_here

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> Lease:
        """A lease from its JSON form; :class:`ValidationError` on any bad field."""
        if not isinstance(data, dict):
            raise ValidationError("lease: not a JSON object")
        opt_str = (str, type(None))
        fields: dict[str, type | tuple[type, ...]] = {
            "driver": str, "busid": opt_str, "bound_here": bool, "original_driver": opt_str,
            "gadget": opt_str, "created_here": bool}
        extra = set(data) - set(fields)
        if extra:
            raise ValidationError(f"lease: unknown field(s) {', '.join(sorted(extra))}")
        for key, types in fields.items():
            if key in data and not isinstance(data[key], types):
                raise ValidationError(f"lease: bad {key} {data[key]!r}")
        if "driver" not in data:
            raise ValidationError("lease: no driver")
        return cls(**data)
