"""One-shot commands whose export may need a relay that outlives them.

``connect`` and ``attach`` return once the kernel has the device.  Over
``tls://`` without kernel TLS, and always over ``wss://``, a user-space relay
then carries the data and must keep running until the export ends.
:func:`in_background` therefore runs the whole operation in a process of its
own (double fork, new session), reports its result to the command over a
pipe, and -- if a relay is needed -- stays on as that relay, with its
standard streams on /dev/null, like a daemon.  The operation runs in the
new process from the start because a WebSocket connection keeps a thread,
and threads do not survive a fork.

The relay ends by itself when either side closes; ``disconnect`` finds it
through the export's ownership record and ends it too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Callable
from typing import Any

from usbipx.errors import UsbipError
from usbipx.remote import Relayer

Job = Callable[[], tuple[dict[str, Any], Relayer | None, Callable[[], None] | None]]
"""Does the operation; returns (what to tell the command, the relay to keep running or
None, what to do once the relay runs -- e.g. record its pid)."""


def in_background(job: Job) -> dict[str, Any]:
    """Run ``job`` in a background process; what it reported.

    A failure of the job is re-raised here as a :class:`UsbipError` with the
    job's message and exit code.
    """
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked process
        os.close(r)
        _background(job, w)
    os.close(w)
    try:
        os.waitpid(child, 0)
        raw = b""
        while chunk := os.read(r, 65536):
            raw += chunk
    finally:
        os.close(r)
    try:
        answer = json.loads(raw)
    except ValueError:
        raise UsbipError("the background process ended without a word") from None
    if "error" in answer:
        err = UsbipError(str(answer["error"]))
        err.exit_code = int(answer.get("code", 1))
        raise err
    result: dict[str, Any] = answer["result"]
    return result


def _background(job: Job, w: int) -> None:  # pragma: no cover - runs in the forked process
    def report(what: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            os.write(w, json.dumps(what).encode())
            os.close(w)

    try:
        os.setsid()
        if os.fork() > 0:
            os._exit(0)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # SIGTERM keeps its default: the process ends, the kernel closes both
        # sockets, and each side sees its connection end.
        result, relay, on_start = job()
        if relay is not None and on_start is not None:
            on_start()
    except UsbipError as exc:
        report({"error": str(exc), "code": exc.exit_code})
        os._exit(1)
    except BaseException as exc:
        report({"error": f"{type(exc).__name__}: {exc}", "code": 1})
        os._exit(1)
    report({"result": result})
    if relay is None:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    try:
        relay.run()
    finally:
        os._exit(0)
