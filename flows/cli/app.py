"""The `grove` typer app: its options shared by commands, and the set-up every command runs first."""

from __future__ import annotations

import logging
import os
import warnings

from enum import Enum

import typer
from typer.core import TyperGroup

from flows.cli.errors import DEBUG, console, fail

# Plain help (click's layout): flags read `--resolved`, not `--resolved <bool>`, and the help is
# the same text on a terminal, in a pipe or a log.
class _Grove(TyperGroup):
    """Keeps the command line after `grove` for the set-up: `grove run -h` starts no server."""

    def invoke(self, ctx):
        ctx.meta["grove.args"] = [*ctx._protected_args, *ctx.args]
        return super().invoke(ctx)


app = typer.Typer(cls=_Grove, add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Grove: run an Olive fine-tune -> int4 ONNX recipe as a cached Prefect flow.")
CONFIG = typer.Option(..., "--config", "-c", help="Olive run config (JSON or YAML).")
FROM_STAGE = typer.Option(None, "--from-stage", help="Reuse stages before this one, rerun it and the rest.")
STORE_CONFIG = typer.Option(None, "--config", "-c", help="Run config whose artifact root to use "
                                                         "(default: ./.grove-cache, where a config without one stores).")
STORE_URI = typer.Option(None, "--store", help="Artifact root (folder or s3://bucket/prefix) instead of --config.")
OVERRIDES = typer.Argument(None, metavar="KEY.PATH=VALUE", show_default=False,
                           help="Set config keys for this run, as errors name them, e.g. "
                                "passes.lora.config.training_args.max_steps=20 grove.device=cpu "
                                "(a value is JSON when it parses, else text).")
DEVICE = typer.Option(None, "--device", show_default=False, help="Shorthand for grove.device=cpu|cuda.")


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


def with_device(overrides: list[str] | None, device: Device | None) -> list[str]:
    """The command line's overrides, --device as the last one (it wins over a grove.device=...)."""
    return [*(overrides or []), *([f"grove.device={device.value}"] if device else [])]


def _quiet_libraries() -> None:
    """Keep the terminal to Grove's progress; Prefect still records everything for the UI.

    Environment variables rather than library calls: importing transformers here would
    cost seconds on every run, cached reruns included.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # A temporary Prefect server starts in ~5-11 s, slower on a busy 2-core machine: wait longer
    # than Prefect's default 20 s before giving up.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # bitsandbytes (imported with peft) warns on every CPU training that an optional `kernels`
    # package for its 4-bit CPU matmul is missing: nothing a LoRA run uses or a user can act on here
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # onnx_ir, inside the model builder, calls a tied int8 LM head read by the embedding lookup
    # "invalid"; build_onnx proves every model it keeps by loading, generating and scoring it
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    _skip_tls_setup_for_plain_http()


def _skip_tls_setup_for_plain_http() -> None:
    """Prefect builds a TLS context (loading the whole CA bundle) for every API client it
    creates, several per task run: ~1 s per cached stage here. Against a plain-http API
    (a local server, or the temporary one Prefect starts) no TLS is ever used, so skip it."""
    if "PREFECT_API_TLS_INSECURE_SKIP_VERIFY" in os.environ:
        return
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if url is None or url.startswith("http://"):
        os.environ["PREFECT_API_TLS_INSECURE_SKIP_VERIFY"] = "true"


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        print(f"grove {version('grove')}")
        raise typer.Exit()


@app.callback()
def _setup(ctx: typer.Context,
           debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error, too."),
           _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                         help="Print Grove's version and exit.")) -> None:
    DEBUG["traceback"] = debug
    if {"-h", "--help"} & set(ctx.meta.get("grove.args", ())):
        return  # help needs no Prefect server
    if ctx.invoked_subcommand != "server":
        # before anything imports prefect: its settings are fixed for the process at import
        from flows.server import use_local_server

        started = use_local_server(start_if_missing=ctx.invoked_subcommand == "run")
        if started:
            console.print(started, highlight=False)
        if ctx.invoked_subcommand != "run":  # `run` does its start-up work while a new server boots
            server_ready()
    _quiet_libraries()


def server_ready() -> None:
    from flows.server import ServerError, ready

    try:
        ready()
    except ServerError as exc:
        fail(exc)


__all__ = ["app", "console", "CONFIG", "DEVICE", "FROM_STAGE", "OVERRIDES", "Device", "STORE_CONFIG", "STORE_URI",
           "with_device"]
