"""``usbipd`` and ``usbipa``: the two daemons, in the foreground or detached (-D).

Everything that can fail is done while the terminal still sees it: the
pid and log file paths are made absolute against the caller's directory,
the port is bound and both files are opened *before* detaching.  A failure
is one line and a non-zero exit, and nothing is left running or behind.
Detached, the command returns only once the daemon serves (0), or when it
died on the way (1).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TextIO

import typer
from loguru import logger

from usbipx import log
from usbipx.cli.common import (
    CA,
    CERT,
    KEEPALIVE_HELP,
    KEY,
    TLS_DATA,
    State,
    data_path,
    handle_errors,
    keepalive,
    state,
    tls_files,
)
from usbipx.daemon.server import Server, ServerConfig
from usbipx.errors import UsbipError
from usbipx.net import Keepalive
from usbipx.url import parse_endpoint

if TYPE_CHECKING:
    from usbipx.metrics import Metrics


def _open_pid_file(path: str) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise UsbipError(f"cannot open pid file {path}: {exc.strerror or exc}") from None


def _open_log_file(path: str) -> TextIO:
    try:
        return open(path, "a", buffering=1, encoding="utf-8")
    except OSError as exc:
        raise UsbipError(f"cannot open log file {path}: {exc.strerror or exc}") from None


def _detach() -> Callable[[], None]:
    """Double fork into a new session, chdir to /, stdio to /dev/null.

    The command's own process waits until the daemon calls the returned
    function (it serves) and exits 0, or exits 1 if the daemon dies first.
    """
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        serving = os.read(r, 1) == b"1"  # b"" when the daemon's end closes unsignalled
        if not serving:
            os.write(2, b"usbipx: error: the daemon exited while starting\n")
        os._exit(0 if serving else 1)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)

    def ready() -> None:
        with contextlib.suppress(OSError):
            os.write(w, b"1")
            os.close(w)

    return ready


@contextlib.contextmanager
def _pid_file(fd: int | None, path: str | None) -> Iterator[None]:
    """Write this process's pid into the open pid file; remove it when done."""
    if fd is None or path is None:
        yield
        return
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def run_server(st: State, server: Server, detach: bool, pidfile: str | None,
               log_file: str | None) -> None:
    """Bind and open the files (errors reach the terminal), then detach if asked, then serve.

    The server's metrics, if any, are served at their address; a detached daemon
    serves them from its final process (threads do not survive the forks), but
    whether the address can be had is checked before detaching all the same.
    """
    log.configure(st.debug, level="INFO")
    # daemonizing changes to /: relative paths mean the caller's directory.
    pid_path = os.path.abspath(pidfile) if pidfile else None
    log_path = os.path.abspath(log_file) if log_file else None
    metrics = server.metrics
    server.open()
    pid_fd: int | None = None
    try:
        if pid_path:
            pid_fd = _open_pid_file(pid_path)
        if log_path:
            logger.add(_open_log_file(log_path), level="DEBUG" if st.debug else "INFO",
                       colorize=False)
        if metrics is not None and metrics.address is not None:
            if detach:
                from usbipx.metrics import check_address

                check_address(metrics.address)
            else:
                metrics.serve()
    except UsbipError:
        server.close()
        if pid_path and pid_fd is not None:  # created just now: nothing half-done
            os.close(pid_fd)
            os.unlink(pid_path)
        raise
    ready = _detach() if detach else None
    if detach and metrics is not None and metrics.address is not None:
        metrics.serve()
    with _pid_file(pid_fd, pid_path):
        asyncio.run(server.run(None if ready is None else lambda _: ready()))


METRICS = typer.Option(
    None, "--metrics", metavar="ADDR:PORT",
    help="Serve Prometheus metrics at http://ADDR:PORT/metrics (e.g. 127.0.0.1:9240); "
         "off by default.")


def metrics_of(text: str | None) -> Metrics | None:
    """The --metrics option: the metrics to serve there, or None."""
    if text is None:
        return None
    from usbipx.metrics import Metrics, parse_address

    return Metrics(parse_address(text))  # a bad value is an error before anything starts


def _config(st: State, ipv4: bool, ipv6: bool, tcp_port: int | None, keepalive: Keepalive,
            address: str | None, max_connections: int, max_per_address: int,
            listen: list[str] | None, cert: str | None, key: str | None, ca: str | None,
            tls_data: str) -> ServerConfig:
    if ipv4 and ipv6:
        raise UsbipError("-4 and -6 are exclusive; give neither to listen on both")
    port = tcp_port or st.tcp_port
    endpoints = tuple(parse_endpoint(u, port) for u in listen or [])
    if endpoints and (ipv4 or ipv6 or address):
        raise UsbipError("--listen names the addresses; -4, -6 and --address go without it")
    secure = any(ep.secure for ep in endpoints)
    files = tls_files(cert, key, ca) if secure else None
    if files is None and secure:
        raise UsbipError("tls:// and wss:// listeners need --cert, --key and --ca "
                         "(or USBIPX_CERT, USBIPX_KEY, USBIPX_CA)")
    return ServerConfig(port=port, ipv4=not ipv6, ipv6=not ipv4,
                        bind_address=address, keepalive=keepalive,
                        max_connections=max_connections, max_per_address=max_per_address,
                        listen=endpoints, tls=files, data_path=data_path(tls_data))


MAX_CONNECTIONS_HELP = "Most connections served at once (default 256)."
LISTEN = typer.Option(
    None, "--listen", "-l", metavar="URL",
    help="Listen on tcp://ADDR:PORT, tls://ADDR:PORT or wss://ADDR:PORT/PATH (repeatable; "
         "default: plain TCP on every address, port -t).")
