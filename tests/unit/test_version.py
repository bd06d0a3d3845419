"""``usbipx --version``: the installed distribution's version, at no cost to any command."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from typer.testing import CliRunner

from usbipx.cli.app import app

USBIPX = str(Path(sys.executable).with_name("usbipx"))


def test_version_prints_the_distributions_version():
    r = subprocess.run([USBIPX, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout == f"usbipx {version('usbipx')}\n"


def test_version_is_eager_and_wins_over_a_command():
    r = CliRunner().invoke(app, ["--version", "gadget", "list"])
    assert r.exit_code == 0 and r.stdout == f"usbipx {version('usbipx')}\n"


def test_no_command_imports_importlib_metadata(tmp_path):
    """Start-up time: the version is usbipx.__version__ (pyproject.toml reads it from
    there), so not even --version loads the metadata machinery."""
    probe = (
        "import sys\n"
        "from usbipx.cli.main import main\n"
        "sys.argv = ['usbipx', *sys.argv[1:]]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('importlib.metadata' in sys.modules, file=sys.stderr)\n"
    )
    for args in (["--help"], ["gadget", "udc"], ["--version"]):
        r = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True,
                           timeout=60, cwd=tmp_path, env={"USBIPX_ROOT": str(tmp_path)})
        loaded = r.stderr.strip().splitlines()[-1]
        assert loaded == "False", (args, r.stderr)
