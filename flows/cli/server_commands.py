"""`grove server start|stop|status`: the local Prefect server grove runs use."""

from __future__ import annotations

from typing import Optional

import typer

from flows.cli.app import app, console


server_app = typer.Typer(help="The local Prefect server grove runs use when no PREFECT_API_URL is set.",
                         no_args_is_help=True)
app.add_typer(server_app, name="server")


@server_app.command("start")
def server_start(port: Optional[int] = typer.Option(None, "--port", help="Default: a free port.")) -> None:
    """Start it in the background (grove run also starts it when needed)."""
    from flows.server import start

    record, started = start(port)
    console.print(f"{'started' if started else 'already running'}: UI {record['ui']}, API {record['url']} "
                  f"(pid {record['pid']})", highlight=False)


@server_app.command("stop")
def server_stop() -> None:
    """Stop the local server grove started."""
    from flows.server import stop

    record = stop()
    console.print(f"stopped the local Prefect server (pid {record['pid']})" if record else
                  "no local Prefect server is running", highlight=False)


@server_app.command("status")
def server_status() -> None:
    """Whether it runs, its UI and API, and the line that points Prefect's own CLI at it."""
    from flows.server import configured_api, running

    configured = configured_api()
    if configured:  # without this line a running local server reads as the one grove uses
        console.print(f"grove commands use the Prefect API at {configured[0]} ({configured[1]}), not a local "
                      f"server", highlight=False, markup=False)
    record = running()
    if record is None:
        console.print("not running: `grove server start` starts it (`grove run` does too, when needed)",
                      highlight=False)
        return
    console.print(f"running: UI {record['ui']}, API {record['url']} (pid {record['pid']})\n"
                  f"for Prefect's own CLI (prefect flow-run ls, ...) in this shell:\n"
                  f"export PREFECT_API_URL={record['url']}", highlight=False, markup=False)
