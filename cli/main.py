"""The ``usbipx`` command: global options and the command groups."""

from __future__ import annotations

import os

import typer

from usbipx import log
from usbipx.cli.common import State

app = typer.Typer(
    name="usbipx",
    help="USB/IP tools: import and export USB devices over TCP, provision usbip-vudc gadgets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: rendering it with rich costs more than the command.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    """``--version``: the installed distribution's version, then exit."""
    if not value:
        return
    # Imported here: every other command starts without importlib.metadata.
    from importlib.metadata import version

    typer.echo(f"usbipx {version('usbipx')}")
    raise typer.Exit()


@app.callback()
def _global(
    ctx: typer.Context,
    _show_version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True,
        help="Print the version of usbipx and exit.",
    ),
    debug: bool = typer.Option(False, "--debug", help="Log debug messages."),
    json_out: bool = typer.Option(False, "--json", help="Print results as JSON."),
    tcp_port: int = typer.Option(
        3240, "--tcp-port", "-t", min=1, max=65535, help="TCP port of usbipd/usbipa."
    ),
) -> None:
    """Global options apply to every command."""
    # Tests pass a State with an injected Sysfs as ``obj``, or set
    # USBIPX_ROOT to run the CLI against a fake tree.
    injected = ctx.obj.sysfs if isinstance(ctx.obj, State) else None
    ctx.obj = State(debug=debug, json=json_out, tcp_port=tcp_port,
                    root=os.environ.get("USBIPX_ROOT", "/"), sysfs=injected)
    log.configure(debug)


def _register() -> None:
    from usbipx.cli import daemons, devices, exports, gadget, imports, supervisor

    for name, func in (
        ("list", devices.list_cmd), ("bind", devices.bind), ("unbind", devices.unbind),
        ("attach", imports.attach), ("detach", imports.detach), ("port", imports.port),
        ("connect", exports.connect), ("disconnect", exports.disconnect),
        ("usbipd", daemons.usbipd), ("usbipa", daemons.usbipa),
    ):
        app.command(name)(func)
    app.add_typer(gadget.app, name="gadget")
    app.add_typer(supervisor.app, name="supervisor")
    from usbipx.cli import pki
    app.add_typer(pki.app, name="pki")


_register()


def main() -> None:
    """Console-script entry point."""
    app()
