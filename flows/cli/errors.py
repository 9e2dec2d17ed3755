"""How the `grove` command says a user's mistake (one line, exit 2) or a failed stage (exit 1)."""

from __future__ import annotations

import sys
import traceback
from contextlib import contextmanager

import typer
from rich.console import Console

# Off a terminal rich would wrap every line at 80 columns (a command or URI broken mid-line in a log)
console = Console(soft_wrap=not sys.stdout.isatty())
# What is not the answer of a command whose stdout is data (`grove validate --resolved`)
stderr_console = Console(stderr=True, soft_wrap=not sys.stderr.isatty())
DEBUG = {"traceback": False}


def _message(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    return " ".join(str(error).split()) or type(error).__name__


def fail(error: BaseException) -> None:
    """A user's mistake: one line on stderr, `error: <where>: <what>`, exit code 2."""
    if DEBUG["traceback"]:
        traceback.print_exception(error, file=sys.stderr)
    print(f"error: {_message(error)}", file=sys.stderr, flush=True)
    raise typer.Exit(2)


def user_mistakes() -> tuple[type[BaseException], ...]:
    """What a user can fix: a config, data file or folder, a missing input file, a store that
    cannot be reached or is denied, --from-stage without the earlier stages stored."""
    from grove.errors import UserError
    from grove.stage import MissingStageError
    from grove.store import StoreError

    return UserError, MissingStageError, StoreError, FileNotFoundError, PermissionError


class _NoUserErrorTracebacks:
    """A logging filter for Prefect's console handler: a run that stops on a user's mistake (bad
    remote data, a denied store) is said once, by the CLI, in one line; Prefect's own lines and
    traceback (still sent to the API, for the UI) would bury it."""

    def filter(self, record) -> bool:
        mistakes = user_mistakes()
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, mistakes):
            return False
        names = {cls.__name__ for kind in mistakes for cls in (kind, *kind.__subclasses__())}
        return not any(f"exception {name}:" in record.getMessage() for name in names)


def quiet_user_errors_in_prefect_console() -> None:
    import logging

    from prefect.logging import configuration
    from prefect.logging.handlers import APILogHandler

    if DEBUG["traceback"]:
        return
    if not configuration.PROCESS_LOGGING_CONFIG:  # Prefect sets its handlers up at the first run
        configuration.setup_logging()
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):  # "": the console handler
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, APILogHandler):
                handler.addFilter(_NoUserErrorTracebacks())


@contextmanager
def said_once(warnings: list[str]):
    """The config's warnings as `warning: <key path>: <what>` lines on stderr, once each: the
    config logger's own copy of each (what a run's log keeps) is held back meanwhile."""
    import logging

    from rich.markup import escape

    logger = logging.getLogger("grove.config")
    hold = logging.Filter("nothing")  # a name no record has: every record is dropped
    logger.addFilter(hold)
    try:
        yield
    finally:
        logger.removeFilter(hold)
        for warning in warnings:
            stderr_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)


@contextmanager
def clean_errors():
    try:
        yield
    except user_mistakes() as exc:
        fail(exc)



def stage_failed(bars: dict[str, int], finished: set[str], exc: Exception) -> None:
    # every stage that started finished: the flow failed deciding on the last one's results (e.g. a
    # quantization search none of whose candidates loads), so that stage is named, not "?"
    failed = next((s for s in reversed(bars) if s not in finished), next(reversed(bars), "?"))
    if DEBUG["traceback"]:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"error: stage {failed} failed: {_message(exc)}", file=sys.stderr, flush=True)
    console.print("stages that finished are stored; run again to resume from the failed stage")
    raise typer.Exit(1) from exc
