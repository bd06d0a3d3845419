"""The ``usbipx`` typer application: global options, and the commands, loaded lazily.

A board runs one command at a time, on a slow CPU: ``connect`` must not pay
for importing the gadget catalogue, the daemons' asyncio servers or the
supervisor.  :class:`LazyGroup` knows every command by name and one line of
help (:data:`COMMANDS`), so ``usbipx --help`` lists them all without
importing any, and imports a command's module only when that command runs.
"""

from __future__ import annotations

import os
from importlib import import_module

import typer
import typer.core
import typer.main
from typer import _click
from typer.models import CommandInfo

from usbipx import log
from usbipx.cli.common import State

COMMANDS: dict[str, tuple[str, str, str]] = {
    # name: (module, attribute, the first line of its help)
    "list": ("usbipx.cli.devices", "list_cmd",
             "List local devices (-l), vUDC gadgets (-d) or a remote usbipd's devices (-r)."),
    "bind": ("usbipx.cli.devices", "bind",
             "Bind a local USB device to usbip-host so it can be exported."),
    "unbind": ("usbipx.cli.devices", "unbind",
               "Give a device bound to usbip-host back to its original driver."),
    "attach": ("usbipx.cli.imports", "attach",
               "Import a device from a usbipd into this host's vhci_hcd."),
    "detach": ("usbipx.cli.imports", "detach", "Detach an imported device from its vhci port."),
    "port": ("usbipx.cli.imports", "port", "List imported devices (vhci ports in use)."),
    "connect": ("usbipx.cli.exports", "connect",
                "Export a device to a usbipa (the device side connects out: OP_REQ_EXPORT)."),
    "disconnect": ("usbipx.cli.exports", "disconnect",
                   "Withdraw an exported device from a usbipa (OP_REQ_UNEXPORT)."),
    "usbipd": ("usbipx.cli.daemons", "usbipd",
               "Device-side daemon: serve this host's devices to `attach` (DEVLIST, IMPORT)."),
    "usbipa": ("usbipx.cli.daemons", "usbipa",
               "Application-side daemon: attach devices that device sides export (EXPORT, "
               "UNEXPORT)."),
    "gadget": ("usbipx.cli.gadget", "app", "Provision USB gadgets through configfs."),
    "supervisor": ("usbipx.cli.supervisor", "app",
                   "Keep devices exported to a usbipa: one worker per device."),
    "pki": ("usbipx.cli.pki", "app",
            "A tiny certificate authority for mutual TLS (init, issue, show)."),
}


class LazyGroup(typer.core.TyperGroup):
    """The root command group: subcommands imported when they are run."""

    def list_commands(self, ctx: _click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: _click.Context, cmd_name: str) -> _click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module, attr, _ = entry
        obj = getattr(import_module(module), attr)
        if isinstance(obj, typer.Typer):
            group = typer.main.get_group(obj)
            group.name = cmd_name
            return group
        return typer.main.get_command_from_info(
            CommandInfo(name=cmd_name, callback=obj), pretty_exceptions_short=True,
            rich_markup_mode=None)

    def format_commands(self, ctx: _click.Context, formatter: _click.HelpFormatter) -> None:
        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)
        rows = [(name, _short(text, limit)) for name, (_, _, text) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _short(text: str, limit: int) -> str:
    """Click's rule for a short help: cut at a word before ``limit``, with an ellipsis."""
    if len(text) <= limit:
        return text
    return text[: limit - 3].rsplit(" ", 1)[0] + "..."


app = typer.Typer(
    name="usbipx",
    cls=LazyGroup,
    help="USB/IP tools: import and export USB devices over TCP, provision usbip-vudc gadgets.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    # Plain click help: rendering it with rich costs more than the command.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    """``--version``: the version of usbipx, then exit."""
    if value:
        from usbipx import __version__

        typer.echo(f"usbipx {__version__}")
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
