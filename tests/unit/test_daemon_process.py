"""The real ``usbipx usbipd`` and ``usbipx usbipa`` as processes: -D, -P and --log-file.

Each test runs the installed command against a fake kernel tree in a real
temporary directory (the CLI honours ``USBIPX_ROOT``), on a free loopback
port, and talks to it over TCP.  Daemons a test starts are ended by the pid
their pid file names.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fakekernel import FakeKernel
from loopback import HOST, free_port, read_to_eof

from usbipx import protocol as p

USBIPX = str(Path(sys.executable).parent / "usbipx")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaps yet counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def processes_mentioning(token: str) -> list[int]:
    """Pids of live processes whose command line contains ``token``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if token in cmd and alive(int(d.name)):
            found.append(int(d.name))
    return found


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def devlist(port: int) -> p.Reply:
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(p.DevlistRequest().pack())
        return p.decode_reply(p.DevlistRequest(), read_to_eof(s))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A fake kernel tree with usbip-host (1-1 bound) and vhci_hcd loaded."""
    r = tmp_path / "root"
    r.mkdir()
    FakeKernel(None, "host_bound", "vhci_free", root=r)
    return r


@pytest.fixture
def daemon(root: Path, tmp_path: Path) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """``daemon(kind, *args, cwd=...)``: run ``usbipx KIND -t PORT --address 127.0.0.1 ARGS``
    to completion (with -D that is the start-up) and return it; ``.port`` is its port."""
    pidfiles: list[Path] = []
    started: list[int] = []

    def run(kind: str, *args: str, cwd: Path = tmp_path) -> subprocess.CompletedProcess[str]:
        port = free_port()
        argv = [USBIPX, kind, "-t", str(port), "--address", HOST, *args]
        if "-P" in args:
            pidfiles.append(cwd / args[args.index("-P") + 1])
        res = subprocess.run(argv, cwd=cwd, env={**os.environ, "USBIPX_ROOT": str(root)},
                             capture_output=True, text=True, timeout=60)
        for f in pidfiles:
            if f.exists() and f.read_text().strip().isdigit():
                started.append(int(f.read_text()))
        res.port = port  # type: ignore[attr-defined]
        return res

    yield run
    for pid in started:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("kind", ["usbipd", "usbipa"])
def test_detached_daemon_writes_its_pid_logs_and_stops_on_sigterm(
        daemon, tmp_path: Path, kind: str) -> None:
    pidfile, logfile = tmp_path / "d.pid", tmp_path / "d.log"
    res = daemon(kind, "-D", "-P", str(pidfile), "--log-file", str(logfile))
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""  # the terminal gets nothing once detached
    pid = int(pidfile.read_text())
    assert pid != os.getpid() and alive(pid)
    assert f"{kind} listening on tcp://127.0.0.1:{res.port}" in logfile.read_text()
    # It answers on its port: usbipd lists the bound 1-1, usbipa refuses to list.
    rep = devlist(res.port)
    assert isinstance(rep, p.DevlistReply)
    if kind == "usbipd":
        assert [d.device.busid for d in rep.devices] == ["1-1"]
    else:
        assert rep.status == p.Status.ST_NA
        wait_until(lambda: "this is usbipa" in logfile.read_text(), "the request's log line")
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not alive(pid), "the daemon to end")
    assert not pidfile.exists()
    assert f"{kind} stopped" in logfile.read_text()


def test_relative_pid_and_log_files_land_in_the_callers_directory(daemon, tmp_path: Path) -> None:
    cwd = tmp_path / "here"
    cwd.mkdir()
    res = daemon("usbipd", "-D", "-P", "rel.pid", "--log-file", "rel.log", cwd=cwd)
    assert res.returncode == 0, res.stderr
    pid = int((cwd / "rel.pid").read_text())
    assert alive(pid)
    assert "listening on" in (cwd / "rel.log").read_text()
    assert not Path("/rel.pid").exists() and not Path("/rel.log").exists()
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not alive(pid), "the daemon to end")
    assert not (cwd / "rel.pid").exists()


@pytest.mark.parametrize("kind", ["usbipd", "usbipa"])
@pytest.mark.parametrize("option", ["-P", "--log-file"])
def test_unwritable_pid_or_log_file_is_one_line_and_nothing_runs(
        daemon, tmp_path: Path, kind: str, option: str) -> None:
    bad = tmp_path / "no" / "such" / "dir" / "x.file"
    other = ["--log-file", str(tmp_path / "ok.log")] if option == "-P" else \
        ["-P", str(tmp_path / "ok.pid")]
    res = daemon(kind, "-D", option, str(bad), *other)
    assert res.returncode != 0
    what = "pid file" if option == "-P" else "log file"
    assert res.stderr == f"usbipx: error: cannot open {what} {bad}: No such file or directory\n"
    assert res.stdout == ""
    assert processes_mentioning(str(bad)) == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, res.port), timeout=2).close()
    assert not (tmp_path / "ok.pid").exists()  # nothing half-done
    assert not bad.parent.exists()


def test_foreground_daemon_with_a_pid_file(root: Path, tmp_path: Path) -> None:
    """Without -D the pid file holds the command's own pid, and goes with it."""
    port, pidfile = free_port(), tmp_path / "fg.pid"
    proc = subprocess.Popen([USBIPX, "usbipd", "-t", str(port), "--address", HOST,
                             "-P", str(pidfile)], env={**os.environ, "USBIPX_ROOT": str(root)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() != "",
                   "the pid file")
        assert int(pidfile.read_text()) == proc.pid
        wait_until(lambda: _listening(port), "the port to listen")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not pidfile.exists()
    assert "usbipd stopped" in proc.stderr.read()  # type: ignore[union-attr]


def _listening(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
    except OSError:
        return False
    return True
