"""``connect`` and ``disconnect``: the device side exports to a usbipa."""

from __future__ import annotations

import typer

from usbipx.cli.common import KEEPALIVE_HELP, emit_json, handle_errors, keepalive, state
from usbipx.driver import device_driver
from usbipx.names import is_vudc_busid


def _mode(busid: str, device: bool) -> bool:
    """vUDC mode if asked (-d), or if the bus id plainly names a vUDC."""
    return device or is_vudc_busid(busid)


@handle_errors
def connect(
    ctx: typer.Context,
    remote: str = typer.Option(..., "--remote", "-r", metavar="HOST",
                               help="Host running usbipa."),
    busid: str = typer.Option(..., "--busid", "-b",
                              help="Bus id (1-1) or, with -d, vUDC (usbip-vudc.0)."),
    device: bool = typer.Option(False, "--device", "-d",
                                help="vUDC mode: export the gadget bound to a usbip-vudc."),
    keepalive_opt: str | None = typer.Option(None, "--keepalive", help=KEEPALIVE_HELP),
) -> None:
    """Export a device to a usbipa (the device side connects out: OP_REQ_EXPORT)."""
    from usbipx.client import export_device, export_records

    st = state(ctx)
    driver = device_driver(st.kernel(), vudc=_mode(busid, device))
    res = export_device(remote, busid, driver, st.tcp_port, keepalive(keepalive_opt),
                        store=export_records(st.kernel()))
    if st.json:
        emit_json({"busid": busid, "host": remote, "port": st.tcp_port,
                   "bound_here": res.bound_here})
    else:
        typer.echo(f"exported {busid} to {remote}:{st.tcp_port}")

@handle_errors
def disconnect(
    ctx: typer.Context,
    remote: str = typer.Option(..., "--remote", "-r", metavar="HOST",
                               help="Host running usbipa."),
    busid: str = typer.Option(..., "--busid", "-b",
                              help="Bus id (1-1) or, with -d, vUDC (usbip-vudc.0)."),
    device: bool = typer.Option(False, "--device", "-d", help="vUDC mode."),
    force: bool = typer.Option(False, "--force",
                               help="Withdraw the device locally even if usbipa fails."),
) -> None:
    """Withdraw an exported device from a usbipa (OP_REQ_UNEXPORT)."""
    from usbipx.client import export_records, withdraw

    st = state(ctx)
    driver = device_driver(st.kernel(), vudc=_mode(busid, device))
    withdraw(remote, busid, driver, export_records(st.kernel()), st.tcp_port, force)
    if st.json:
        emit_json({"busid": busid, "host": remote, "unexported": True})
    else:
        typer.echo(f"unexported {busid} from {remote}")
