"""Conventions users expect of the command line: typer's shell completion works through
the lazily loaded command table, and every command that prints a table has ``--json``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer.main
from typer.testing import CliRunner

from usbipx.cli.app import COMMANDS, app

TABLES = [
    ("list",), ("port",), ("supervisor", "status"), ("gadget", "list"), ("gadget", "show"),
    ("gadget", "udc"), ("pki", "show"),
]
"""Every command that prints a table (or a report a script would parse)."""


def _command(path: tuple[str, ...]) -> typer.main._click.Command:
    group = typer.main.get_command(app)
    ctx = group.make_context("usbipx", ["list"], resilient_parsing=True)
    cmd = group
    for name in path:
        cmd = cmd.get_command(ctx, name)  # type: ignore[attr-defined]
        assert cmd is not None, path
    return cmd


@pytest.mark.parametrize("path", TABLES, ids=" ".join)
def test_every_table_has_json(path: tuple[str, ...]) -> None:
    opts = {o for p in _command(path).params for o in getattr(p, "opts", [])}
    assert "--json" in opts, path


def test_the_tables_listed_are_commands() -> None:
    assert {p[0] for p in TABLES} <= set(COMMANDS)


def test_show_completion_prints_a_bash_script() -> None:
    res = CliRunner().invoke(app, ["--show-completion", "bash"], prog_name="usbipx")
    assert res.exit_code == 0, res.output
    assert "_USBIPX_COMPLETE=complete_bash" in res.stdout
    assert res.stdout.rstrip().endswith("complete -o default -F _usbipx_completion usbipx")


def complete(words: str, cword: int) -> list[str]:
    """What bash completion offers, asking the real console script."""
    env = {**os.environ, "_USBIPX_COMPLETE": "complete_bash", "COMP_WORDS": words,
           "COMP_CWORD": str(cword)}
    script = os.path.join(os.path.dirname(sys.executable), "usbipx")
    out = subprocess.run([script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_completion_knows_the_lazy_commands_and_their_options() -> None:
    assert complete("usbipx con", 1) == ["connect"]
    assert complete("usbipx connect --i", 2) == ["--id"]
    assert complete("usbipx supervisor ru", 2) == ["run"]
    assert "--metrics" in complete("usbipx usbipa --met", 2)
