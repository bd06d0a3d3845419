"""The man pages in cli/man are the ones scripts/manpages makes from the command tree now.

Run ``scripts/manpages`` after changing the CLI and commit cli/man.
"""

from __future__ import annotations

import enum
import importlib.util
import shutil
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import typer

REPO = Path(__file__).resolve().parents[2]
GENERATOR = REPO / "scripts" / "manpages.py"
COMMITTED = REPO / "cli" / "man"
PAGES = ["usbipx-supervisor.1", "usbipx-usbipa.1", "usbipx-usbipd.1", "usbipx.1"]


class Mode(enum.Enum):
    fast = "fast"
    slow = "slow"


def generator():
    spec = importlib.util.spec_from_file_location("manpages", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["manpages"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("man")
    r = subprocess.run([sys.executable, str(GENERATOR), "--output", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=out,
                       env={"PATH": "/usr/bin:/bin", "COLUMNS": "37"})
    assert r.returncode == 0, r.stderr
    return out


def test_the_committed_pages_are_the_generated_ones(regenerated):
    assert sorted(p.name for p in regenerated.iterdir()) == PAGES
    assert sorted(p.name for p in COMMITTED.glob("*.1")) == PAGES
    for name in PAGES:
        assert (COMMITTED / name).read_bytes() == (regenerated / name).read_bytes(), (
            f"cli/man/{name} is out of date: run scripts/manpages and commit cli/man")


def test_the_pages_are_installed_as_package_data():
    for name in PAGES:
        assert (files("usbipx.cli") / "man" / name).read_bytes() == (COMMITTED / name).read_bytes()


def test_the_pages_say_what_the_cli_does():
    main = (COMMITTED / "usbipx.1").read_text()
    assert ".SH NAME\nusbipx \\- USB/IP tools" in main
    for section in ("SYNOPSIS", "DESCRIPTION", "GLOBAL OPTIONS", "COMMANDS", "EXIT STATUS",
                    "ENVIRONMENT", "SEE ALSO"):
        assert f"\n.SH {section}\n" in main
    assert '.SS "\\fBusbipx gadget apply\\fR [\\fIOPTIONS\\fR] \\fISPEC\\fR"' in main
    assert "\\fB\\-\\-wait\\fR \\fISECONDS\\fR\nWait up to SECONDS" in main
    assert "\\fB\\-t\\fR, \\fB\\-\\-tcp\\-port\\fR \\fIN\\fR\nTCP port of usbipd/usbipa. Range: 1 to 65535." in main
    for var in ("USBIPX_CERT", "USBIPX_KEY", "USBIPX_CA"):
        assert f"\\fB{var}\\fR" in main
    assert "\\fB77\\fR\nNot permitted" in main
    # the daemons are described on their own pages
    assert "See \\fBusbipx\\-usbipa\\fR(1)." in main and "\\-\\-max\\-per\\-peer" not in main
    usbipa = (COMMITTED / "usbipx-usbipa.1").read_text()
    assert ".SH NAME\nusbipx\\-usbipa \\- application\\-side daemon" in usbipa
    assert "\\fB\\-\\-max\\-per\\-peer\\fR \\fIN\\fR" in usbipa
    supervisor = (COMMITTED / "usbipx-supervisor.1").read_text()
    assert '.SS "\\fBusbipx supervisor status\\fR [\\fIOPTIONS\\fR]"' in supervisor


def _render(path: Path) -> tuple[str, str]:
    if shutil.which("man"):
        r = subprocess.run(["man", "--warnings", "-l", str(path)], capture_output=True,
                           text=True, timeout=60, env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"})
        return r.stdout, r.stderr
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", str(path)], capture_output=True,
                       text=True, timeout=60)
    return r.stdout, r.stderr


@pytest.mark.parametrize("name", PAGES)
def test_man_renders_the_page_without_a_warning(name):
    if not (shutil.which("man") or shutil.which("groff")):
        pytest.skip("neither man nor groff is installed: the rendering is not checked")
    out, err = _render(COMMITTED / name)
    assert err == ""
    assert "NAME" in out and "EXIT STATUS" in out


def test_the_generator_copes_with_any_command_tree(tmp_path):
    """Hidden things, choices, --x/--no-x, counted and repeated options, no docstring,
    roff-special text: a CLI changed by others still gives pages man can read."""
    demo = typer.Typer(help="Demo: .dots, 'quotes', back\\slash and ünïcode.")

    @demo.command("plain")
    def plain(  # no docstring
        what: str = typer.Argument(...),
        mode: Mode = typer.Option(Mode.fast, help="How."),
        verbose: int = typer.Option(0, "-v", count=True, help="More output."),
        tag: list[str] = typer.Option([], "--tag"),
        colour: bool = typer.Option(True, "--colour/--no-colour"),
        secret: str = typer.Option("", hidden=True),
    ) -> None:
        pass

    @demo.command("hidden", hidden=True)
    def hidden() -> None:
        """Not shown."""

    @demo.command("code")
    def code() -> None:
        """First line, with ``double`` and `single` quoted code.

        \b
        .starts with a dot
        'and a quote
        """

    m = generator()
    command = typer.main.get_command(demo)
    top = m.Node(command, m.context(command, "demo"), ["demo"])
    text = m.main_page(top)
    assert "hidden" not in text and "secret" not in text
    assert "\\fB\\-\\-mode\\fR \\fI{fast|slow}\\fR\nHow. Default: fast." in text
    assert "\\fB\\-\\-colour\\fR, \\fB\\-\\-no\\-colour\\fR" in text
    assert "\\fB\\-\\-tag\\fR \\fITAG\\fR\nMay be given more than once." in text
    assert "\n\\&.starts with a dot\n\\&'and a quote\n" in text
    assert "back\\eslash and \\[u00FC]n\\[u00EF]code" in text
    assert "First line, with \\fBdouble\\fR and \\fBsingle\\fR quoted code." in text
    assert "`" not in text
    text.encode("ascii")  # everything else is escaped
    page = tmp_path / "demo.1"
    page.write_text(text)
    if shutil.which("man") or shutil.which("groff"):
        out, err = _render(page)
        assert err == "" and "First line, with double" in out
