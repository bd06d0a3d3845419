"""``usbipx pki``: a tiny CA for mutual TLS between boards and application servers.

A complete setup is three commands::

    usbipx pki init /etc/usbipx/pki
    usbipx pki issue /etc/usbipx/pki appserver --server appserver.lab.example
    usbipx pki issue /etc/usbipx/pki board-1

``usbipx.pki`` (and with it ``cryptography``) is imported only when one of
these commands runs: every other command starts without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from usbipx.cli.common import emit_json, handle_errors, state

if TYPE_CHECKING:
    from usbipx.pki import Written

app = typer.Typer(help="A tiny certificate authority for mutual TLS (init, issue, show).",
                  no_args_is_help=True)

# Literals, not usbipx.pki's constants: importing that module loads cryptography.
# tests/unit/test_pki.py checks that they agree.
CA_NAME = "usbipx CA"
CA_DAYS = 3650
CERT_DAYS = 825
MAX_DAYS = 36500


@app.command("init")
@handle_errors
def init_cmd(
    ctx: typer.Context,
    directory: str = typer.Argument(..., metavar="DIR", help="CA directory (created, 0700)."),
    name: str = typer.Option(CA_NAME, "--name", help="The CA certificate's commonName."),
    days: int = typer.Option(CA_DAYS, "--days", min=1, max=MAX_DAYS,
                             help="Validity of the CA certificate."),
) -> None:
    """Create DIR with a new CA: ca.key (EC P-256, 0600) and a self-signed ca.crt."""
    from usbipx import pki

    _report(ctx, pki.init_ca(directory, name=name, days=days))


@app.command("issue")
@handle_errors
def issue_cmd(
    ctx: typer.Context,
    directory: str = typer.Argument(..., metavar="DIR", help="CA directory (from pki init)."),
    name: str = typer.Argument(..., metavar="NAME",
                               help="Identity: the commonName and the file names NAME.key/.crt."),
    servers: list[str] = typer.Option(
        [], "--server", metavar="DNSNAME",
        help="Make a server certificate for this DNS name or IP address (repeatable). "
             "Without it: a client (board) certificate.",
    ),
    days: int = typer.Option(CERT_DAYS, "--days", min=1, max=MAX_DAYS,
                             help="Validity (never beyond the CA's)."),
) -> None:
    """Issue NAME.key and NAME.crt, signed by DIR's CA."""
    from usbipx import pki

    _report(ctx, pki.issue(directory, name, servers=servers, days=days))


def _report(ctx: typer.Context, written: Written) -> None:
    if state(ctx).json:
        emit_json({"key": str(written.key), "cert": str(written.cert)})
        return
    typer.echo(f"wrote {written.key}")
    typer.echo(f"wrote {written.cert}")


@app.command("show")
@handle_errors
def show_cmd(
    ctx: typer.Context,
    path: str = typer.Argument(..., metavar="FILE", help="A certificate (PEM or DER)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON (same as the global --json)."),
) -> None:
    """Subject, issuer, identity, SANs, EKU, validity, and whether it has expired."""
    from usbipx import pki

    info = pki.show(path)
    if json_out or state(ctx).json:
        emit_json(info.to_dict())
        return
    d = info.to_dict()
    rows = [
        ("subject", info.subject),
        ("issuer", info.issuer),
        ("identity", info.identity or "- (none: peers with this certificate are refused)"),
        ("ca", "yes" if info.is_ca else "no"),
        ("san", ", ".join(info.sans) or "-"),
        ("eku", ", ".join(info.eku) or "-"),
        ("not before", d["not_before"]),
        ("not after", d["not_after"]),
        ("expired", "yes" if info.expired else "no (not yet valid)" if info.not_yet_valid
         else "no"),
        ("serial", info.serial),
        ("sha256", info.sha256),
    ]
    for label, value in rows:
        typer.echo(f"{label + ':':<12} {value}")
