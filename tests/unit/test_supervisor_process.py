"""The supervisor with real processes: ``usbipx supervisor run`` against a fake sysfs
tree (``USBIPX_ROOT``), whose forked workers must act on that tree, not on /sys."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakekernel import FakeKernel

from usbipx.daemon import spawn
from usbipx.daemon.control import query_status
from usbipx.daemon.spawn import ProcessSpawner, close_inherited
from usbipx.errors import UsbipError
from usbipx.procfs import Proc

USBIPX = str(Path(sys.executable).parent / "usbipx")


@pytest.fixture
def sock_dir() -> Iterator[str]:
    """A short directory: a socket's path must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="supproc") as d:
        yield d


def wait_status(sock: str, key: str, ready: Any, proc: subprocess.Popen[str],
                timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the supervisor ended"
        try:
            entries = {e["export"]: e for e in query_status(sock)["exports"]}
        except UsbipError:
            entries = {}  # not listening yet
        last = entries.get(key)
        if last is not None and ready(last):
            return last
        time.sleep(0.05)
    raise AssertionError(f"{key} never got there; last status {last}")


def test_workers_act_on_the_injected_tree(tmp_path: Path, sock_dir: str) -> None:
    """The runner's Sysfs reaches the forked workers.  On the fake tree 1-1 is plugged
    in and unbound: its worker binds it there (the write lands in the tree; a plain
    directory cannot take it over, so the bind is refused and the worker backs off).
    A worker on the real /sys would find no 1-1 and wait for it instead."""
    root = tmp_path / "root"
    FakeKernel(None, "host_unbound", root=root)
    bind = root / "sys/bus/usb/drivers/usbip-host/bind"
    bind.write_text("")
    sock = os.path.join(sock_dir, "sup.sock")
    cfg = tmp_path / "sup.toml"
    cfg.write_text('[server]\nhost = "127.0.0.1"\nport = 9\n[[export]]\nbusid = "1-1"\n'
                   f'[supervisor]\ncontrol_socket = "{sock}"\nstate_dir = "{tmp_path}/state"\n'
                   "backoff_initial = 0.1\nbackoff_max = 0.2\n")
    log = (tmp_path / "sup.log").open("w")
    proc = subprocess.Popen([USBIPX, "supervisor", "run", "-c", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env=dict(os.environ, USBIPX_ROOT=str(root)))
    try:
        entry = wait_status(sock, "busid:1-1", lambda e: e["last_error"], proc)
        assert entry["state"] == "backoff", (entry, (tmp_path / "sup.log").read_text())
        assert "usbip-host did not take 1-1" in entry["last_error"]
        assert bind.read_text() == "1-1"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        log.close()
    out = (tmp_path / "sup.log").read_text()
    assert code == 0, out
    assert "Traceback" not in out


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


def test_close_inherited_closes_the_sockets_proc_lists(tmp_path: Path) -> None:
    """What a worker closes comes from the injected Proc: sockets it lists go, except
    those kept; pipes stay (multiprocess's sentinel is one); unlisted ones are not looked at."""
    a, b = socket.socketpair()
    listed_sock, kept_sock = a.detach(), b.detach()
    unlisted = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    fd_dir = tmp_path / "proc/self/fd"
    fd_dir.mkdir(parents=True)
    for fd in (listed_sock, kept_sock, r, w):
        (fd_dir / str(fd)).touch()
    (fd_dir / "999").touch()  # already closed again: no error
    try:
        closed = close_inherited(keep={kept_sock}, proc=Proc(tmp_path / "proc"))
        assert closed == [listed_sock]
        assert not is_open(listed_sock)
        assert is_open(kept_sock) and is_open(r) and is_open(w) and is_open(unlisted.fileno())
    finally:
        for fd in (kept_sock, r, w):
            os.close(fd)
        unlisted.close()


def test_prctl_is_resolved_by_the_spawner_in_the_parent(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """Resolved before the first fork (a worker resolving it would pay a megabyte of
    private memory), not when the module is imported."""
    monkeypatch.setattr(spawn, "_prctl", None)

    async def make() -> ProcessSpawner:
        return ProcessSpawner(asyncio.get_running_loop())

    spawner = asyncio.run(make())
    assert spawn._prctl is not None
    assert spawner.sysfs.root == Path("/") and spawner.proc.root == Path("/proc")


def test_the_spawner_counts_what_relaying_workers_tell(tmp_path: Path) -> None:
    """A worker's ("relayed", to_network, to_kernel) report feeds the supervisor's
    usbipx_relay_bytes_total; a malformed one (a killed worker's, or a bug) counts nothing."""
    from types import SimpleNamespace

    from usbipx.metrics import Metrics

    async def make() -> ProcessSpawner:
        return ProcessSpawner(asyncio.get_running_loop())

    spawner = asyncio.run(make())
    metrics = Metrics()
    spawner.sup = SimpleNamespace(metrics=metrics)  # type: ignore[assignment]
    for msg in (["relayed", 1000, 200], ["relayed", 24, 0], ["relayed", True, -5],
                ["relayed", "9", 1.5], ["relayed", 1], ["relayed", 1, 2, 3]):
        spawner._message("busid:1-1", 4242, msg)

    def count(direction: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        return sum(s.value for f in text_string_to_metric_families(metrics.text())
                   for s in f.samples if s.name == "usbipx_relay_bytes_total"
                   and s.labels == {"direction": direction})

    assert (count("to_network"), count("to_kernel")) == (1024, 200)


PRELOAD_PROBE = """
import sys
from usbipx.daemon import spawn
from supervisor_helpers import OPTIONS, busid, gadget
from usbipx.daemon.config import ServerSpec
from usbipx.daemon.supervisor import Job
kind, scheme = sys.argv[1:]
spec = gadget("g") if kind == "gadget" else busid("1-1")
job = Job(spec.key, spec, spec.busid, ServerSpec("10.0.0.1", 3240, scheme=scheme), OPTIONS)
before = set(sys.modules)
spawn.preload(job)
print(" ".join(sorted(set(sys.modules) - before)))
"""

GADGET = {"usbipx.gadget.plan", "usbipx.gadget.steps", "usbipx.gadget.transaction"}
TLS = {"usbipx.tlsio", "usbipx.tlsengine", "usbipx.tlsrecord", "usbipx.ktls", "usbipx.relay"}


@pytest.mark.parametrize(("kind", "scheme"), [("busid", "tcp"), ("gadget", "tcp"),
                                              ("busid", "tls"), ("busid", "wss")])
def test_the_parent_loads_what_a_worker_would_import_after_the_fork(kind: str,
                                                                    scheme: str) -> None:
    """A module a worker imports is that worker's own memory; loaded in the parent
    before the fork it is shared.  Traced in the lab, every worker imported the
    idna codec (socket encodes a str host with it), vUDC workers the gadget plan,
    TLS workers the TLS engine and the relay, and wss workers websockets."""
    out = subprocess.run([sys.executable, "-c", PRELOAD_PROBE, kind, scheme],
                         capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).parent, check=True)
    loaded = set(out.stdout.split())
    assert {"encodings.idna", "stringprep", "unicodedata"} <= loaded, out.stdout
    assert (loaded >= GADGET) == (kind == "gadget"), out.stdout
    assert (loaded >= TLS) == (scheme == "tls"), out.stdout
    assert ({"usbipx.wslink", "websockets.sync.client"} <= loaded) == (scheme == "wss"), \
        out.stdout
