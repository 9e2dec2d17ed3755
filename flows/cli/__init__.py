"""The `grove` command: validate a run config, show the plan, run the flow with progress; the
artifact store's models, runs and garbage; schedules and deployments; the local Prefect server."""

from __future__ import annotations

import sys

import typer

# the order of `grove --help`: a run, then the store, then schedules
from flows.cli import run_commands  # noqa: F401, I001 - each module registers its commands
from flows.cli import predict_command  # noqa: F401
from flows.cli import store_commands  # noqa: F401
from flows.cli import compare_commands  # noqa: F401
from flows.cli import schedule_commands  # noqa: F401
from flows.cli import server_commands  # noqa: F401
from flows.cli.app import app
from flows.cli.errors import fail, user_mistakes

__all__ = ["app", "main"]


def main() -> None:
    """The `grove` command. A user's mistake raised outside a command's own handling still ends as
    one line (exit 2); anything else keeps its traceback, it is a bug to report."""
    try:
        app(standalone_mode=True)
    except user_mistakes() as exc:
        try:
            fail(exc)
        except typer.Exit as done:
            sys.exit(done.exit_code)
