"""The package has no import cycles at run time, counting imports made inside
functions: a cycle hidden in a function is still a cycle.  Imports under
``if TYPE_CHECKING:`` are left out: they never run."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"usbipx": "usbipx", "usbipx.gadget": "gadget", "usbipx.stubmode": "stubmode",
            "usbipx.daemon": "daemon", "usbipx.cli": "cli"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in (ROOT / folder).glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports when it runs."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                   for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from usbipx.gadget import vudc" imports the module vudc.
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        out.update(n for n in names if n in known)
    return out


def cycles() -> list[list[str]]:
    mods = modules()
    graph = {m: sorted(imports(p, set(mods)) - {m}) for m, p in mods.items()}
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                found.append([*stack[stack.index(n):], n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_the_graph_is_read() -> None:
    """The checker sees real edges (a graph with none would pass anything)."""
    mods = modules()
    assert "usbipx.transport" in imports(mods["usbipx.client"], set(mods))
    assert "usbipx.remote" in imports(mods["usbipx.wslink"], set(mods))
    assert "usbipx.daemon.wsserve" in imports(mods["usbipx.daemon.server"], set(mods))  # lazy
    assert "usbipx.daemon.server" not in imports(mods["usbipx.daemon.wsserve"], set(mods))


def test_no_import_cycles() -> None:
    assert cycles() == []
