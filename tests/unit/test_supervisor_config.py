"""The supervisor's TOML configuration: a valid file in full, and every invalid input
refused with a ConfigError that names the key at fault (nothing half-loaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from usbipx.daemon.config import (
    ExportSpec,
    Options,
    ServerSpec,
    SupervisorConfig,
    load_config,
)
from usbipx.errors import ConfigError
from usbipx.net import DEFAULT_KEEPALIVE, Keepalive

GADGET = """name = "disk"
id_vendor = 0x1d6b
id_product = 0x0104

[[configs]]
number = 1
functions = ["acm.tty"]

[functions."acm.tty"]
"""

SERVER = '[server]\nhost = "10.0.0.1"\n'


def write(tmp_path: Path, text: str, name: str = "sup.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def refused(tmp_path: Path, text: str) -> str:
    """The ConfigError message for a configuration ``text``."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    msg = str(info.value)
    assert "\n" not in msg.strip(), msg  # one line, fit for the CLI
    return msg


@pytest.fixture
def gadget_file(tmp_path: Path) -> Path:
    d = tmp_path / "gadgets"
    d.mkdir()
    return write(d, GADGET, "disk.toml")


# ---------------------------------------------------------------- valid

def test_a_full_configuration(tmp_path: Path, gadget_file: Path) -> None:
    cfg = load_config(write(tmp_path, """
[server]
host = "usbipa.example"
port = 3241
keepalive = "6,2,4,9000"

[[export]]
busid = "1-1.2"

[[export]]
vendor = 0x0403
product = 0x6001

[[export]]
vendor = 0x0781

[[export]]
gadget = "gadgets/disk.toml"
udc = "usbip-vudc.1"

[supervisor]
control_socket = "/tmp/x/sup.sock"
state_dir = "/tmp/x/state"
backoff_initial = 0.1
backoff_max = 3
connect_timeout = 1.5
poll_interval = 0.25
restart_limit = 3
restart_window = 30
"""))
    assert isinstance(cfg, SupervisorConfig)
    assert cfg.server == ServerSpec("usbipa.example", 3241, Keepalive(6, 2, 4, 9000))
    busid, match, vendor_only, gadget = cfg.exports
    assert busid == ExportSpec("busid", busid="1-1.2")
    assert busid.key == "busid:1-1.2"
    assert match == ExportSpec("match", vendor=0x0403, product=0x6001)
    assert match.key == "match:0403:6001"
    assert match.matches(0x0403, 0x6001) and not match.matches(0x0403, 0x6010)
    assert vendor_only.key == "match:0781:*"
    assert vendor_only.matches(0x0781, 0x1234) and not vendor_only.matches(0x0782, 0x1234)
    assert not busid.matches(0x0403, 0x6001)  # only match entries match
    assert gadget.kind == "gadget" and gadget.udc == "usbip-vudc.1"
    assert gadget.gadget is not None and gadget.gadget.name == "disk"
    assert gadget.key == "gadget:disk"
    # relative to the configuration file, not to the working directory
    assert Path(gadget.gadget_path or "") == gadget_file.resolve()
    assert cfg.options == Options(control_socket="/tmp/x/sup.sock", state_dir="/tmp/x/state",
                                  backoff_initial=0.1, backoff_max=3.0, connect_timeout=1.5,
                                  poll_interval=0.25, restart_limit=3, restart_window=30.0)
    assert isinstance(cfg.options.backoff_max, float)
    assert cfg.source == str(tmp_path / "sup.toml")


def test_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, SERVER + '[[export]]\nbusid = "1-1"\n'))
    assert cfg.server == ServerSpec("10.0.0.1", 3240, DEFAULT_KEEPALIVE)
    assert cfg.options == Options()
    assert Options().control_socket == "/run/usbipx/supervisor.sock"


