"""Man pages generated from the usbipx command tree, so that they cannot drift from it.

    scripts/manpages [--output DIR]        (default: cli/man, installed as package data)

usbipx(1) documents the global options and every command but the daemons and
the supervisor, which have pages of their own: usbipx-usbipa(1),
usbipx-usbipd(1) and usbipx-supervisor(1).  Everything comes from the
program: descriptions from the commands' help (their docstrings), options and
arguments from the click parameters behind typer (help, metavar, default,
range), the version from the installed distribution, exit statuses from the
classes in usbipx.errors, environment variables from usbipx.tlsconf.  The
output depends on nothing else (no date, no terminal width), so that
tests/unit/test_manpages.py can regenerate the pages and compare them byte for
byte with the committed ones.

Run it with the venv's python (scripts/manpages does) after changing the CLI.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import typer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "cli" / "man"
PROG = "usbipx"

# Commands with a page of their own: command name -> page name.
OWN_PAGES = {"usbipa": "usbipx-usbipa", "usbipd": "usbipx-usbipd",
             "supervisor": "usbipx-supervisor"}

EXIT_TEXT = {
    0: "Success.",
    1: "Failure; the reason is printed on standard error as one line, "
       "\"usbipx: error: ...\".",
    2: "Invalid input: a bad option or argument, configuration file or gadget spec "
       "(nothing was changed).",
    77: "Not permitted: the operation needs privileges this process does not have.",
    130: "Interrupted (SIGINT).",
}
ENV_TEXT = {
    "cert": "This end's TLS certificate (PEM), for tls:// connections, when --cert is not given.",
    "key": "Its private key (mode 0600), when --key is not given.",
    "ca": "The CA the peer's certificate must chain to, when --ca is not given.",
}
EXTERNAL_SEE_ALSO = ["systemctl(1)", "usbip(8)", "usbipd(8)"]


# ---------------------------------------------------------------- roff

def esc(text: str) -> str:
    """Text for roff: backslashes and minus signs escaped, non-ASCII as \\[uXXXX]."""
    out = []
    for ch in text.replace("\\", "\\e").replace("-", "\\-"):
        out.append(ch if ord(ch) < 128 else f"\\[u{ord(ch):04X}]")
    return "".join(out)


def line(text: str) -> str:
    """One input line: a leading . or ' would be taken for a request."""
    return "\\&" + text if text[:1] in (".", "'") else text


def inline(text: str) -> str:
    """Prose: escaped, `code` and ``code`` in bold."""
    parts = re.split(r"``([^`]+)``|`([^`]+)`", text)
    out = []
    for i, p in enumerate(parts):
        if i % 3 == 0:
            out.append(esc(p))
        elif p is not None:
            out.append(f"\\fB{esc(p)}\\fR")
    return "".join(out)


def paragraphs(help_text: str | None) -> list[str]:
    """Help text (a docstring) as roff paragraphs: prose reflowed, indented blocks kept."""
    text = inspect.cleandoc(help_text or "")
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.splitlines() if ln.strip() != "\b"]
        if not lines:
            continue
        if all(ln.startswith((" ", "\t")) for ln in lines) or block.lstrip().startswith("\b"):
            body = "\n".join(line(esc(ln.strip())) for ln in lines)
            out.append(f".RS 4\n.nf\n{body}\n.fi\n.RE")
        else:
            prose = " ".join(ln.strip() for ln in lines).replace("::", ":")
            out.append(line(inline(prose)))
    return out


def summary(help_text: str | None) -> str:
    """The first sentence of a help text, for NAME and command lists."""
    first = inspect.cleandoc(help_text or "").split("\n\n")[0]
    first = " ".join(first.split())
    m = re.match(r"(.+?[.!?])(\s|$)", first)
    return (m.group(1) if m else first).rstrip(".")


def name_line(page: str, help_text: str | None) -> str:
    """``usbipx-usbipa - application-side daemon: ...``: lower case unless an acronym."""
    text = summary(help_text).replace("`", "")  # no fonts in NAME: whatis reads it
    if text[1:2].islower():
        text = text[0].lower() + text[1:]
    return f"{page} - {text}"


# ---------------------------------------------------------------- the command tree

@dataclass
class Node:
    """A command or group, with its context (for metavars) and full name."""

    command: Any
    ctx: typer.Context
    path: list[str]

    @property
    def name(self) -> str:
        return " ".join(self.path)

    @property
    def is_group(self) -> bool:
        return hasattr(self.command, "list_commands")

    def children(self) -> Iterator[Node]:
        if not self.is_group:
            return
        for name in self.command.list_commands(self.ctx):
            sub = self.command.get_command(self.ctx, name)
            if sub is None or getattr(sub, "hidden", False):
                continue
            yield Node(sub, context(sub, name, self.ctx), [*self.path, name])

    def params(self, with_help: bool = False) -> list[Any]:
        params = self.command.get_params(self.ctx) if with_help else self.command.params
        return [p for p in params if not getattr(p, "hidden", False)]

    @property
    def help(self) -> str:
        text = getattr(self.command, "help", None)
        if not text and getattr(self.command, "callback", None) is not None:
            text = self.command.callback.__doc__
        return inspect.cleandoc(text or "")


