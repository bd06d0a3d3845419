"""``connect`` and ``disconnect``: the device side exports to a usbipa."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import typer

from usbipx.cli.common import (
    CA,
    CERT,
    KEEPALIVE_HELP,
    KEY,
    PROXY,
    REMOTE_HELP,
    TLS_DATA,
    emit_json,
    handle_errors,
    state,
)
from usbipx.cli.common import remote as remote_of
from usbipx.drivers import device_driver
from usbipx.names import is_vudc_busid

if TYPE_CHECKING:
    from usbipx.remote import Relayer


ID_HELP = ("The device by identity instead of -b: VID:PID or VID:PID:SERIAL (with -d: the "
           "gadget's ids and serialnumber).")


def _mode(busid: str, device: bool) -> bool:
    """vUDC mode if asked (-d), or if the bus id plainly names a vUDC."""
    return device or is_vudc_busid(busid)


@handle_errors
def connect(
    ctx: typer.Context,
    remote: str = typer.Option(..., "--remote", "-r", metavar="URL",
                               help="The usbipa: " + REMOTE_HELP),
    busid_opt: str | None = typer.Option(None, "--busid", "-b",
                                         help="Bus id (1-1) or, with -d, vUDC (usbip-vudc.0)."),
    dev_id: str | None = typer.Option(None, "--id", metavar="VID:PID[:SERIAL]", help=ID_HELP),
    device: bool = typer.Option(False, "--device", "-d",
                                help="vUDC mode: export the gadget bound to a usbip-vudc."),
    keepalive_opt: str | None = typer.Option(None, "--keepalive", help=KEEPALIVE_HELP),
    cert: str | None = CERT,
    key: str | None = KEY,
    ca: str | None = CA,
    tls_data: str = TLS_DATA,
    proxy: str | None = PROXY,
) -> None:
    """Export a device to a usbipa (the device side connects out: OP_REQ_EXPORT).

    Over TLS without kernel TLS, a relay keeps running in the background until
    the export ends (``disconnect``, or the link dies)."""
    from usbipx.client import export_device, export_records
    from usbipx.deviceid import busid_for

    st = state(ctx)
    busid = busid_for(st.kernel(), busid_opt, dev_id, vudc=device)
    target = remote_of(st, remote, cert, key, ca, keepalive_opt, tls_data, proxy)
    driver = device_driver(st.kernel(), vudc=_mode(busid, device))
    store = export_records(st.kernel())

    def export() -> tuple[dict[str, Any], Relayer | None, Callable[[], None]]:
        res = export_device(target, busid, driver, store=store)

        def record_relay() -> None:  # so that disconnect can end it
            store.update(busid, remote=str(target), transport=res.path.transport)

        return ({"bound_here": res.bound_here, "transport": res.path.transport},
                res.path.relay, record_relay)

    if target.endpoint.secure:
        from usbipx.background import in_background

        # A relay may have to outlive this command: the export runs in the
        # process that will be the relay.
        result = in_background(export)
    else:
        result = export()[0]
    transport = result["transport"]
    if st.json:
        emit_json({"busid": busid, "host": target.host, "port": target.port,
                   "remote": str(target), "bound_here": result["bound_here"],
                   "transport": transport})
    else:
        typer.echo(f"exported {busid} to {target}"
                   + ("" if transport == "tcp" else f" ({transport})"))


@handle_errors
def disconnect(
    ctx: typer.Context,
    remote: str = typer.Option(..., "--remote", "-r", metavar="URL",
                               help="The usbipa: " + REMOTE_HELP),
    busid_opt: str | None = typer.Option(None, "--busid", "-b",
                                         help="Bus id (1-1) or, with -d, vUDC (usbip-vudc.0)."),
    dev_id: str | None = typer.Option(None, "--id", metavar="VID:PID[:SERIAL]", help=ID_HELP),
    device: bool = typer.Option(False, "--device", "-d", help="vUDC mode."),
    force: bool = typer.Option(False, "--force",
                               help="Withdraw the device locally even if usbipa fails."),
    cert: str | None = CERT,
    key: str | None = KEY,
    ca: str | None = CA,
    proxy: str | None = PROXY,
) -> None:
    """Withdraw an exported device from a usbipa (OP_REQ_UNEXPORT)."""
    from usbipx.client import export_records, withdraw
    from usbipx.deviceid import busid_for

    st = state(ctx)
    busid = busid_for(st.kernel(), busid_opt, dev_id, vudc=device)
    target = remote_of(st, remote, cert, key, ca, proxy=proxy)
    driver = device_driver(st.kernel(), vudc=_mode(busid, device))
    withdraw(target, busid, driver, export_records(st.kernel()), force)
    if st.json:
        emit_json({"busid": busid, "host": target.host, "unexported": True})
    else:
        typer.echo(f"unexported {busid} from {remote}")
