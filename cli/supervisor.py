"""``usbipx supervisor``: keep every configured device exported, for boot-time use."""

from __future__ import annotations

import typer

from usbipx.cli.common import emit_json, handle_errors, state

app = typer.Typer(help="Keep devices exported to a usbipa: one worker per device.",
                  no_args_is_help=True)

DEFAULT_SOCKET = "/run/usbipx/supervisor.sock"
LOG_FORMAT = "usbipx: <level>{level: <7}</level> [{extra[export]}{extra[worker]}] {message}"


@app.command("run")
@handle_errors
def run_cmd(
    ctx: typer.Context,
    config: str = typer.Option(..., "--config", "-c", metavar="FILE",
                               help="Supervisor configuration (TOML)."),
    metrics_opt: str | None = typer.Option(
        None, "--metrics", metavar="ADDR:PORT",
        help="Serve Prometheus metrics at http://ADDR:PORT/metrics (e.g. 127.0.0.1:9241); "
             "off by default."),
) -> None:
    """Run in the foreground (for systemd: Type=notify) until SIGTERM; SIGHUP reloads."""
    import asyncio

    from loguru import logger

    from usbipx import log
    from usbipx.daemon.config import load_config
    from usbipx.daemon.runner import run

    st = state(ctx)
    metrics = None
    if metrics_opt is not None:
        from usbipx.metrics import Metrics, parse_address

        metrics = Metrics(parse_address(metrics_opt))
    load_config(config)  # a bad file is an error here, before anything starts
    log.configure_supervisor(st.debug, LOG_FORMAT)
    logger.configure(extra={"export": "supervisor", "worker": ""})
    logger.configure(patcher=lambda r: r["extra"].update(
        worker=f" {r['extra']['worker']}" if r["extra"].get("worker") else "",
        export=r["extra"].get("export", "supervisor")))
    asyncio.run(run(config, st.kernel(), metrics))


@app.command("status")
@handle_errors
def status_cmd(
    ctx: typer.Context,
    socket_path: str = typer.Option(DEFAULT_SOCKET, "--socket", "-s",
                                    help="The supervisor's control socket."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Each export: worker pid, state, remote, transport, uptime, restarts, last error."""
    from usbipx.daemon.control import query_status

    body = query_status(socket_path)
    if json_out or state(ctx).json:
        emit_json(body)
        return
    typer.echo(f"supervisor: {body.get('summary', '?')}")
    rows = [("EXPORT", "PID", "STATE", "FOR", "REMOTE", "TRANSPORT", "UPTIME", "RESTARTS",
             "LAST ERROR")]
    for e in body.get("exports", []):
        rows.append((
            str(e.get("export")), str(e.get("pid") or "-"), str(e.get("state")),
            _dur(e.get("state_for")), str(e.get("remote") or "-"),
            str(e.get("transport") or "-"), _dur(e.get("uptime")),
            str(e.get("restarts", 0)), str(e.get("last_error") or "-"),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])


def _dur(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s"
    # not strftime("%H:%M:%S"): that wraps to 00:00:00 after a day
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60:02d}:{minutes % 60:02d}:{secs:02d}"
