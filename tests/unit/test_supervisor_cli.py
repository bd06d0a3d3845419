"""``usbipx supervisor status`` against the real control socket server (run by asyncio in
a thread over a Supervisor with a fake spawner and clock), and ``supervisor run``
refusing a bad configuration before anything starts."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from supervisor_helpers import FakeClock, FakeSpawner, busid, config, gadget
from typer.testing import CliRunner, Result

import usbipx.daemon.runner as runner
from usbipx.cli.app import app
from usbipx.daemon.control import control_server, query_status
from usbipx.daemon.supervisor import Supervisor
from usbipx.errors import UsbipError
from usbipx.lease import Lease
from usbipx.ownership import Owned


class ControlServer:
    """``control_server`` on its own event loop in a daemon thread."""

    def __init__(self, path: str, sup: Supervisor) -> None:
        self.path = path
        self.sup = sup
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name="control", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self.stop_event = asyncio.Event()
            server = await control_server(self.path, self.sup)
            self.ready.set()
            async with server:
                await self.stop_event.wait()

        try:
            asyncio.run(main())
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    def __enter__(self) -> ControlServer:
        self.thread.start()
        assert self.ready.wait(5) and self.error is None, self.error
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.loop is not None and self.stop_event is not None
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(5)
        assert not self.thread.is_alive()


@pytest.fixture
def sock_dir() -> Iterator[str]:
    """A short directory: a socket's path must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="supcli") as d:
        yield d


@pytest.fixture
def sup() -> tuple[Supervisor, FakeSpawner, FakeClock]:
    clock = FakeClock()
    spawner = FakeSpawner()
    s = Supervisor(config(busid("1-1"), busid("1-2"), gadget("disk", "usbip-vudc.0")),
                   spawner, clock)
    s.start()
    p11 = spawner.pid_of("busid:1-1")
    s.on_report("busid:1-1", p11, "exporting")
    s.on_report("busid:1-1", p11, "exported", remote="10.0.0.1:3240", busid="1-1",
                transport="ktls")
    clock.advance(90061)  # 25 h 1 min 1 s
    spawner.exit(s, spawner.pid_of("busid:1-2"), 1)
    return s, spawner, clock


@pytest.fixture
def control(sock_dir: str, sup) -> Iterator[ControlServer]:
    with ControlServer(os.path.join(sock_dir, "run", "sup.sock"), sup[0]) as c:
        yield c


def run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def one_error(res: Result, code: int) -> str:
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr, res.exc_info)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("usbipx: error: "), res.stderr
    assert res.stdout == ""
    return lines[0].removeprefix("usbipx: error: ")


# ---------------------------------------------------------------- status

