"""``list``, ``bind``, ``unbind``: the devices of this host and of a remote usbipd."""

from __future__ import annotations

from typing import Any

import typer

from usbipx import usbids
from usbipx.cli.common import CA, CERT, KEY, PROXY, REMOTE_HELP, emit_json, handle_errors, state
from usbipx.cli.common import remote as remote_of
from usbipx.driver import LocalDevice
from usbipx.errors import UsbipError
from usbipx.usbdevice import ExportableDevice, UsbDevice


def device_json(dev: UsbDevice, interfaces: tuple[Any, ...] = ()) -> dict[str, Any]:
    """A device record as JSON, with names from usb.ids."""
    vendor, product = usbids.names(dev.id_vendor, dev.id_product)
    return {
        "busid": dev.busid,
        "path": dev.path,
        "busnum": dev.busnum,
        "devnum": dev.devnum,
        "speed": dev.speed.name.lower(),
        "id_vendor": f"{dev.id_vendor:04x}",
        "id_product": f"{dev.id_product:04x}",
        "bcd_device": f"{dev.bcd_device:04x}",
        "vendor": vendor,
        "product": product,
        "class": f"{dev.device_class:02x}/{dev.device_subclass:02x}/{dev.device_protocol:02x}",
        "configuration": dev.configuration_value,
        "num_interfaces": dev.num_interfaces,
        "interfaces": [
            f"{i.interface_class:02x}/{i.interface_subclass:02x}/{i.interface_protocol:02x}"
            for i in interfaces
        ],
    }


def local_json(d: LocalDevice) -> dict[str, Any]:
    out = device_json(d.record, d.interfaces)
    out["serial"] = d.serial
    out["driver"] = d.driver
    out["status"] = d.status.name.lower() if d.status else None
    return out


def _print_local(devs: list[LocalDevice], parsable: bool) -> None:
    for d in devs:
        r = d.record
        if parsable:
            typer.echo(f"busid={r.busid}#usbid={r.id_vendor:04x}:{r.id_product:04x}#")
            continue
        typer.echo(f" - busid {r.busid} ({r.id_vendor:04x}:{r.id_product:04x})")
        typer.echo(f"   {usbids.describe(r.id_vendor, r.id_product)}")
        if d.serial is not None:
            from usbipx.deviceid import shown_serial

            typer.echo(f"   serial {shown_serial(d.serial)}")
        typer.echo("")


def _print_remote(host: str, devs: list[ExportableDevice]) -> None:
    typer.echo("Exportable USB devices")
    typer.echo("======================")
    typer.echo(f" - {host}")
    for e in devs:
        r = e.device
        typer.echo(f"{r.busid:>11}: {usbids.describe(r.id_vendor, r.id_product)}")
        typer.echo(f"{'':>11}: {r.path}")
        cls = usbids.describe_class(r.device_class, r.device_subclass, r.device_protocol)
        typer.echo(f"{'':>11}: {cls}")
        for n, i in enumerate(e.interfaces):
            icls = usbids.describe_class(i.interface_class, i.interface_subclass,
                                         i.interface_protocol)
            typer.echo(f"{'':>11}: {n:2d} - {icls}")
        typer.echo("")


def _print_vudc(devs: list[tuple[str, LocalDevice | None]]) -> None:
    for name, d in devs:
        if d is None:
            typer.echo(f" - {name}: no gadget bound")
            continue
        r = d.record
        st = d.status.name.lower() if d.status else "unknown"
        typer.echo(f" - {name}: gadget {d.driver} ({r.id_vendor:04x}:{r.id_product:04x}) "
                   f"{r.speed.label}, {st}")
        typer.echo(f"   {usbids.describe(r.id_vendor, r.id_product)}")
        typer.echo("")


@handle_errors
def list_cmd(
    ctx: typer.Context,
    local: bool = typer.Option(False, "--local", "-l", help="List local USB devices."),
    remote: str | None = typer.Option(None, "--remote", "-r", metavar="URL",
                                      help="List the devices a usbipd offers: " + REMOTE_HELP),
    device: bool = typer.Option(False, "--device", "-d",
                                help="List local usbip-vudc instances and their gadgets."),
    parsable: bool = typer.Option(False, "--parsable", "-p",
                                  help="Parsable output (with -l)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    cert: str | None = CERT,
    key: str | None = KEY,
    ca: str | None = CA,
    proxy: str | None = PROXY,
) -> None:
    """List local devices (-l), vUDC gadgets (-d) or a remote usbipd's devices (-r)."""
    st = state(ctx)
    as_json = json_out or st.json
    chosen = sum([local, remote is not None, device])
    if chosen != 1:
        raise UsbipError("choose exactly one of --local, --remote HOST, --device")
    if remote is not None:
        from usbipx.client import list_remote

        devs = list_remote(remote_of(st, remote, cert, key, ca, proxy=proxy))
        if as_json:
            emit_json([device_json(e.device, e.interfaces) for e in devs])
        else:
            _print_remote(remote, devs)
        return
    if device:
        from usbipx.gadget.vudc import VudcDriver

        drv = VudcDriver(st.kernel())
        drv.check_loaded()
        rows: list[tuple[str, LocalDevice | None]] = []
        for name in drv.instances():
            try:
                rows.append((name, drv.read_device(name)))
            except UsbipError:
                rows.append((name, None))
        if as_json:
            emit_json([{"vudc": n, "gadget": d.driver if d else None,
                        "device": local_json(d) if d else None} for n, d in rows])
        else:
            _print_vudc(rows)
        return
    from usbipx.stubmode.host import HostDriver

    local_devs = HostDriver(st.kernel()).list_devices()
    if as_json:
        emit_json([local_json(d) for d in local_devs])
    else:
        _print_local(local_devs, parsable)

ID_HELP = ("The device by identity instead: VID:PID or VID:PID:SERIAL (hex ids; an error "
           "lists the candidates if several match).")


@handle_errors
def bind(
    ctx: typer.Context,
    busid_opt: str | None = typer.Option(None, "--busid", "-b",
                                         help="Bus id of the device, e.g. 1-1."),
    dev_id: str | None = typer.Option(None, "--id", metavar="VID:PID[:SERIAL]", help=ID_HELP),
) -> None:
    """Bind a local USB device to usbip-host so it can be exported."""
    from usbipx.deviceid import busid_for
    from usbipx.stubmode.host import HostDriver

    st = state(ctx)
    busid = busid_for(st.kernel(), busid_opt, dev_id)
    lease = HostDriver(st.kernel()).bind(busid)
    if st.json:
        emit_json({"busid": busid, "driver": "usbip-host",
                   "previous_driver": lease.original_driver})
    else:
        typer.echo(f"bind device on busid {busid}: complete")

@handle_errors
def unbind(
    ctx: typer.Context,
    busid_opt: str | None = typer.Option(None, "--busid", "-b",
                                         help="Bus id of the device, e.g. 1-1."),
    dev_id: str | None = typer.Option(None, "--id", metavar="VID:PID[:SERIAL]", help=ID_HELP),
) -> None:
    """Give a device bound to usbip-host back to its original driver."""
    from usbipx.deviceid import busid_for
    from usbipx.stubmode.host import HostDriver

    st = state(ctx)
    busid = busid_for(st.kernel(), busid_opt, dev_id)
    now = HostDriver(st.kernel()).unbind(busid)
    if st.json:
        emit_json({"busid": busid, "driver": now})
    else:
        typer.echo(f"unbind device on busid {busid}: complete")
