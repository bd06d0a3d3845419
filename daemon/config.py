"""The supervisor's configuration file (TOML), validated completely before use.

::

    [server]                       # the usbipa to export to
    host = "127.0.0.1"             # plain TCP, as the C tools ...
    port = 3240
    # url = "tls://app.example.net"  # ... or a URL instead of host/port (HOST, tcp://, tls://,
                                   #   wss://HOST[:PORT]/PATH)
    # urls = ["tls://a.example.net", "wss://b.example.net/usbip"]  # ... or several, tried in
                                   #   order: the first that accepts holds the device
    # proxy = "http://user:pass@proxy:3128"  # for wss:// (default: https_proxy, no_proxy)
    # ping = "5,10"                # wss:// ping interval and timeout (seconds)
    # cert = "board.crt"           # for tls://: this board's certificate, its key (mode
    # key = "board.key"            #   0600) and the CA the server's certificate chains to;
    # ca = "ca.crt"                #   paths relative to this file
    # tls_data = "auto"            # auto (kernel TLS where it works), ktls or relay
    keepalive = "4,3,3,12000"      # optional, as --keepalive

    [[export]]                     # stub mode: a real device by bus id ...
    busid = "1-1"

    [[export]]                     # ... or every device matching ids, as it is plugged in
    vendor = 0x0403
    product = 0x6001               # optional
    # serial = "A1B2C3"            # optional: only the device with this serial number
                                   #   (sysfs serial); list it before an entry without one

    [[export]]                     # vUDC mode: provision this gadget on a free usbip-vudc.N
    gadget = "gadgets/disk.toml"   # relative to this file
    udc = "usbip-vudc.0"           # optional; default: a free one

    [supervisor]                   # all optional
    control_socket = "/run/usbipx/supervisor.sock"
    state_dir = "/run/usbipx/supervisor"
    backoff_initial = 0.5          # seconds before the first retry after a drop
    backoff_max = 2.0              # cap of the exponential backoff (jitter +-20 %)
    connect_timeout = 2.0          # TCP connect to usbipa
    poll_interval = 0.5            # how often a worker looks at its export
    restart_limit = 5              # crashed workers restarted at most this often ...
    restart_window = 60.0          # ... within this many seconds, then paused for it

Every number is bounded when the file is loaded (a value out of range is a
:class:`ConfigError` naming the key), so nothing downstream -- ``select()``,
``socket.settimeout()``, the backoff arithmetic -- ever sees one it cannot take:

=================  ======  =========  =============================================
key                lowest  highest    why the maximum
=================  ======  =========  =============================================
server.port        1       65535      a TCP port
vendor, product    0       0xffff     16-bit USB ids
backoff_initial    0.01    3600       an hour before the first retry is already odd
backoff_max        0.01    86400      retry at least daily
connect_timeout    0.1     600        ten minutes for a TCP handshake
poll_interval      0.05    60         a dropped export is noticed within a minute
restart_limit      1       10000      a count, not a disguised "never"
restart_window     1       86400      a day of crash history
=================  ======  =========  =============================================
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from usbipx.deviceid import MAX_SERIAL, is_serial
from usbipx.errors import ConfigError, UsbipError, ValidationError
from usbipx.gadget.spec import GadgetSpec, load_spec
from usbipx.names import is_vudc_busid, validate_busid
from usbipx.net import DEFAULT_KEEPALIVE, Keepalive
from usbipx.remote import DEFAULT_PING, DataPath, Remote
from usbipx.tlsconf import TlsFiles
from usbipx.tomlfile import read_toml, toml_int, toml_number
from usbipx.url import USBIP_PORT, Endpoint, Scheme, parse_endpoint

ExportKind = Literal["busid", "match", "gadget"]

SECONDS: dict[str, tuple[float, float]] = {
    "backoff_initial": (0.01, 3600.0),
    "backoff_max": (0.01, 86400.0),
    "connect_timeout": (0.1, 600.0),
    "poll_interval": (0.05, 60.0),
    "restart_window": (1.0, 86400.0),
}
"""The ``[supervisor]`` durations: key -> (lowest, highest) in seconds."""

RESTART_LIMIT_MAX = 10000


@dataclass(frozen=True)
class ServerSpec:
    """The usbipa(s) every export goes to, and how to reach them.

    ``host``/``port``/``scheme``/``path`` name the first server; ``more`` the
    others, tried in order when the first refuses or is lost (``urls``).
    """

    host: str
    port: int = USBIP_PORT
    keepalive: Keepalive = DEFAULT_KEEPALIVE
    scheme: Scheme = "tcp"
    tls: TlsFiles | None = None
    data_path: DataPath = "auto"
    path: str = "/"
    more: tuple[Endpoint, ...] = ()
    proxy: str | None = None
    ping: tuple[float, float] = DEFAULT_PING

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """Every server, in the order they are tried."""
        return (Endpoint(self.scheme, self.host, self.port, self.path), *self.more)

    def remote(self, timeout: float, index: int = 0) -> Remote:
        """The :class:`~usbipx.remote.Remote` a worker dials for server ``index``."""
        ep = self.endpoints[index]
        return Remote(ep, self.tls if ep.secure else None, self.keepalive, timeout,
                      data_path=self.data_path,
                      proxy=self.proxy if ep.scheme == "wss" else None, ping=self.ping)

    def url(self, index: int = 0) -> str:
        """What ``supervisor status`` shows as the remote of server ``index``."""
        return str(self.remote(1.0, index))


@dataclass(frozen=True)
class ExportSpec:
    """One ``[[export]]`` entry."""

    kind: ExportKind
    busid: str | None = None
    vendor: int | None = None
    product: int | None = None
    gadget: GadgetSpec | None = None
    gadget_path: str | None = None
    udc: str | None = None
    serial: str | None = None
    """For ``match`` entries: only the device with this serial number."""

    @property
    def key(self) -> str:
        """Stable identity of the entry, used to diff configurations on reload."""
        if self.kind == "busid":
            return f"busid:{self.busid}"
        if self.kind == "match":
            product = "*" if self.product is None else f"{self.product:04x}"
            key = f"match:{self.vendor:04x}:{product}"
            return key if self.serial is None else f"{key}:{_key_part(self.serial)}"
        assert self.gadget is not None
        return f"gadget:{self.gadget.name}"

    def matches(self, vendor: int, product: int, serial: str | None = None) -> bool:
        """For ``match`` entries: whether a device with these ids (and serial number) is
        one of ours."""
        return (self.kind == "match" and vendor == self.vendor
                and (self.product is None or product == self.product)
                and (self.serial is None or serial == self.serial))


_PLAIN_SERIAL = re.compile(r"[A-Za-z0-9._-]{1,126}")


def _key_part(serial: str) -> str:
    """A serial number as part of an export key, which names the worker's ownership
    record (:mod:`usbipx.ownership`): as it is if it is plain, else a digest of it."""
    if _PLAIN_SERIAL.fullmatch(serial):
        return serial
    return "sha256-" + hashlib.sha256(serial.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Options:
    """``[supervisor]`` tuning, with defaults fit for recovering in seconds."""

    control_socket: str = "/run/usbipx/supervisor.sock"
    state_dir: str = "/run/usbipx/supervisor"
    backoff_initial: float = 0.5
    backoff_max: float = 2.0
    connect_timeout: float = 2.0
    poll_interval: float = 0.5
    restart_limit: int = 5
    restart_window: float = 60.0


@dataclass(frozen=True)
class SupervisorConfig:
    """A validated supervisor configuration."""

    server: ServerSpec
    exports: tuple[ExportSpec, ...]
    options: Options = field(default_factory=Options)
    source: str = "<config>"


def _unknown(table: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = set(table) - allowed
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")


_DATA_PATHS: dict[object, DataPath] = {"auto": "auto", "ktls": "ktls", "relay": "relay"}


def _server(data: Any, base: Path, src: str) -> ServerSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: [server] with a host, url or urls is required")
    _unknown(data, {"host", "port", "url", "urls", "cert", "key", "ca", "tls_data", "keepalive",
                    "proxy", "ping"}, f"{src}: [server]")
    given = [k for k in ("host", "url", "urls") if k in data]
    if len(given) != 1:
        raise ConfigError(f"{src}: [server] needs exactly one of server.host, server.url "
                          "or server.urls")
    (key,) = given
    port = toml_int(data.get("port", USBIP_PORT), f"{src}: server.port", 1, 65535)
    if key != "host" and "port" in data:
        raise ConfigError(f"{src}: server.port goes with host; put the port in the url")
    texts = data[key] if key == "urls" else [data[key]]
    if not isinstance(texts, list) or not texts or len(texts) > MAX_SERVERS:
        raise ConfigError(f"{src}: server.urls must be a list of 1..{MAX_SERVERS} URLs")
    endpoints = []
    for text in texts:
        if not isinstance(text, str):
            what = "a list of strings" if key == "urls" else "a string"
            raise ConfigError(f"{src}: server.{key} must be {what}")
        try:
            endpoints.append(parse_endpoint(text, port))
        except ValidationError as exc:
            raise ConfigError(f"{src}: server.{key}: {exc}") from None
    if key == "host" and endpoints[0].scheme != "tcp":
        raise ConfigError(f"{src}: server.host is a host name; use url = {texts[0]!r}")
    ka = DEFAULT_KEEPALIVE
    if "keepalive" in data:
        if not isinstance(data["keepalive"], str):
            raise ConfigError(f"{src}: server.keepalive must be a string like \"4,3,3,12000\"")
        try:
            ka = Keepalive.parse(data["keepalive"])
        except (UsbipError, ValueError) as exc:
            raise ConfigError(f"{src}: server.keepalive: {exc}") from None
    data_path = _DATA_PATHS.get(data.get("tls_data", "auto"))
    if data_path is None:
        raise ConfigError(f"{src}: server.tls_data must be auto, ktls or relay")
    proxy = data.get("proxy")
    if proxy is not None and (not isinstance(proxy, str) or not _PROXY.fullmatch(proxy)):
        raise ConfigError(f"{src}: server.proxy must be http://[USER:PASS@]HOST:PORT")
    if proxy is not None and not any(ep.scheme == "wss" for ep in endpoints):
        raise ConfigError(f"{src}: server.proxy applies to wss:// urls only")
    ping = _ping(data.get("ping"), f"{src}: server.ping")
    secure = any(ep.secure for ep in endpoints)
    tls = None
    files = {k: data[k] for k in ("cert", "key", "ca") if k in data}
    if secure or files:
        if not secure:
            raise ConfigError(f"{src}: server.cert, key and ca go with tls:// or wss:// urls")
        if not all(isinstance(files.get(k), str) for k in ("cert", "key", "ca")):
            raise ConfigError(f"{src}: tls:// and wss:// servers need cert, key and ca "
                              "(file names)")
        try:
            tls = TlsFiles(*(base / files[k] for k in ("cert", "key", "ca")))
            tls.check()
        except ConfigError as exc:
            raise ConfigError(f"{src}: server: {exc}") from None
    first, *more = endpoints
    spec = ServerSpec(first.host, first.port, ka, first.scheme, tls, data_path, first.path,
                      tuple(more), proxy, ping)
    for i in range(len(endpoints)):
        try:
            spec.remote(1.0, i)  # refuses what no worker could dial
        except ConfigError as exc:
            raise ConfigError(f"{src}: server: {exc}") from None
    return spec


MAX_SERVERS = 16
_PROXY = re.compile(r"https?://(?:[^@/\s]+@)?[A-Za-z0-9.\[\]:_-]+(?::[0-9]{1,5})?/?")


def _ping(value: Any, where: str) -> tuple[float, float]:
    """``"INTERVAL,TIMEOUT"`` (seconds) for wss:// ping/pong."""
    if value is None:
        return DEFAULT_PING
    parts = value.split(",") if isinstance(value, str) else []
    if len(parts) != 2:
        raise ConfigError(f"{where} must be \"INTERVAL,TIMEOUT\" in seconds, e.g. \"5,10\"")
    try:
        nums = [float(x) for x in parts]
    except ValueError:
        raise ConfigError(f"{where} must be \"INTERVAL,TIMEOUT\" in seconds") from None
    return (toml_number(nums[0], f"{where} interval", 1, 3600),
            toml_number(nums[1], f"{where} timeout", 1, 3600))


