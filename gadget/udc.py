"""UDCs (``/sys/class/udc``): which exist, which gadget holds each, which to bind to.

:func:`gadget_on_udc` is the one answer to "which gadget is on this UDC": the
kernel's own, ``/sys/class/udc/<udc>/function``.  libcomposite sets a
configfs gadget's driver function to the gadget's directory name, so for a
configfs gadget it is the gadget's name; a legacy gadget module (``g_zero``
...) shows its driver's name.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from usbipx.errors import DeviceBusy, DeviceNotFound
from usbipx.gadget.configfs import Configfs
from usbipx.gadget.spec import UDC_AUTO, UDC_NONE, is_gadget_name, validate_udc_name
from usbipx.names import is_vudc_busid, vudc_index
from usbipx.sysfs import Sysfs

UDC_CLASS = "/sys/class/udc"


@dataclass(frozen=True)
class UdcInfo:
    """A UDC from /sys/class/udc and what holds it.

    ``holder`` is the gadget driver's name (:func:`gadget_on_udc`); ``gadget``
    is the same name when it is a configfs gadget bound to this UDC, None for
    a legacy g_* module.
    """

    name: str
    gadget: str | None
    holder: str | None
    state: str

    @property
    def free(self) -> bool:
        return self.holder is None

    @property
    def is_vudc(self) -> bool:
        return is_vudc_busid(self.name)


def gadget_on_udc(udc: str, sysfs: Sysfs) -> str | None:
    """Name of the gadget on ``udc``, or None if the UDC is free or absent.

    The kernel's answer (``/sys/class/udc/<udc>/function``): a configfs
    gadget's name, or a legacy gadget driver's.  :class:`ValidationError` if
    ``udc`` is not a UDC name.
    """
    validate_udc_name(udc)
    return _holder(sysfs, udc)


def _holder(sysfs: Sysfs, udc: str) -> str | None:
    return sysfs.read_optional(f"{UDC_CLASS}/{udc}/function") or None


def list_udcs(sysfs: Sysfs) -> list[UdcInfo]:
    """UDCs in /sys/class/udc (vUDCs first, then by name) and what holds each."""
    cf = Configfs(sysfs)
    out = []
    for name in sysfs.listdir(UDC_CLASS):  # names from the kernel, not from a caller
        holder = _holder(sysfs, name)
        # A legacy module's function name may happen to be a gadget's name too.
        configfs = (holder is not None and is_gadget_name(holder) and cf.exists(holder)
                    and cf.udc_of(holder) == name)
        out.append(UdcInfo(name=name, gadget=holder if configfs else None, holder=holder,
                           state=sysfs.read_optional(f"{UDC_CLASS}/{name}/state")))
    return sorted(out, key=_udc_order)


def _udc_order(u: UdcInfo) -> tuple[int, str, int]:
    if u.is_vudc:
        return (0, "", vudc_index(u.name))
    m = re.fullmatch(r"(.*?)([0-9]+)", u.name)
    base, num = (m.group(1), int(m.group(2))) if m else (u.name, 0)
    return (1, base, num)


def choose_udc(sysfs: Sysfs) -> str:
    """A free UDC for ``--udc auto``: a free usbip-vudc.N first, else any free UDC."""
    udcs = list_udcs(sysfs)
    for u in udcs:  # already ordered vUDCs first
        if u.free:
            return u.name
    if not udcs:
        raise DeviceNotFound("no UDC in /sys/class/udc (modprobe usbip-vudc num=N, or dummy_hcd)")
    raise DeviceBusy("every UDC is held: " + ", ".join(f"{u.name} by {u.holder}" for u in udcs))


def target_udc(sysfs: Sysfs, gadget: str, want: str | None, current: str | None) -> str | None:
    """The UDC gadget ``gadget`` should end up on (None: unbound), checked before any change.

    ``want`` is a UDC name, ``"auto"``, ``"none"`` or None (no preference:
    stay where it is); ``current`` is the UDC it is bound to now.
    """
    if want is None:
        return current
    if want == UDC_NONE:
        return None
    if want == UDC_AUTO:
        return current or choose_udc(sysfs)
    validate_udc_name(want)
    udcs = {u.name: u for u in list_udcs(sysfs)}
    if want not in udcs:
        known = ", ".join(udcs) or "none"
        raise DeviceNotFound(f"no UDC named {want} in {UDC_CLASS} (present: {known})")
    u = udcs[want]
    if u.holder is not None and u.gadget != gadget:
        raise DeviceBusy(f"UDC {want} is held by {u.holder}")
    return want


def wait_for_udc(sysfs: Sysfs, gadget: str, want: str | None, current: str | None,
                 timeout: float, *, interval: float = 0.2,
                 sleep: Callable[[float], None] | None = None,
                 clock: Callable[[], float] | None = None) -> str | None:
    """:func:`target_udc`, asked again every ``interval`` seconds for up to ``timeout``
    while the UDC is missing or held: at boot a UDC driver may come after the gadget's
    unit, and a UDC may be freed by another gadget going.

    On timeout the last answer's error, saying how long it waited.
    """
    sleep = sleep or time.sleep
    clock = clock or time.monotonic
    deadline = clock() + timeout
    while True:
        try:
            return target_udc(sysfs, gadget, want, current)
        except (DeviceNotFound, DeviceBusy) as exc:
            if clock() >= deadline:
                if timeout <= 0:
                    raise
                raise type(exc)(f"{exc} (waited {timeout:g} s)") from None
        sleep(min(interval, max(0.0, deadline - clock())))


__all__ = ["UDC_CLASS", "UdcInfo", "choose_udc", "gadget_on_udc", "list_udcs", "target_udc",
           "wait_for_udc"]