def context(command: Any, name: str, parent: typer.Context | None = None) -> typer.Context:
    """A context as the command would run in (its context_settings: -h for --help ...)."""
    cls = getattr(command, "context_class", typer.Context)
    ctx: typer.Context = cls(command, info_name=name, parent=parent,
                             **getattr(command, "context_settings", {}))
    return ctx


def root() -> Node:
    from usbipx.cli.app import app

    command = typer.main.get_command(app)
    return Node(command, context(command, PROG), [PROG])


def is_argument(param: Any) -> bool:
    return getattr(param, "param_type_name", "") == "argument"


def metavar(param: Any) -> str:
    """What stands for the value: the parameter's own metavar, else one from its type."""
    if getattr(param, "metavar", None):
        return str(param.metavar)
    if is_argument(param):
        return str(param.name).upper()
    ptype = getattr(param, "type", None)
    choices = getattr(ptype, "choices", None)
    if choices:
        return "{" + "|".join(map(str, choices)) + "}"
    kind = str(getattr(ptype, "name", "")).lower()
    if kind.startswith(("int", "float")):
        return "N"
    if kind in ("path", "file", "filename"):
        return "FILE"
    longest: str = max(param.opts, key=len)
    return longest.lstrip("-").upper()

def is_flag(param: Any) -> bool:
    return bool(getattr(param, "is_flag", False)) or bool(getattr(param, "count", False))


def option_head(param: Any) -> str:
    """``-t, --tcp-port N`` in roff."""
    names = sorted(param.opts, key=lambda n: n.startswith("--"))  # -t before --tcp-port
    names += getattr(param, "secondary_opts", [])
    head = ", ".join(f"\\fB{esc(n)}\\fR" for n in names)
    if not is_flag(param):
        head += f" \\fI{esc(metavar(param))}\\fR"
    return head


def option_text(param: Any) -> str:
    """The help of an option or argument, with its range, default, and repeatability."""
    text = " ".join(str(getattr(param, "help", None) or "").split())
    extra = []
    ptype = getattr(param, "type", None)
    lo, hi = getattr(ptype, "min", None), getattr(ptype, "max", None)
    if lo is not None and hi is not None:
        extra.append(f"Range: {lo} to {hi}.")
    elif lo is not None or hi is not None:
        extra.append(f"At least {lo}." if lo is not None else f"At most {hi}.")
    default = getattr(param, "default", None)
    shown = getattr(param, "show_default", True)
    if (shown and not is_flag(param) and not callable(default)
            and default not in (None, (), [], "") and "default" not in text.lower()):
        if isinstance(default, list | tuple):
            default = ",".join(map(str, default))
        default = getattr(default, "value", default)  # an Enum's
        extra.append(f"Default: {default}.")
    if getattr(param, "multiple", False) and "repeatable" not in text.lower():
        extra.append("May be given more than once.")
    return inline(" ".join([text, *extra]).strip())


def usage(node: Node) -> str:
    """``usbipx gadget apply [OPTIONS] SPEC`` in roff."""
    words = [f"\\fB{esc(node.name)}\\fR"]
    if any(not is_argument(p) for p in node.params()):
        words.append("[\\fIOPTIONS\\fR]")
    for p in node.params():
        if is_argument(p):
            mv = f"\\fI{esc(metavar(p))}\\fR"
            if getattr(p, "nargs", 1) == -1:
                mv += "..."
            words.append(mv if p.required else f"[{mv}]")
    if node.is_group:
        words.append("\\fICOMMAND\\fR [\\fIARGS\\fR]...")
    return " ".join(words)


def options_list(node: Node, with_help: bool = False) -> list[str]:
    out = []
    for p in node.params(with_help):
        head = f"\\fI{esc(metavar(p))}\\fR" if is_argument(p) else option_head(p)
        out += [".TP", head, line(option_text(p))]
    return out


def command_section(node: Node) -> list[str]:
    """A command's (sub)section: usage, description, arguments and options."""
    out = [f'.SS "{usage(node)}"']
    paras = paragraphs(node.help)
    for i, p in enumerate(paras):
        if i:
            out.append(".PP")
        out.append(p)
    out += options_list(node)
    return out


# ---------------------------------------------------------------- pages

def header(title: str, name_line: str) -> list[str]:
    return [f'.\\" Generated by scripts/manpages from the usbipx {version("usbipx")} command '
            "tree: do not edit.",
            f'.TH {esc(title.upper())} 1 "" "{PROG} {esc(version("usbipx"))}" "User Commands"',
            # Neither hyphenated nor justified: option names and values are copied from here.
            ".nh", ".ad l",
            ".SH NAME", line(esc(name_line))]