def _export(data: Any, n: int, base: Path, src: str) -> ExportSpec:
    where = f"{src}: export {n}"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a table ([[export]])")
    _unknown(data, {"busid", "vendor", "product", "serial", "gadget", "udc"}, where)
    for key in ("product", "serial"):
        if key in data and "vendor" not in data:
            raise ConfigError(f"{where}: {key} needs vendor")
    kinds = [k for k in ("busid", "vendor", "gadget") if k in data]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: give exactly one of busid, vendor (+product) or gadget")
    if "udc" in data and "gadget" not in data:
        raise ConfigError(f"{where}: udc applies to gadget exports only")
    if "busid" in data:
        busid = data["busid"]
        if not isinstance(busid, str):
            raise ConfigError(f"{where}: busid must be a string")
        try:
            validate_busid(busid)
        except UsbipError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if is_vudc_busid(busid):
            raise ConfigError(f"{where}: {busid} is a vUDC; export a gadget spec instead")
        return ExportSpec("busid", busid=busid)
    if "vendor" in data:
        vendor = toml_int(data["vendor"], f"{where}: vendor", 0, 0xFFFF)
        product = (toml_int(data["product"], f"{where}: product", 0, 0xFFFF)
                   if "product" in data else None)
        serial = data.get("serial")
        if serial is not None and (not isinstance(serial, str) or not is_serial(serial)):
            raise ConfigError(f"{where}: serial must be 1 to {MAX_SERIAL} printable characters "
                              "without spaces")
        return ExportSpec("match", vendor=vendor, product=product, serial=serial)
    raw = data["gadget"]
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{where}: gadget must be the path of a gadget spec")
    path = (base / raw) if not Path(raw).is_absolute() else Path(raw)
    try:
        spec = load_spec(path)
    except UsbipError as exc:
        raise ConfigError(f"{where}: gadget {raw}: {exc}") from None
    udc = data.get("udc")
    if udc is not None:
        if not isinstance(udc, str):
            raise ConfigError(f"{where}: udc must be a string")
        if udc != "auto":
            try:
                validate_busid(udc)
            except UsbipError:
                raise ConfigError(f"{where}: udc must be usbip-vudc.N or auto, got {udc!r}") \
                    from None
            if not is_vudc_busid(udc):
                raise ConfigError(f"{where}: udc must be usbip-vudc.N or auto, got {udc!r}")
    return ExportSpec("gadget", gadget=spec, gadget_path=str(path),
                      udc=None if udc in (None, "auto") else udc)


