"""Start-up figures on this host (not in the VM): what a user's shell pays.

``usbipx --version`` is timed as a whole process, exactly as a shell starts
it.  The import path of a command is the time to import what that command
runs (the console script's module, the typer application and the command's
module), measured inside a fresh interpreter so that the interpreter's own
start is not counted twice; ``-X importtime`` then names the heaviest
imports, so a regression says where it comes from.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

RUNS = 15
PYTHON = os.path.join(".venv", "bin", "python")
USBIPX = os.path.join(".venv", "bin", "usbipx")

# A command's import path: what usbipx.cli.main imports to run it.
IMPORT_PATH = (
    "import time; t0 = time.perf_counter()\n"
    "import usbipx.cli.main, usbipx.cli.app, importlib\n"
    "importlib.import_module({module!r})\n"
    "print(time.perf_counter() - t0)\n"
)


def median_run(argv: list[str]) -> tuple[float, float]:
    runs = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), min(runs)


def import_path(module: str) -> float:
    code = IMPORT_PATH.format(module=module)
    runs = [float(subprocess.run([PYTHON, "-P", "-c", code], capture_output=True, text=True,
                                 check=True).stdout) for _ in range(RUNS)]
    return statistics.median(runs)


def imports_as_run(argv: list[str]) -> float:
    """Seconds a whole command spends importing, its run-time imports included:
    the top-level ``-X importtime`` entries from the first usbipx module on."""
    runs = []
    for _ in range(RUNS):
        err = subprocess.run([PYTHON, "-X", "importtime", USBIPX, *argv], capture_output=True,
                             text=True).stderr
        total, ours = 0, False
        for line in err.splitlines():
            if not line.startswith("import time:") or "|" not in line:
                continue
            _, cumulative, name = line[12:].split("|")
            ours = ours or name.strip().startswith("usbipx")
            if ours and cumulative.strip().isdigit() and not name.startswith("  "):
                total += int(cumulative)
        runs.append(total / 1e6)
    return statistics.median(runs)


def top_imports(module: str, n: int = 6) -> list[tuple[int, str]]:
    """The ``n`` imports of the first two levels with the largest cumulative time (µs)."""
    code = f"import usbipx.cli.app, {module}"
    err = subprocess.run([PYTHON, "-P", "-X", "importtime", "-c", code],
                         capture_output=True, text=True, check=True).stderr
    rows = []
    for line in err.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line[12:].split("|")
        # Nested imports are indented two spaces per level under their importer:
        # the top level and what it imports directly say where the time goes.
        if cumulative.strip().isdigit() and not name.startswith("     "):
            rows.append((int(cumulative), name.strip()))
    return sorted(rows, reverse=True)[:n]


def main() -> int:
    med, best = median_run([USBIPX, "--version"])
    print(f"  usbipx --version: median {med * 1000:.0f} ms, best {best * 1000:.0f} ms over "
          f"{RUNS} runs   (goal <= 60 ms)")
    med, best = median_run([USBIPX, "--help"])
    print(f"  usbipx --help: median {med * 1000:.0f} ms, best {best * 1000:.0f} ms")
    for command, module in (("connect", "usbipx.cli.exports"), ("attach", "usbipx.cli.imports"),
                            ("list", "usbipx.cli.devices")):
        took = import_path(module)
        print(f"  import path of {command}: median {took * 1000:.0f} ms   (goal <= 50 ms)")
        print("    heaviest: " + ", ".join(f"{name} {us / 1000:.1f} ms"
                                           for us, name in top_imports(module, 8)))
    # A bus id that does not exist: connect imports what it runs with, then stops
    # at its first look at the kernel (this host may not have usbip-host loaded).
    took = imports_as_run(["connect", "-r", "127.0.0.1", "-b", "99-99"])
    print(f"  connect as run, until its first kernel check: median {took * 1000:.0f} ms of "
          "imports (the import path of connect and what it imports when it runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