def global_options(top: Node) -> list[str]:
    return options_list(top, with_help=True)


def exit_status() -> list[str]:
    from usbipx.errors import UsbipError

    codes: dict[int, str] = {}
    stack: list[type] = [UsbipError]
    while stack:
        cls = stack.pop(0)
        code = getattr(cls, "exit_code", 1)
        codes.setdefault(code, summary(cls.__doc__))
        stack += cls.__subclasses__()
    out = [".SH EXIT STATUS"]
    for code in sorted({0, 130, *codes}):
        out += [".TP", f"\\fB{code}\\fR", line(inline(EXIT_TEXT.get(code, codes.get(code, ""))))]
    return out


def environment() -> list[str]:
    try:
        from usbipx.tlsconf import ENV
    except ImportError:  # the TLS settings are not merged: nothing to document
        return []
    out = [".SH ENVIRONMENT"]
    for key, var in ENV.items():
        out += [".TP", f"\\fB{esc(var)}\\fR", line(inline(ENV_TEXT.get(key, f"TLS {key} file.")))]
    return out


def see_also(this: str) -> list[str]:
    pages = [f"{p}(1)" for p in [PROG, *OWN_PAGES.values()] if p != this]
    refs = [f"\\fB{esc(p.split('(')[0])}\\fR({p.split('(')[1]}" for p in
            [*pages, *EXTERNAL_SEE_ALSO]]
    return [".SH SEE ALSO", ",\n".join(refs)]


def main_page(top: Node) -> str:
    out = header(PROG, name_line(PROG, top.help))
    out += [".SH SYNOPSIS", f"\\fB{PROG}\\fR [\\fIGLOBAL OPTIONS\\fR] \\fICOMMAND\\fR "
            "[\\fIOPTIONS\\fR] [\\fIARGS\\fR]...", ".SH DESCRIPTION"]
    paras = paragraphs(top.help)
    callback = getattr(top.command, "callback", None)
    if callback is not None and callback.__doc__:
        paras += paragraphs(callback.__doc__)
    out += [x for i, p in enumerate(paras) for x in ([".PP", p] if i else [p])]
    out += [".SH GLOBAL OPTIONS", *global_options(top), ".SH COMMANDS"]
    for node in top.children():
        own = OWN_PAGES.get(node.path[-1])
        if own is not None:
            out += [f'.SS "{usage(node)}"', line(inline(summary(node.help) + ".")),
                    f"See \\fB{esc(own)}\\fR(1)."]
        elif node.is_group:
            out += command_section(node)
            for child in node.children():
                out += command_section(child)
        else:
            out += command_section(node)
    out += exit_status() + environment() + see_also(PROG)
    return "\n".join(out) + "\n"


def own_page(top: Node, node: Node, page: str) -> str:
    out = header(page, name_line(page, node.help))
    nodes = list(node.children()) if node.is_group else [node]
    out += [".SH SYNOPSIS", "\n.br\n".join(_synopsis(n) for n in nodes), ".SH DESCRIPTION"]
    paras = paragraphs(node.help)
    out += [x for i, p in enumerate(paras) for x in ([".PP", p] if i else [p])]
    if node.is_group:
        out.append(".SH COMMANDS")
        for child in nodes:
            out += command_section(child)
    elif node.params():
        out += [".SH OPTIONS", *options_list(node)]
    out += [".SH GLOBAL OPTIONS", f"Given before \\fB{esc(node.path[1])}\\fR:",
            *global_options(top)]
    out += exit_status() + environment() + see_also(page)
    return "\n".join(out) + "\n"


def _synopsis(node: Node) -> str:
    """``usbipx [GLOBAL OPTIONS] usbipa [OPTIONS]``: global options go before the command."""
    rest = usage(node).removeprefix(f"\\fB{PROG} ")
    return f"\\fB{PROG}\\fR [\\fIGLOBAL OPTIONS\\fR] \\fB{rest}"


def pages() -> dict[str, str]:
    """File name -> roff text of every page."""
    top = root()
    out = {f"{PROG}.1": main_page(top)}
    for node in top.children():
        page = OWN_PAGES.get(node.path[-1])
        if page is not None:
            out[f"{page}.1"] = own_page(top, node, page)
    missing = set(OWN_PAGES) - {n.path[-1] for n in top.children()}
    for name in sorted(missing):
        print(f"manpages: no command {name!r} any more: no {OWN_PAGES[name]}(1)",
              file=sys.stderr)
    return out


def write(output: Path) -> list[Path]:
    """Write every page into ``output`` (and remove pages no command has any more)."""
    output.mkdir(parents=True, exist_ok=True)
    texts = pages()
    for stale in output.glob("*.1"):
        if stale.name not in texts:
            stale.unlink()
    written = []
    for name, text in texts.items():
        path = output / name
        path.write_text(text, encoding="ascii")
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"directory for the pages (default {DEFAULT_OUTPUT})")
    args = parser.parse_args()
    for path in write(args.output):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