def _options(data: Any, src: str) -> Options:
    if data is None:
        return Options()
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: [supervisor] must be a table")
    d = Options()
    _unknown(data, set(d.__dataclass_fields__), f"{src}: [supervisor]")
    vals: dict[str, Any] = {}
    for key in ("control_socket", "state_dir"):
        if key in data:
            v = data[key]
            if not isinstance(v, str) or not v.startswith("/"):
                raise ConfigError(f"{src}: supervisor.{key} must be an absolute path")
            if key == "control_socket" and len(v.encode()) > 107:  # sun_path: 108 with NUL
                raise ConfigError(f"{src}: supervisor.control_socket is longer than the "
                                  "107 bytes a unix socket path may have")
            vals[key] = v
    for key, (low, high) in SECONDS.items():
        if key in data:
            vals[key] = toml_number(data[key], f"{src}: supervisor.{key}", low, high)
    if "restart_limit" in data:
        vals["restart_limit"] = toml_int(data["restart_limit"], f"{src}: supervisor.restart_limit",
                                         1, RESTART_LIMIT_MAX)
    opts = Options(**{**d.__dict__, **vals})
    if opts.backoff_max < opts.backoff_initial:
        raise ConfigError(f"{src}: supervisor.backoff_max is below backoff_initial")
    return opts


def parse_config(data: dict[str, Any], base: Path, src: str = "<config>") -> SupervisorConfig:
    """Validate a parsed document; gadget specs are loaded relative to ``base``."""
    _unknown(data, {"server", "export", "supervisor"}, src)
    server = _server(data.get("server"), base, src)
    raw = data.get("export", [])
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{src}: at least one [[export]] is required")
    exports = tuple(_export(e, n + 1, base, src) for n, e in enumerate(raw))
    seen: dict[str, int] = {}
    for n, e in enumerate(exports):
        if e.key in seen:
            raise ConfigError(f"{src}: export {n + 1} repeats export {seen[e.key] + 1} "
                              f"({e.key})")
        seen[e.key] = n
    udcs = [e.udc for e in exports if e.udc]
    if len(udcs) != len(set(udcs)):
        raise ConfigError(f"{src}: two gadget exports name the same udc")
    return SupervisorConfig(server, exports, _options(data.get("supervisor"), src), src)


def load_config(path: str | Path) -> SupervisorConfig:
    """Read and validate a supervisor configuration file."""
    data = read_toml(path)
    return parse_config(data, Path(path).resolve().parent, str(path))