MAX_PER_ADDRESS_HELP = "Most connections from one address at once (default 64)."


@handle_errors
def usbipd(
    ctx: typer.Context,
    ipv4: bool = typer.Option(False, "-4", "--ipv4", help="Listen on IPv4 only."),
    ipv6: bool = typer.Option(False, "-6", "--ipv6", help="Listen on IPv6 only."),
    detach: bool = typer.Option(False, "-D", "--daemon", help="Run in the background."),
    pidfile: str | None = typer.Option(None, "-P", "--pid-file", metavar="FILE",
                                help="Write the daemon's pid to FILE."),
    device: bool = typer.Option(False, "-e", "--device",
                                help="Export usbip-vudc gadgets, not usbip-host devices."),
    tcp_port: int | None = typer.Option(None, "-t", "--tcp-port", min=1, max=65535,
                                 help="TCP port (default 3240)."),
    address: str | None = typer.Option(None, "--address", help="Listen on this address only."),
    log_file: str | None = typer.Option(None, "--log-file", help="Also log to FILE."),
    keepalive_opt: str | None = typer.Option(None, "--keepalive", help=KEEPALIVE_HELP),
    max_connections: int = typer.Option(256, "--max-connections", min=1,
                                        help=MAX_CONNECTIONS_HELP),
    max_per_address: int = typer.Option(64, "--max-per-address", min=1,
                                        help=MAX_PER_ADDRESS_HELP),
    listen: list[str] | None = LISTEN,
    cert: str | None = CERT,
    key: str | None = KEY,
    ca: str | None = CA,
    tls_data: str = TLS_DATA,
    metrics_opt: str | None = METRICS,
) -> None:
    """Device-side daemon: serve this host's devices to `attach` (DEVLIST, IMPORT)."""
    from usbipx.daemon.usbipd import UsbipdHandler
    from usbipx.drivers import device_driver

    st = state(ctx)
    metrics = metrics_of(metrics_opt)
    driver = device_driver(st.kernel(), vudc=device)
    driver.check_loaded()
    cfg = _config(st, ipv4, ipv6, tcp_port, keepalive(keepalive_opt), address,
                  max_connections, max_per_address, listen, cert, key, ca, tls_data)
    server = Server("usbipd", UsbipdHandler(driver, metrics), cfg, metrics=metrics)
    run_server(st, server, detach, pidfile, log_file)


@handle_errors
def usbipa(
    ctx: typer.Context,
    ipv4: bool = typer.Option(False, "-4", "--ipv4", help="Listen on IPv4 only."),
    ipv6: bool = typer.Option(False, "-6", "--ipv6", help="Listen on IPv6 only."),
    detach: bool = typer.Option(False, "-D", "--daemon", help="Run in the background."),
    pidfile: str | None = typer.Option(None, "-P", "--pid-file", metavar="FILE",
                                       help="Write the daemon's pid to FILE."),
    tcp_port: int | None = typer.Option(None, "-t", "--tcp-port", min=1, max=65535,
                                        help="TCP port (default 3240)."),
    address: str | None = typer.Option(None, "--address",
                                       help="Listen on this address only."),
    allow: list[str] | None = typer.Option(
        None, "--allow", metavar="CIDR",
        help="Accept connections only from CIDR (repeatable); others are closed at once."),
    policy_file: str | None = typer.Option(None, "--policy", metavar="FILE",
                                           help="Device policy (TOML)."),
    max_per_peer: int | None = typer.Option(None, "--max-per-peer", min=1,
                                            help="Most devices one peer may export."),
    log_file: str | None = typer.Option(None, "--log-file", help="Also log to FILE."),
    keepalive_opt: str | None = typer.Option(None, "--keepalive", help=KEEPALIVE_HELP),
    max_connections: int = typer.Option(256, "--max-connections", min=1,
                                        help=MAX_CONNECTIONS_HELP),
    max_per_address: int = typer.Option(64, "--max-per-address", min=1,
                                        help=MAX_PER_ADDRESS_HELP),
    listen: list[str] | None = LISTEN,
    cert: str | None = CERT,
    key: str | None = KEY,
    ca: str | None = CA,
    tls_data: str = TLS_DATA,
    metrics_opt: str | None = METRICS,
) -> None:
    """Application-side daemon: attach devices that device sides export (EXPORT, UNEXPORT)."""
    from usbipx.daemon.policy import Policy, load_policy
    from usbipx.daemon.usbipa import UsbipaHandler
    from usbipx.vhci import VhciDriver

    st = state(ctx)
    metrics = metrics_of(metrics_opt)
    policy = load_policy(policy_file) if policy_file else Policy()
    policy = policy.with_networks(allow or [])
    if max_per_peer is not None:
        policy = dataclasses.replace(policy, max_devices_per_peer=max_per_peer)
    vhci = VhciDriver(st.kernel())
    vhci.check_loaded()
    cfg = _config(st, ipv4, ipv6, tcp_port, keepalive(keepalive_opt), address,
                  max_connections, max_per_address, listen, cert, key, ca, tls_data)
    # The peer policy is applied at accept too (a refused address takes no
    # slot), and to a TLS peer's identity right after the handshake.
    server = Server("usbipa", UsbipaHandler(vhci, policy, metrics), cfg, policy.refuse_peer,
                    policy.refuse_identity, metrics)
    run_server(st, server, detach, pidfile, log_file)
