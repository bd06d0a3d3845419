"""``attach``, ``detach``, ``port``: the application side's vhci_hcd ports."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from usbipx import usbids
from usbipx.cli.common import (
    CA,
    CERT,
    KEY,
    PROXY,
    REMOTE_HELP,
    TLS_DATA,
    emit_json,
    handle_errors,
    state,
)
from usbipx.cli.common import remote as remote_of
from usbipx.errors import UsbipError
from usbipx.sysfs import Sysfs
from usbipx.vhci import ImportedDevice, VhciDriver

if TYPE_CHECKING:
    from usbipx.remote import Relayer, Remote


def _local_names(sysfs: Sysfs, busid: str) -> tuple[int, int] | None:
    """idVendor/idProduct of the vhci-side device, if it has enumerated."""
    from usbipx.stubmode.host import HostDriver

    return HostDriver(sysfs).ids(busid)


def imported_json(sysfs: Sysfs, imp: ImportedDevice) -> dict[str, Any]:
    p = imp.port
    ids = _local_names(sysfs, p.local_busid) if p.local_busid != "0-0" else None
    return {
        "port": p.port,
        "hub": p.hub,
        "status": p.status.name.lower(),
        "speed": p.speed.name.lower(),
        "devid": p.devid,
        "local_busid": p.local_busid,
        "id_vendor": f"{ids[0]:04x}" if ids else None,
        "id_product": f"{ids[1]:04x}" if ids else None,
        "host": imp.record.host if imp.record else None,
        "remote_port": imp.record.service if imp.record else None,
        "remote_busid": imp.record.busid if imp.record else None,
        "transport": imp.record.transport if imp.record else None,
        "identity": imp.record.identity if imp.record else None,
    }


@handle_errors
def attach(
    ctx: typer.Context,
    remote: str = typer.Option(..., "--remote", "-r", metavar="URL",
                               help="The usbipd: " + REMOTE_HELP),
    busid: str | None = typer.Option(None, "--busid", "-b",
                                     help="Bus id of the remote device."),
    device: str | None = typer.Option(None, "--device", "-d", metavar="VUDC",
                               help="Remote vUDC to attach, e.g. usbip-vudc.0."),
    dev_id: str | None = typer.Option(
        None, "--id", metavar="VID:PID",
        help="The remote device by vendor:product (hex), matched in the usbipd's device "
             "list; that list carries no serial numbers, so VID:PID only."),
    cert: str | None = CERT,
    key: str | None = KEY,
    ca: str | None = CA,
    tls_data: str = TLS_DATA,
    proxy: str | None = PROXY,
) -> None:
    """Import a device from a usbipd into this host's vhci_hcd."""
    from usbipx.client import attach_remote

    given = [x for x in (busid, device, dev_id) if x is not None]
    if len(given) != 1:
        raise UsbipError("give exactly one of --busid BUSID, --device VUDC or --id VID:PID")
    st = state(ctx)
    source = remote_of(st, remote, cert, key, ca, tls_data=tls_data, proxy=proxy)
    target = given[0] if dev_id is None else _remote_busid(source, dev_id)
    vhci = VhciDriver(st.kernel())

    def attach() -> tuple[dict[str, Any], Relayer | None, None]:
        res = attach_remote(source, target, vhci)
        return ({"port": res.port, "host": res.host, "busid": res.busid,
                 "transport": res.path.transport}, res.path.relay, None)

    if source.endpoint.secure:
        from usbipx.background import in_background

        # A relay may have to outlive this command: see usbipx.background.
        result = in_background(attach)
    else:
        result = attach()[0]
    if st.json:
        emit_json(result)
    else:
        transport = result["transport"]
        typer.echo(f"attached {result['busid']} from {result['host']} to port "
                   f"{result['port']}" + ("" if transport == "tcp" else f" ({transport})"))


def _remote_busid(source: Remote, dev_id: str) -> str:
    """The bus id of the one device of the usbipd's list that ``--id`` names."""
    from usbipx.client import list_remote
    from usbipx.deviceid import parse_device_id, select_remote

    want = parse_device_id(dev_id)
    if want.serial is not None:  # refused before asking the peer: select_remote says why
        return select_remote(want, [])
    return select_remote(want, [(e.device.busid, e.device.id_vendor, e.device.id_product)
                                for e in list_remote(source)])


@handle_errors
def detach(
    ctx: typer.Context,
    port: int = typer.Option(..., "--port", "-p", help="vhci port number (see `port`)."),
) -> None:
    """Detach an imported device from its vhci port."""
    from usbipx.client import detach_port

    st = state(ctx)
    done = detach_port(port, VhciDriver(st.kernel()))
    if st.json:
        emit_json({"port": port, "detached": True, "was_attached": done})
    else:
        # As Debian's usbip: a free port is "already detached", and no error.
        typer.echo(f"port {port} is now detached" if done
                   else f"port {port} is already detached")

@handle_errors
def port(
    ctx: typer.Context,
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List imported devices (vhci ports in use)."""
    st = state(ctx)
    sysfs = st.kernel()
    vhci = VhciDriver(sysfs)
    imported = vhci.imported()
    if json_out or st.json:
        emit_json([imported_json(sysfs, i) for i in imported])
        return
    typer.echo("Imported USB devices")
    typer.echo("====================")
    for imp in imported:
        p = imp.port
        typer.echo(f"Port {p.port:02d}: <{_status_label(p.status.name)}> at {p.speed.label}")
        ids = _local_names(sysfs, p.local_busid)
        if ids:
            typer.echo(f"       {usbids.describe(*ids)}")
        if imp.record:
            r = imp.record
            typer.echo(f"{p.local_busid:>10} -> usbip://{r.host}:{r.service}/{r.busid}")
            if r.transport != "tcp" or r.identity:  # plain TCP: the C tools' lines only
                who = f", identity {r.identity}" if r.identity else ""
                typer.echo(f"           -> transport {r.transport}{who}")
        else:
            typer.echo(f"{p.local_busid:>10} -> unknown host, remote port and remote busid")
        typer.echo(f"           -> remote bus/dev {p.devid >> 16:03d}/{p.devid & 0xFFFF:03d}")

def _status_label(name: str) -> str:
    return {"USED": "Port in Use", "NOTASSIGNED": "Port Initializing",
            "ERROR": "Port Error"}.get(name, name.title())
