"""``usbipd`` and ``usbipa``: the two daemons, in the foreground or detached (-D)."""

from __future__ import annotations

import asyncio
import dataclasses

import typer

from usbipx import log
from usbipx.cli.common import KEEPALIVE_HELP, State, handle_errors, keepalive, state
from usbipx.daemon.server import Handler, Server, ServerConfig, daemonize, pid_file
from usbipx.errors import UsbipError
from usbipx.net import Keepalive


def run_server(st: State, name: str, handler: Handler, cfg: ServerConfig, detach: bool,
               pidfile: str | None, log_file: str | None) -> None:
    """Bind first (so errors reach the terminal), then detach if asked, then serve."""
    log.configure(st.debug, level="INFO")
    server = Server(name, handler, cfg)
    server.open()
    if detach:
        daemonize()
    if log_file:
        from loguru import logger

        logger.add(log_file, level="DEBUG" if st.debug else "INFO")
    with pid_file(pidfile):
        asyncio.run(server.run())


def _config(st: State, ipv4: bool, ipv6: bool, tcp_port: int | None, keepalive: Keepalive,
            address: str | None) -> ServerConfig:
    if ipv4 and ipv6:
        raise UsbipError("-4 and -6 are exclusive; give neither to listen on both")
    return ServerConfig(port=tcp_port or st.tcp_port, ipv4=not ipv6, ipv6=not ipv4,
                        bind_address=address, keepalive=keepalive)


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
) -> None:
    """Device-side daemon: serve this host's devices to `attach` (DEVLIST, IMPORT)."""
    from usbipx.daemon.usbipd import UsbipdHandler
    from usbipx.driver import device_driver

    st = state(ctx)
    driver = device_driver(st.kernel(), vudc=device)
    driver.check_loaded()
    cfg = _config(st, ipv4, ipv6, tcp_port, keepalive(keepalive_opt), address)
    run_server(st, "usbipd", UsbipdHandler(driver), cfg, detach, pidfile, log_file)

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
    allow: list[str] | None = typer.Option(None, "--allow", metavar="CIDR",
                                           help="Accept exports only from CIDR (repeatable)."),
    policy_file: str | None = typer.Option(None, "--policy", metavar="FILE",
                                           help="Device policy (TOML)."),
    max_per_peer: int | None = typer.Option(None, "--max-per-peer", min=1,
                                            help="Most devices one peer may export."),
    log_file: str | None = typer.Option(None, "--log-file", help="Also log to FILE."),
    keepalive_opt: str | None = typer.Option(None, "--keepalive", help=KEEPALIVE_HELP),
) -> None:
    """Application-side daemon: attach devices that device sides export (EXPORT, UNEXPORT)."""
    from usbipx.daemon.policy import Policy, load_policy
    from usbipx.daemon.usbipa import UsbipaHandler
    from usbipx.vhci import VhciDriver

    st = state(ctx)
    policy = load_policy(policy_file) if policy_file else Policy()
    policy = policy.with_networks(allow or [])
    if max_per_peer is not None:
        policy = dataclasses.replace(policy, max_devices_per_peer=max_per_peer)
    vhci = VhciDriver(st.kernel())
    vhci.check_loaded()
    cfg = _config(st, ipv4, ipv6, tcp_port, keepalive(keepalive_opt), address)
    run_server(st, "usbipa", UsbipaHandler(vhci, policy), cfg, detach, pidfile, log_file)
