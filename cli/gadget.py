"""``usbipx gadget``: provision USB gadgets through configfs."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from usbipx.cli.common import emit_json, handle_errors, state
from usbipx.errors import ConfigError
from usbipx.gadget.configfs import Configfs
from usbipx.gadget.dump import dump_spec, spec_to_dict
from usbipx.gadget.live import list_gadgets, read_gadget, save_gadget
from usbipx.gadget.spec import (
    LANG_EN_US,
    GadgetSpec,
    load_spec,
    loads_spec,
    validate_gadget_name,
    validate_udc_name,
)
from usbipx.gadget.transaction import AppliedGadget, apply_spec, remove_gadget
from usbipx.gadget.udc import UdcInfo, list_udcs

app = typer.Typer(help="Provision USB gadgets through configfs.", no_args_is_help=True)

JSON_HELP = "Print JSON (same as the global --json)."


def _json(ctx: typer.Context, local: bool) -> bool:
    return local or state(ctx).json


@app.command("apply")
@handle_errors
def apply_cmd(
    ctx: typer.Context,
    spec_file: str = typer.Argument(..., metavar="SPEC", help="TOML gadget spec ('-': stdin)."),
    udc: str | None = typer.Option(
        None, "--udc", metavar="NAME|auto|none",
        help="UDC to bind to (overrides the spec's udc); auto picks a free usbip-vudc.N first.",
    ),
    default_udc: str | None = typer.Option(
        None, "--default-udc", metavar="NAME|auto|none",
        help="UDC to bind to if the spec names none (the spec's udc wins).",
    ),
    wait: float = typer.Option(
        0, "--wait", min=0, metavar="SECONDS",
        help="Wait up to SECONDS for the UDC to appear and be free (auto: for a free one).",
    ),
    expect_name: str | None = typer.Option(
        None, "--expect-name", metavar="NAME",
        help="Refuse a SPEC whose gadget is not named NAME.",
    ),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Create a gadget from SPEC, or converge the existing one to it (idempotent).

    At boot, usbipx-gadget@NAME.service runs `gadget apply
    /etc/usbipx/gadgets/NAME.toml --expect-name NAME --default-udc auto --wait 60`
    and `gadget remove NAME` when stopped: the spec's name must be the unit's
    instance name.
    """
    for value in (udc, default_udc):
        if value is not None and value not in ("auto", "none"):
            validate_udc_name(value)
    if expect_name is not None:
        validate_gadget_name(expect_name)
    source = "<stdin>" if spec_file == "-" else spec_file
    spec = loads_spec(sys.stdin.read(), source=source) if spec_file == "-" else load_spec(spec_file)
    if expect_name is not None and spec.name != expect_name:
        raise ConfigError(f"{source}: the gadget is named {spec.name!r}, not {expect_name!r} "
                          "as --expect-name says (a usbipx-gadget@NAME unit applies NAME.toml, "
                          "whose name must be NAME)")
    if spec.udc is None and default_udc is not None:
        spec = replace(spec, udc=default_udc)
    result = apply_spec(spec, state(ctx).kernel(), udc=udc, wait=wait)
    if _json(ctx, json_out):
        emit_json(_applied_dict(result))
        return
    what = "created" if result.created else ("updated" if result.changed else "unchanged")
    where = f"bound to {result.udc}" if result.udc else "not bound"
    steps = f" ({len(result.steps)} steps)" if result.changed else ""
    typer.echo(f"gadget {result.name}: {what}, {where}{steps}")


def _applied_dict(r: AppliedGadget) -> dict[str, Any]:
    return {"name": r.name, "path": r.path, "udc": r.udc, "created": r.created,
            "changed": r.changed, "steps": list(r.steps)}


@app.command("remove")
@handle_errors
def remove_cmd(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Gadget name (directory under usb_gadget/)."),
) -> None:
    """Unbind and remove a gadget, in the order the kernel requires."""
    remove_gadget(name, state(ctx).kernel())
    if state(ctx).json:
        emit_json({"name": name, "removed": True})
    else:
        typer.echo(f"gadget {name}: removed")


