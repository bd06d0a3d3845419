"""Carrying a gadget plan out over configfs, all or nothing; apply and remove.

:func:`execute` does the steps of a plan (:mod:`usbipx.gadget.plan`) in
order; if one fails, the steps done so far are undone in reverse order, so
configfs is left as it was before, and :class:`GadgetApplyError` says which
step failed and the kernel's errno in words.  :func:`apply_spec` and
:func:`remove_gadget` read the live gadget, choose the UDC, plan and execute.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from usbipx.errors import DeviceNotFound, UsbipError, describe_errno
from usbipx.gadget.configfs import Configfs
from usbipx.gadget.live import read_gadget
from usbipx.gadget.plan import plan_apply, plan_remove
from usbipx.gadget.spec import GadgetSpec, check_bindable, check_names, validate_gadget_name
from usbipx.gadget.steps import (
    BindUdc,
    Link,
    Mkdir,
    OsDescLink,
    OsDescUnlink,
    Rmdir,
    Step,
    UnbindUdc,
    Unlink,
    Write,
)
from usbipx.gadget.udc import wait_for_udc
from usbipx.log import logger
from usbipx.sysfs import Sysfs


class GadgetApplyError(UsbipError):
    """A configfs step failed; what was done before it has been undone.

    ``step`` describes the failed step (``write functions/hid.kbd/protocol``),
    ``errno`` is the kernel's error number (None if not from the kernel) and
    ``rollback_errors`` lists undo steps that failed (empty: configfs is as before).
    """

    def __init__(self, gadget: str, number: int, failed: Step, cause: UsbipError,
                 rollback_errors: list[str]) -> None:
        self.gadget = gadget
        self.failed = failed
        self.step = failed.what(gadget)
        self.step_number = number
        self.cause = cause
        self.errno: int | None = getattr(cause, "errno", None)
        if self.errno is None and isinstance(cause, DeviceNotFound):
            self.errno = _errno.ENOENT
        self.rollback_errors = rollback_errors
        self.exit_code = cause.exit_code
        reason = describe_errno(self.errno) if self.errno is not None else str(cause)
        hint = ""
        where = PurePosixPath(failed.path) if isinstance(failed, Mkdir) else None
        if (where is not None and where.parent == PurePosixPath("functions")
                and self.errno == _errno.ENOENT):
            ftype = where.name.split(".", 1)[0]
            hint = f" (no kernel module usb_f_{ftype} for function type {ftype!r}?)"
        elif isinstance(failed, BindUdc) and self.errno == _errno.EBUSY:
            # libcomposite answers EBUSY for every bind failure, not only a held UDC.
            hint = " (the UDC is taken, or a function refused to bind: see dmesg)"
        if rollback_errors:
            tail = "; rollback incomplete: " + "; ".join(rollback_errors)
        else:
            tail = "; rolled back, configfs is as before"
        super().__init__(f"gadget {gadget}: step {number} ({self.step}) failed: "
                         f"{reason}{hint}{tail}")


@dataclass(frozen=True)
class AppliedGadget:
    """What :func:`apply_spec` did: the gadget, its UDC and the steps taken."""

    name: str
    path: str
    udc: str | None
    created: bool
    changed: bool
    steps: tuple[str, ...] = ()


def perform(cf: Configfs, gadget: str, step: Step) -> None:
    """Do one step to gadget ``gadget``; kernel errors raise :class:`UsbipError`."""
    match step:
        case Mkdir(path):
            cf.sysfs.mkdir(cf.gadget(gadget, path))
        case Rmdir(path):
            cf.sysfs.rmdir(cf.gadget(gadget, path))
        case Write(path, attr, value):
            cf.write_value(cf.gadget(gadget, path), attr, value)
        case Link(_, function):
            cf.sysfs.symlink(cf.gadget(gadget, "functions", function), cf.gadget(gadget, step.link))
        case Unlink():
            cf.sysfs.unlink(cf.gadget(gadget, step.link))
        case OsDescLink(config):
            cf.sysfs.symlink(cf.gadget(gadget, "configs", config), cf.gadget(gadget, step.link))
        case OsDescUnlink():
            cf.sysfs.unlink(cf.gadget(gadget, step.link))
        case BindUdc(udc):
            cf.bind(gadget, udc)
        case UnbindUdc():
            cf.unbind(gadget)


def execute(cf: Configfs, gadget: str, plan: Sequence[Step]) -> None:
    """Do the steps of ``plan`` in order; on a failure undo the done ones, newest first.

    Raises :class:`GadgetApplyError` naming the failed step; its
    ``rollback_errors`` is empty when configfs is back as before.
    """
    validate_gadget_name(gadget)
    done: list[Step] = []
    for number, step in enumerate(plan, 1):
        logger.debug("gadget {}: {}", gadget, step.what(gadget))
        try:
            perform(cf, gadget, step)
        except UsbipError as exc:
            errors = _rollback(cf, gadget, done)
            raise GadgetApplyError(gadget, number, step, exc, errors) from exc
        done.append(step)


def _rollback(cf: Configfs, gadget: str, done: list[Step]) -> list[str]:
    """Undo ``done`` newest first; the descriptions of the undo steps that failed."""
    errors = []
    for step in reversed(done):
        for undo in step.undo():
            try:
                perform(cf, gadget, undo)
            except UsbipError as exc:
                logger.warning("gadget {}: undo of {!r} failed at {}: {}", gadget,
                               step.what(gadget), undo.what(gadget), exc)
                errors.append(f"undo {step.what(gadget)}: {undo.what(gadget)}: {exc}")
                break  # the rest of this undo builds on the failed part
    return errors


def apply_spec(spec: GadgetSpec, sysfs: Sysfs, udc: str | None = None,
               wait: float = 0) -> AppliedGadget:
    """Create the gadget of ``spec``, or converge the existing one to it.

    ``udc`` (a UDC name, ``"auto"`` or ``"none"``) overrides ``spec.udc``;
    with neither, a new gadget stays unbound and a bound one keeps its UDC.
    ``wait``: seconds to wait for that UDC to exist and be free (for ``auto``:
    for a free one) before giving up; nothing is changed before.
    Idempotent: a gadget that already matches is not touched.  A changed
    gadget is unbound, changed and bound again.  On any failure every step
    is undone and :class:`GadgetApplyError` names the failed step.
    """
    check_names(spec)
    cf = Configfs(sysfs)
    cf.require()
    actual = read_gadget(spec.name, sysfs) if cf.exists(spec.name) else None
    current = actual.udc if actual is not None else None
    target = wait_for_udc(sysfs, spec.name, udc if udc is not None else spec.udc, current,
                          wait)
    if target is not None:
        check_bindable(spec.configs, f"binding to {target}")
    plan = plan_apply(spec, actual, target)
    execute(cf, spec.name, plan)
    steps = tuple(s.what(spec.name) for s in plan)
    if steps:
        logger.debug("gadget {}: {} ({} steps)", spec.name,
                     "created" if actual is None else "updated", len(steps))
    return AppliedGadget(name=spec.name, path=cf.gadget(spec.name), udc=target,
                         created=actual is None, changed=bool(steps), steps=steps)


def remove_gadget(name: str, sysfs: Sysfs) -> None:
    """Tear a gadget down in the kernel's order; on failure, rebuild what was removed.

    Order: unbind UDC, unlink functions, remove config strings, configs,
    function sub-directories (lun.1+), functions, gadget strings, gadget.
    """
    actual = read_gadget(name, sysfs)
    execute(Configfs(sysfs), name, plan_remove(actual))
    logger.debug("gadget {}: removed", name)


__all__ = ["AppliedGadget", "GadgetApplyError", "apply_spec", "execute", "perform",
           "remove_gadget"]