def test_gadget_path_is_relative_to_the_config_not_the_cwd(tmp_path: Path, gadget_file: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_path = write(tmp_path, SERVER + '[[export]]\ngadget = "gadgets/disk.toml"\nudc = "auto"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(os.path.relpath(cfg_path, elsewhere))
    (g,) = cfg.exports
    assert g.udc is None  # auto: a free vUDC
    assert Path(g.gadget_path or "") == gadget_file.resolve()


def test_absolute_gadget_path(tmp_path: Path, gadget_file: Path) -> None:
    cfg = load_config(write(tmp_path, SERVER + f'[[export]]\ngadget = "{gadget_file}"\n'))
    assert cfg.exports[0].gadget_path == str(gadget_file)


# ---------------------------------------------------------------- invalid

EXPORT = '[[export]]\nbusid = "1-1"\n'


@pytest.mark.parametrize(("text", "names"), [
    pytest.param(EXPORT, "[server]", id="no-server"),
    pytest.param('[server]\nport = 3240\n' + EXPORT, "server.host", id="missing-host"),
    pytest.param('[server]\nhost = ""\n' + EXPORT, "server.host", id="empty-host"),
    pytest.param('[server]\nhost = "a b"\n' + EXPORT, "server.host", id="host-with-space"),
    pytest.param('[server]\nhost = 7\n' + EXPORT, "server.host", id="host-not-a-string"),
    pytest.param(SERVER + 'port = 0\n' + EXPORT, "server.port", id="port-0"),
    pytest.param(SERVER + 'port = 65536\n' + EXPORT, "server.port", id="port-too-big"),
    pytest.param(SERVER + 'port = "3240"\n' + EXPORT, "server.port", id="port-string"),
    pytest.param(SERVER + 'port = true\n' + EXPORT, "server.port", id="port-bool"),
    pytest.param(SERVER + 'keepalive = "5,3"\n' + EXPORT, "server.keepalive", id="keepalive-short"),
    pytest.param(SERVER + 'keepalive = "0,3,3"\n' + EXPORT, "server.keepalive", id="keepalive-0"),
    pytest.param(SERVER + 'keepalive = 5\n' + EXPORT, "server.keepalive", id="keepalive-int"),
    pytest.param(SERVER + 'user = "x"\n' + EXPORT, "user", id="unknown-server-key"),
    pytest.param('servers = 1\n' + SERVER + EXPORT, "servers", id="unknown-top-key"),
    pytest.param(SERVER, "[[export]]", id="no-export"),
    pytest.param('export = []\n' + SERVER, "[[export]]", id="empty-export-list"),
    pytest.param(SERVER + '[[export]]\nbusid = "1-1"\nspeed = 3\n', "speed",
                 id="unknown-export-key"),
    pytest.param(SERVER + '[[export]]\nbusid = "1-1"\nvendor = 1\n', "exactly one",
                 id="busid-and-vendor"),
    pytest.param(SERVER + '[[export]]\nbusid = "1-1"\ngadget = "g.toml"\n', "exactly one",
                 id="busid-and-gadget"),
    pytest.param(SERVER + '[[export]]\nudc = "usbip-vudc.0"\n', "exactly one", id="no-kind"),
    pytest.param(SERVER + '[[export]]\nproduct = 0x6001\n', "product needs vendor",
                 id="product-alone"),
    pytest.param(SERVER + '[[export]]\nbusid = "1-1"\nproduct = 1\n', "product needs vendor",
                 id="product-with-busid"),
    pytest.param(SERVER + '[[export]]\nbusid = "1-1"\nudc = "usbip-vudc.0"\n', "udc",
                 id="udc-on-busid"),
    pytest.param(SERVER + '[[export]]\nvendor = 1\nudc = "usbip-vudc.0"\n', "udc",
                 id="udc-on-match"),
    pytest.param(SERVER + '[[export]]\nbusid = "usbip-vudc.0"\n', "usbip-vudc.0 is a vUDC",
                 id="vudc-as-busid"),
    pytest.param(SERVER + '[[export]]\nbusid = "1-1/../x"\n', "export 1", id="bad-busid"),
    pytest.param(SERVER + '[[export]]\nbusid = 11\n', "busid", id="busid-int"),
    pytest.param(SERVER + '[[export]]\nvendor = 0x10000\n', "vendor", id="vendor-too-big"),
    pytest.param(SERVER + '[[export]]\nvendor = -1\n', "vendor", id="vendor-negative"),
    pytest.param(SERVER + '[[export]]\nvendor = "0403"\n', "vendor", id="vendor-string"),
    pytest.param(SERVER + '[[export]]\nvendor = 1\nproduct = 1.5\n', "product",
                 id="product-float"),
    pytest.param(SERVER + EXPORT + EXPORT, "export 2 repeats export 1", id="duplicate-busid"),
    pytest.param(SERVER + '[[export]]\nvendor = 3\n[[export]]\nvendor = 3\n',
                 "export 2 repeats export 1 (match:0003:*)", id="duplicate-match"),
    pytest.param('export = "1-1"\n' + SERVER, "[[export]]", id="export-not-a-list"),
    pytest.param('export = ["1-1"]\n' + SERVER, "export 1", id="export-not-a-table"),
    pytest.param('supervisor = 3\n' + SERVER + EXPORT, "[supervisor]", id="options-not-a-table"),
    pytest.param(SERVER + EXPORT + '[supervisor]\nbackoff = 1\n', "backoff",
                 id="unknown-option"),
    pytest.param(SERVER + EXPORT + '[supervisor]\ncontrol_socket = "rel.sock"\n',
                 "supervisor.control_socket", id="relative-socket"),
    pytest.param(SERVER + EXPORT + f'[supervisor]\ncontrol_socket = "/{"s" * 107}"\n',
                 "supervisor.control_socket", id="socket-path-too-long"),
    pytest.param(SERVER + EXPORT + '[supervisor]\nstate_dir = 3\n', "supervisor.state_dir",
                 id="state-dir-int"),
    pytest.param(SERVER + EXPORT + '[supervisor]\nbackoff_initial = 0\n',
                 "supervisor.backoff_initial", id="backoff-0"),
    pytest.param(SERVER + EXPORT + '[supervisor]\nbackoff_max = "2"\n',
                 "supervisor.backoff_max", id="backoff-string"),
    pytest.param(SERVER + EXPORT + '[supervisor]\nbackoff_initial = 3.0\nbackoff_max = 1.0\n',
                 "backoff_max is below backoff_initial", id="backoff-max-below-initial"),
    pytest.param(SERVER + EXPORT + '[supervisor]\npoll_interval = 0.001\n',
                 "supervisor.poll_interval", id="poll-too-small"),
    pytest.param(SERVER + EXPORT + '[supervisor]\nconnect_timeout = false\n',
                 "supervisor.connect_timeout", id="timeout-bool"),
    pytest.param(SERVER + EXPORT + '[supervisor]\nrestart_limit = 0\n',
                 "supervisor.restart_limit", id="restart-limit-0"),
    pytest.param(SERVER + EXPORT + '[supervisor]\nrestart_limit = 2.5\n',
                 "supervisor.restart_limit", id="restart-limit-float"),
    pytest.param(SERVER + EXPORT + '[supervisor]\nrestart_window = 0.5\n',
                 "supervisor.restart_window", id="restart-window-small"),
    pytest.param(SERVER + EXPORT + '[supervisor]\nbackoff_initial = nan\n',
                 "supervisor.backoff_initial", id="backoff-nan"),
    pytest.param(SERVER + EXPORT + '[supervisor]\nconnect_timeout = inf\n',
                 "supervisor.connect_timeout", id="timeout-inf"),
    pytest.param(SERVER + EXPORT + '[supervisor]\nrestart_window = nan\n',
                 "supervisor.restart_window", id="window-nan"),
])
def test_invalid_configuration(tmp_path: Path, text: str, names: str) -> None:
    msg = refused(tmp_path, text)
    assert names in msg, msg
    assert msg.startswith(str(tmp_path / "sup.toml")), msg  # says which file


@pytest.mark.parametrize("udc", ["dummy_udc.0", "1-1", "usbip-vudc", 3])
def test_udc_must_be_a_vudc_or_auto(tmp_path: Path, gadget_file: Path, udc: object) -> None:
    value = f'"{udc}"' if isinstance(udc, str) else str(udc)
    msg = refused(tmp_path, SERVER + f'[[export]]\ngadget = "gadgets/disk.toml"\nudc = {value}\n')
    assert "udc must be" in msg and "export 1" in msg


def test_two_gadget_exports_on_one_udc(tmp_path: Path, gadget_file: Path) -> None:
    write(gadget_file.parent, GADGET.replace('"disk"', '"other"'), "other.toml")
    msg = refused(tmp_path, SERVER + """
[[export]]
gadget = "gadgets/disk.toml"
udc = "usbip-vudc.0"
[[export]]
gadget = "gadgets/other.toml"
udc = "usbip-vudc.0"
""")
    assert "same udc" in msg


def test_the_same_gadget_twice(tmp_path: Path, gadget_file: Path) -> None:
    msg = refused(tmp_path, SERVER + '[[export]]\ngadget = "gadgets/disk.toml"\n' * 2)
    assert "export 2 repeats export 1 (gadget:disk)" in msg


@pytest.mark.parametrize(("content", "names"), [
    pytest.param(None, "gadget gadgets/missing.toml", id="missing"),
    pytest.param('name = "x"\n[[configs]]\nnumber = 0\nfunctions = []\n', "gadget gadgets/bad.toml",
                 id="invalid-spec"),
    pytest.param("name = \n", "gadget gadgets/bad.toml", id="spec-syntax"),
])
def test_bad_gadget_spec_file(tmp_path: Path, content: str | None, names: str) -> None:
    (tmp_path / "gadgets").mkdir()
    name = "missing.toml" if content is None else "bad.toml"
    if content is not None:
        write(tmp_path / "gadgets", content, name)
    msg = refused(tmp_path, SERVER + f'[[export]]\ngadget = "gadgets/{name}"\n')
    assert names in msg and "export 1" in msg


def test_gadget_must_be_a_path(tmp_path: Path) -> None:
    assert "gadget must be the path" in refused(tmp_path, SERVER + '[[export]]\ngadget = ""\n')


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read .*nope\.toml: No such file"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)  # a directory


def test_a_binary_file_is_a_config_error(tmp_path: Path) -> None:
    p = tmp_path / "sup.toml"
    p.write_bytes(b"\xff\xfe[server]\n")
    with pytest.raises(ConfigError, match=r"sup\.toml"):
        load_config(p)


def test_toml_syntax_error(tmp_path: Path) -> None:
    msg = refused(tmp_path, '[server\nhost = "x"\n')
    assert "line 1" in msg


def test_the_first_error_wins_and_nothing_is_returned(tmp_path: Path) -> None:
    """Validation is complete: an error late in the file still refuses the whole file."""
    msg = refused(tmp_path, SERVER + EXPORT + '[[export]]\nvendor = 1\n'
                  + '[supervisor]\nrestart_limit = -1\n')
    assert "restart_limit" in msg


def test_the_longest_control_socket_path(tmp_path: Path) -> None:
    path = "/" + "s" * 106  # 107 bytes and the NUL: exactly sun_path
    cfg = load_config(write(tmp_path, SERVER + EXPORT + f'[supervisor]\ncontrol_socket = "{path}"\n'))
    assert cfg.options.control_socket == path


# ---------------------------------------------------------------- upper bounds

@pytest.mark.parametrize(("key", "value"), [
    ("backoff_initial", "3600.5"),
    ("backoff_max", "86401"),
    ("connect_timeout", "601"),
    ("poll_interval", "1e10"),  # select() raised OverflowError in every worker: a crash loop
    ("poll_interval", str(10 ** 30)),
    ("restart_window", "86400.5"),
    ("restart_limit", "10001"),
    ("restart_limit", str(2 ** 70)),
])
def test_numbers_have_an_upper_bound(tmp_path: Path, key: str, value: str) -> None:
    msg = refused(tmp_path, SERVER + EXPORT + f"[supervisor]\n{key} = {value}\n")
    assert f"supervisor.{key}" in msg, msg
    assert msg.startswith(str(tmp_path / "sup.toml")), msg


def test_the_largest_numbers_are_accepted(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, SERVER + EXPORT + """[supervisor]
backoff_initial = 3600
backoff_max = 86400
connect_timeout = 600
poll_interval = 60
restart_window = 86400
restart_limit = 10000
"""))
    assert cfg.options == Options(backoff_initial=3600.0, backoff_max=86400.0,
                                  connect_timeout=600.0, poll_interval=60.0,
                                  restart_window=86400.0, restart_limit=10000)
    assert isinstance(cfg.options.restart_window, float)


# -- several servers, TLS, wss, proxies -------------------------------------------

def _pki(tmp_path: Path) -> str:
    from usbipx import pki

    pki.init_ca(tmp_path / "pki")
    pki.issue(tmp_path / "pki", "board")
    return 'cert = "pki/board.crt"\nkey = "pki/board.key"\nca = "pki/ca.crt"\n'


def test_several_servers_in_order(tmp_path: Path) -> None:
    files = _pki(tmp_path)
    cfg = load_config(write(tmp_path, f'''
[server]
urls = ["10.0.0.1", "tls://a.example.net:4000", "wss://b.example.net/usbip"]
proxy = "http://user:secret@proxy.lan:3128"
ping = "4,8"
{files}
[[export]]
busid = "1-1"
'''))
    s = cfg.server
    assert [str(e) for e in s.endpoints] == ["tcp://10.0.0.1:3240", "tls://a.example.net:4000",
                                             "wss://b.example.net:443/usbip"]
    assert [s.url(i) for i in range(3)] == ["10.0.0.1:3240", "tls://a.example.net:4000",
                                            "wss://b.example.net:443/usbip"]
    plain, tls, wss = (s.remote(2.0, i) for i in range(3))
    assert plain.tls is None and plain.proxy is None
    assert tls.tls is not None and tls.tls.key == tmp_path / "pki/board.key"
    assert tls.proxy is None  # a proxy is for wss:// only
    assert wss.proxy == "http://user:secret@proxy.lan:3128" and wss.ping == (4.0, 8.0)


@pytest.mark.parametrize(("server", "names"), [
    ('urls = []', "server.urls must be a list of 1..16"),
    ('urls = "tls://a"', "server.urls must be a list"),
    ('urls = ["tls://a", 3]', "must be a list of strings"),
    ('host = "a"\nurls = ["b"]', "exactly one of server.host, server.url or server.urls"),
    ('urls = ["a"]\nport = 4000', "put the port in the url"),
    ('urls = ["a"]\nproxy = "http://p:3128"', "applies to wss:// urls only"),
    ('urls = ["wss://a/x"]\nproxy = "ftp://p"', "server.proxy must be http://"),
    ('urls = ["wss://a/x"]\nping = "5"', "INTERVAL,TIMEOUT"),
    ('urls = ["wss://a/x"]\nping = "0,5"', "interval must be a number 1..3600"),
    ('urls = ["tls://a", "wss://b/x"]', "need cert, key and ca"),
    ('url = "wss://a/x\\n"', "server.url: bad remote"),
])
def test_bad_servers(tmp_path: Path, server: str, names: str) -> None:
    assert names in refused(tmp_path, f'[server]\n{server}\n\n[[export]]\nbusid = "1-1"\n')