@app.command("list")
@handle_errors
def list_cmd(
    ctx: typer.Context,
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """List the gadgets in configfs with their UDC and functions."""
    sysfs = state(ctx).kernel()
    Configfs(sysfs).require()
    gadgets = [read_gadget(n, sysfs) for n in list_gadgets(sysfs)]
    if _json(ctx, json_out):
        emit_json([_summary(g) for g in gadgets])
        return
    if not gadgets:
        typer.echo("no gadgets")
        return
    width = max(len(g.name) for g in gadgets)
    for g in gadgets:
        configs = "; ".join(f"{c.dirname}: {' '.join(c.functions) or '-'}" for c in g.configs)
        typer.echo(f"{g.name:<{width}}  {g.udc or '-':<14}  {configs or '-'}")


def _summary(g: GadgetSpec) -> dict[str, Any]:
    return {
        "name": g.name,
        "udc": g.udc,
        "id_vendor": g.attrs.get("idVendor"),
        "id_product": g.attrs.get("idProduct"),
        "configs": {c.dirname: list(c.functions) for c in g.configs},
        "functions": list(g.functions),
    }


@app.command("show")
@handle_errors
def show_cmd(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Gadget name."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Show a gadget: ids, strings, configs, functions and their attributes."""
    g = read_gadget(name, state(ctx).kernel())
    if _json(ctx, json_out):
        emit_json(spec_to_dict(g))
        return
    vid, pid = g.attrs.get("idVendor"), g.attrs.get("idProduct")
    typer.echo(f"gadget {g.name}")
    typer.echo(f"  udc: {g.udc or '-'}")
    if isinstance(vid, int) and isinstance(pid, int):
        typer.echo(f"  id: {vid:04x}:{pid:04x}")
    for lang, table in sorted(g.strings.items()):
        tag = "" if lang == LANG_EN_US else f" (0x{lang:04x})"
        for key, text in table.items():
            typer.echo(f"  {key}{tag}: {text}")
    for c in g.configs:
        conf = c.strings.get(LANG_EN_US, {}).get("configuration")
        extra = f" \"{conf}\"" if conf else ""
        power = c.attrs.get("MaxPower")
        typer.echo(f"  config {c.dirname}{extra}: {', '.join(c.functions) or '-'}"
                   + (f" (MaxPower {_fmt(power)} mA)" if power is not None else ""))
    if g.os_desc is not None:
        od, linked = g.os_desc, g.os_desc_config()
        typer.echo(f"  os_desc: use {int(od.use)}, b_vendor_code 0x{od.b_vendor_code:02x}, "
                   f"qw_sign {_fmt(od.qw_sign or '')}, "
                   f"config {linked.dirname if linked is not None else '-'}")
    for f in g.functions.values():
        typer.echo(f"  function {f.name}")
        for k, v in f.attrs.items():
            typer.echo(f"    {k} = {_fmt(v)}")
        for n, lun in f.luns.items():
            typer.echo(f"    lun.{n}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in lun.items()))
        for iface, ids in f.os_desc.items():
            typer.echo(f"    os_desc interface.{iface}: compatible_id {_fmt(ids.compatible_id)}, "
                       f"sub_compatible_id {_fmt(ids.sub_compatible_id)}")


def _fmt(v: object) -> str:
    if isinstance(v, bytes):
        return v.hex(" ") if len(v) <= 16 else f"{v[:16].hex(' ')} ... ({len(v)} bytes)"
    return repr(v) if isinstance(v, str) else str(v)


@app.command("save")
@handle_errors
def save_cmd(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Gadget name."),
    output: str | None = typer.Option(None, "--output", "-o", metavar="FILE",
                                      help="Write to FILE, not stdout."),
) -> None:
    """Write a live gadget as a spec that `gadget apply` turns back into the same tree."""
    text = dump_spec(save_gadget(name, state(ctx).kernel()))
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{output}: {exc.strerror}") from None
    typer.echo(f"gadget {name}: saved to {output}", err=True)


@app.command("udc")
@handle_errors
def udc_cmd(
    ctx: typer.Context,
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """List the UDCs (/sys/class/udc) and which gadget holds each."""
    udcs = list_udcs(state(ctx).kernel())
    if _json(ctx, json_out):
        emit_json([_udc_dict(u) for u in udcs])
        return
    if not udcs:
        typer.echo("no UDCs (modprobe usbip-vudc num=N, or dummy_hcd)")
        return
    width = max(len(u.name) for u in udcs)
    for u in udcs:
        typer.echo(f"{u.name:<{width}}  {u.state or '-':<14}  {u.holder or 'free'}")


def _udc_dict(u: UdcInfo) -> dict[str, Any]:
    return {"name": u.name, "state": u.state, "gadget": u.gadget, "holder": u.holder,
            "free": u.free, "vudc": u.is_vudc}