def test_status_table(control: ControlServer, sup) -> None:
    _, spawner, _ = sup
    res = run("supervisor", "status", "-s", control.path)
    assert res.exit_code == 0, (res.stdout, res.stderr)
    lines = res.stdout.splitlines()
    assert lines[0] == "supervisor: 1 backoff, 1 exported, 1 starting"
    header = lines[1].split()
    assert header == ["EXPORT", "PID", "STATE", "FOR", "REMOTE", "TRANSPORT", "UPTIME",
                      "RESTARTS", "LAST", "ERROR"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert sorted(rows) == ["busid:1-1", "busid:1-2", "gadget:disk"]
    pid = spawner.pid_of("busid:1-1")
    assert rows["busid:1-1"].split() == ["busid:1-1", str(pid), "exported", "25:01:01",
                                         "10.0.0.1:3240", "ktls", "25:01:01", "0", "-"]
    assert rows["busid:1-2"].split()[:8] == ["busid:1-2", "-", "backoff", "0s", "-", "-", "-",
                                             "0"]
    assert rows["busid:1-2"].endswith("  worker exited with status 1")
    assert rows["gadget:disk"].split()[2] == "starting"
    # columns line up: every row has STATE where the header has it
    col = lines[1].index("STATE")
    assert all(line[col:].split()[0] in {"exported", "backoff", "starting"}
               for line in lines[2:])


@pytest.mark.parametrize("args", [("supervisor", "status", "--json"),
                                  ("--json", "supervisor", "status")])
def test_status_json(control: ControlServer, sup, args: tuple[str, ...]) -> None:
    s = sup[0]
    res = run(*args, "-s", control.path)
    assert res.exit_code == 0, res.stderr
    body = json.loads(res.stdout)
    assert body == {"summary": s.summary(), "exports": s.status()}
    e = {x["export"]: x for x in body["exports"]}
    assert e["busid:1-1"]["uptime"] == 90061.0 and e["busid:1-1"]["remote"] == "10.0.0.1:3240"
    assert e["gadget:disk"]["busid"] == "usbip-vudc.0" and e["gadget:disk"]["gadget"] == "disk"
    assert e["busid:1-2"]["last_error"] == "worker exited with status 1"


def test_the_socket_is_0600_and_the_umask_is_restored(sock_dir: str, sup) -> None:
    before = os.umask(0o022)
    try:
        with ControlServer(os.path.join(sock_dir, "sup.sock"), sup[0]) as c:
            st = os.stat(c.path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert os.umask(0o022) == 0o022  # the process umask is back
    finally:
        os.umask(before)


def test_a_stale_socket_is_replaced(sock_dir: str, sup) -> None:
    path = os.path.join(sock_dir, "sup.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # what a killed supervisor leaves behind
    with ControlServer(path, sup[0]):
        assert query_status(path)["summary"] == sup[0].summary()


def test_a_second_supervisor_does_not_take_over_a_live_socket(control: ControlServer,
                                                              sup) -> None:
    other = ControlServer(control.path, Supervisor(config(busid("9-9")), FakeSpawner(),
                                                   FakeClock()))
    other.thread.start()
    assert other.ready.wait(5)
    try:
        assert isinstance(other.error, UsbipError), "the second one must be refused"
    finally:
        if other.error is None:
            other.__exit__()
    assert query_status(control.path)["summary"] == sup[0].summary()


def test_an_unknown_command(control: ControlServer) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(control.path)
        s.sendall(b"reboot\n")
        data = s.makefile("rb").read()
    assert json.loads(data) == {"error": "unknown command 'reboot'"}


def test_an_overlong_request_line_gets_a_one_line_error(control: ControlServer,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Over 64 KiB without a newline: a JSON error line and the connection closed, no
    traceback from the handler (it used to raise inside it and answer nothing)."""
    caplog.set_level(logging.WARNING, logger="asyncio")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(control.path)
        s.sendall(b"s" * (70 * 1024))
        f = s.makefile("rb")
        line = f.readline()
        try:
            rest = f.read()
        except ConnectionResetError:  # closed with some of our request unread: also closed
            rest = b""
    assert json.loads(line) == {"error": "request line longer than 65536 bytes"}
    assert rest == b"", "one line, then the connection is closed"
    # The server is still there for the next client.
    assert query_status(control.path)["summary"] == control.sup.summary()
    assert [r for r in caplog.records if r.name == "asyncio"] == []


def test_status_reflects_changes(control: ControlServer, sup) -> None:
    s = sup[0]
    s.tick()  # busid:1-2 restarts
    e = {x["export"]: x for x in query_status(control.path)["exports"]}
    assert e["busid:1-2"]["state"] == "starting" and e["busid:1-2"]["restarts"] == 1


def test_no_supervisor_running(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "none.sock")
    msg = one_error(run("supervisor", "status", "-s", path), 1)
    assert msg == f"no supervisor is running (no control socket at {path})"


def test_something_else_on_the_socket_path(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "file")
    Path(path).write_text("not a socket")
    msg = one_error(run("supervisor", "status", "-s", path), 1)
    assert msg.startswith(f"cannot query the supervisor at {path}")


STATUS_IMPORTS = textwrap.dedent("""
    import json, sys
    from usbipx.cli.app import app
    try:
        app(["supervisor", "status", "-s", sys.argv[1]])
    except SystemExit as exc:
        code = exc.code
    heavy = ["ctypes", "multiprocess", "pyudev", "usbipx.daemon.spawn", "usbipx.daemon.hotplug",
             "usbipx.daemon.runner", "usbipx.daemon.worker"]
    print(json.dumps({"code": code, "loaded": [m for m in heavy if m in sys.modules]}),
          file=sys.stderr)
""")


def test_status_loads_no_daemon_machinery(control: ControlServer, sup) -> None:
    """``supervisor status`` is a small client: the spawner, its prctl (ctypes),
    multiprocess, pyudev and the worker are the daemon's, not the client's."""
    # Not from the checkout: its top-level usbipx/ would shadow the installed package.
    res = subprocess.run([sys.executable, "-c", STATUS_IMPORTS, control.path],
                         capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(control.path))
    assert res.stdout.startswith(f"supervisor: {sup[0].summary()}\n"), (res.stdout, res.stderr)
    out = json.loads(res.stderr.splitlines()[-1])
    assert out == {"code": 0, "loaded": []}


def test_a_garbled_answer(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "junk.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(path)
        srv.listen()

        def answer() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.recv(100)
                conn.sendall(b"[1, 2]\n")

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        with pytest.raises(UsbipError, match="unreadable answer"):
            query_status(path)
        t.join(5)


# ---------------------------------------------------------------- run

@pytest.mark.parametrize(("text", "names"), [
    ("[server\n", "sup.toml"),
    ('[server]\nhost = "h"\n[[export]]\nvendor = 99999\n', "vendor"),
    ('[[export]]\nbusid = "1-1"\n', "[server]"),
])
def test_run_refuses_a_bad_config_before_anything_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, names: str) -> None:
    started: list[object] = []

    async def fake_run(*args: object) -> None:
        started.append(args)

    monkeypatch.setattr(runner, "run", fake_run)
    cfg = tmp_path / "sup.toml"
    cfg.write_text(text)
    msg = one_error(run("supervisor", "run", "-c", str(cfg)), 2)
    assert names in msg
    assert started == []


def test_run_with_a_missing_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "run", None)  # must not be reached
    msg = one_error(run("supervisor", "run", "-c", str(tmp_path / "nope.toml")), 2)
    assert msg.startswith("cannot read") and "nope.toml" in msg


def test_control_server_under_a_regular_file(sock_dir: str, sup) -> None:
    path = os.path.join(sock_dir, "file", "sup.sock")
    Path(sock_dir, "file").write_text("a regular file")
    server = ControlServer(path, sup[0])
    server.thread.start()
    assert server.ready.wait(5)
    assert isinstance(server.error, UsbipError), server.error
    assert str(server.error).startswith(f"cannot create the control socket {path}: ")


def test_run_with_the_control_socket_under_a_regular_file(sock_dir: str, tmp_path: Path) -> None:
    """A one-line error naming the path and a non-zero exit, before anything starts:
    no worker forked (a worker would log), nothing cleaned up or created."""
    Path(sock_dir, "file").write_text("a regular file")
    path = os.path.join(sock_dir, "file", "sup.sock")
    cfg = tmp_path / "sup.toml"
    cfg.write_text('[server]\nhost = "127.0.0.1"\n[[export]]\nbusid = "1-1"\n'
                   f'[supervisor]\ncontrol_socket = "{path}"\n'
                   f'state_dir = "{tmp_path}/state"\n')
    (tmp_path / "root").mkdir()
    res = subprocess.run([str(Path(sys.executable).parent / "usbipx"), "supervisor", "run",
                          "-c", str(cfg)], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, USBIPX_ROOT=str(tmp_path / "root")))
    assert res.returncode == 1, (res.returncode, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"usbipx: error: cannot create the control socket {path}: ")
    assert res.stdout == ""
    assert not (tmp_path / "state").exists()


def test_a_second_supervisor_is_refused_before_it_cleans_up(control: ControlServer,
                                                            tmp_path: Path) -> None:
    """Refused on the live control socket before it touches the state directory: it
    must not undo what the running supervisor's workers own."""
    owned = tmp_path / "state" / "owned"
    owned.mkdir(parents=True, mode=0o700)
    record = owned / "busid_9-9.json"
    lease = Lease("usbip-host", "9-9", bound_here=True, original_driver="usb")
    record.write_text(json.dumps(Owned("busid:9-9", lease, pid=999999, starttime=1,
                                       cmdline=("usbipx",)).to_json()))
    cfg = tmp_path / "sup.toml"
    cfg.write_text('[server]\nhost = "127.0.0.1"\n[[export]]\nbusid = "1-1"\n'
                   f'[supervisor]\ncontrol_socket = "{control.path}"\n'
                   f'state_dir = "{tmp_path}/state"\n')
    (tmp_path / "root").mkdir()
    res = subprocess.run([str(Path(sys.executable).parent / "usbipx"), "supervisor", "run",
                          "-c", str(cfg)], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, USBIPX_ROOT=str(tmp_path / "root")))
    assert res.returncode == 1, res.stderr
    assert res.stderr == (f"usbipx: error: another supervisor is running (it answers on "
                          f"{control.path})\n")
    assert record.exists(), "the running supervisor's record was cleaned up"
    assert query_status(control.path)["summary"] == control.sup.summary()


def test_run_needs_a_config() -> None:
    res = run("supervisor", "run")
    assert res.exit_code == 2 and "--config" in res.stderr
