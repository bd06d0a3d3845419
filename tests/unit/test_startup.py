"""Start-up on a slow board: a command imports what it needs and nothing else.

Each case runs the console script's ``main()`` in a fresh interpreter and
looks at ``sys.modules`` afterwards; time itself is measured by scripts/bench.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from usbipx.cli.app import COMMANDS, app

PROBE = (
    "import sys\n"
    "from usbipx.cli.main import main\n"
    "sys.argv = ['usbipx', *sys.argv[1:]]\n"
    "try:\n"
    "    main()\n"
    "except SystemExit:\n"
    "    pass\n"
    "print(' '.join(sorted(sys.modules)), file=sys.stderr)\n"
)

HEAVY = {"asyncio", "multiprocess", "pyudev", "tomllib", "usbipx.gadget.functions",
         "usbipx.gadget.attrs", "usbipx.gadget.plan", "usbipx.daemon.server",
         "usbipx.daemon.supervisor", "cryptography", "websockets", "ssl", "prometheus_client"}


def loaded(tmp_path, *args: str) -> set[str]:
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path, env={"USBIPX_ROOT": str(tmp_path)})
    return set(r.stderr.strip().splitlines()[-1].split())


def test_version_does_not_even_load_the_cli_framework(tmp_path) -> None:
    mods = loaded(tmp_path, "--version")
    assert "typer" not in mods and "loguru" not in mods
    assert not mods & HEAVY


@pytest.mark.parametrize("args", [
    ["--help"],
    ["connect", "--help"],
    ["connect", "-r", "127.0.0.1", "-b", "1-1"],
    ["attach", "-r", "127.0.0.1", "-b", "1-1"],
    ["list", "-r", "127.0.0.1"],
    ["list", "-l"],
])
def test_the_client_path_stays_light(tmp_path, args: list[str]) -> None:
    mods = loaded(tmp_path, *args)
    assert not mods & HEAVY, sorted(mods & HEAVY)
    others = {m for m, _, _ in COMMANDS.values()} - {"usbipx.cli.exports", "usbipx.cli.imports",
                                                     "usbipx.cli.devices"}
    assert not mods & others, sorted(mods & others)


@pytest.mark.parametrize("args", [["--help"], ["connect", "--help"], ["list", "-l"]])
def test_what_makes_no_connection_loads_no_wire_codec(tmp_path, args: list[str]) -> None:
    """The USB/IP codec, sockets and JSON come with the command that uses them."""
    wire = loaded(tmp_path, *args) & {"usbipx.protocol", "usbipx.net", "socket", "json"}
    assert not wire, sorted(wire)


def test_the_listed_help_is_each_commands_own() -> None:
    """The lazy table's one-line help cannot drift from the command's docstring."""
    from typer.main import get_command

    group = get_command(app)
    ctx = group.make_context("usbipx", ["list"], resilient_parsing=True)
    for name, (_, _, short) in COMMANDS.items():
        cmd = group.get_command(ctx, name)  # type: ignore[attr-defined]
        assert cmd is not None
        first = (cmd.help or "").strip().splitlines()[0]
        assert first == short, name
