"""The `grove` command: validate a run config, show the plan, run the flow with progress."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from flows.progress_lines import DEFAULT_EVERY, ProgressLines

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Grove: run an Olive fine-tune -> int4 ONNX recipe as a cached Prefect flow.")
console = Console()
CONFIG = typer.Option(..., "--config", "-c", help="Olive run config (JSON or YAML).")
FROM_STAGE = typer.Option(None, "--from-stage", help="Reuse stages before this one, rerun it and the rest.")


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


DEBUG = {"traceback": False}


@app.callback()
def _setup(ctx: typer.Context,
           debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error, too.")) -> None:
    DEBUG["traceback"] = debug
    if ctx.invoked_subcommand != "server":
        # before anything imports prefect: its settings are fixed for the process at import
        from flows.server import use_local_server

        started = use_local_server(start_if_missing=ctx.invoked_subcommand == "run")
        if started:
            console.print(started, highlight=False)
        if ctx.invoked_subcommand != "run":  # `run` does its start-up work while a new server boots
            _server_ready()
    _quiet_libraries()


def _server_ready() -> None:
    from flows.server import ServerError, ready

    try:
        ready()
    except ServerError as exc:
        _fail(exc)


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
    from flows.server import running

    record = running()
    console.print(f"running: UI {record['ui']} (pid {record['pid']})" if record else "not running", highlight=False)


def _message(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    return " ".join(str(error).split()) or type(error).__name__


def _fail(error: BaseException) -> None:
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


def _quiet_user_errors_in_prefect_console() -> None:
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
def _clean_errors():
    try:
        yield
    except user_mistakes() as exc:
        _fail(exc)


@app.command()
def validate(config: Path = CONFIG,
             resolved: bool = typer.Option(False, "--resolved", help="print each stage's resolved settings "
                                                                    "(JSON) and every warning")) -> None:
    """Check a run config without running anything."""
    from flows.config import load_config

    warnings: list[str] = []
    with _clean_errors():
        cfg = load_config(config, warnings=warnings)
    if resolved:
        print(cfg.model_dump_json(indent=2))
        for warning in warnings:
            console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    console.print(f"[green]ok[/]: {config} -> model {cfg.model.name}, data {cfg.data.files[0]}, "
                  f"train {cfg.train.method if cfg.train else 'none'}, build "
                  f"{cfg.build.precision if cfg.build else 'none'}, store {cfg.artifact_root}")


@app.command()
def stages(config: Path = CONFIG, from_stage: Optional[str] = FROM_STAGE) -> None:
    """The plan: each stage, whether it would be a cache hit, and why not."""
    from flows.optimize import plan
    from grove.stage import STAGES

    with _clean_errors():
        records = {r.stage: r for r in plan(str(config), from_stage)}
    table = Table(title=f"Plan for {config}")
    for column in ("stage", "cache", "why", "key"):
        table.add_column(column)
    for stage in STAGES:
        record = records.get(stage)
        if record is None:
            table.add_row(stage, "[dim]skipped[/]", "not in this config's passes", "")
        elif record.status == "hit":
            table.add_row(stage, "[green]hit[/]", record.reason, record.ref.key[:12])
        else:
            table.add_row(stage, "[yellow]miss[/]", record.reason, "")
    console.print(table)


def _stage_failed(bars: dict[str, int], finished: set[str], exc: Exception) -> None:
    failed = next((s for s in reversed(bars) if s not in finished), "?")
    if DEBUG["traceback"]:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"error: stage {failed} failed: {_message(exc)}", file=sys.stderr, flush=True)
    console.print("stages that finished are stored; run again to resume from the failed stage")
    raise typer.Exit(1) from exc


@app.command()
def run(config: Path = CONFIG, from_stage: Optional[str] = FROM_STAGE,
        log_every: int = typer.Option(DEFAULT_EVERY, "--log-every", min=1,
                                      help="When stdout is not a terminal: a training line every N steps.")) -> None:
    """Run the recipe: seven cached stages, progress per stage, then a summary table.

    On a terminal the progress is live bars; anywhere else (a log file, CI, a worker) plain
    lines as stages start and end (flows/progress_lines.py)."""
    from flows.config import load_config
    from flows.optimize import check_from_stage, observers, optimize
    from flows.report import key_result
    from grove.errors import UserError
    from grove.stage import MissingStageError
    from grove.store import StoreError

    with _clean_errors():  # bad input fails here: before Prefect starts, before the store is touched
        check_from_stage(from_stage)
        cfg = load_config(config)
    from flows.server import launching
    from grove.models import model_folder, needs_conversion

    if needs_conversion(cfg.model) and launching():  # the one-time conversion, while the server boots
        console.print(f"converting the bundled model {cfg.model.name} (once per machine)", highlight=False)
        model_folder(cfg.model)
    _server_ready()
    progress = Progress(TextColumn("[bold]{task.description:<15}"), BarColumn(bar_width=20),
                        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console)
    bars: dict[str, int] = {}
    finished: set[str] = set()

    def start(stage: str) -> None:
        bars[stage] = progress.add_task(stage, total=None, info="")

    def step(stage: str, done: int, total: int, info: dict) -> None:
        detail = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items()
                           if v is not None)
        progress.update(bars[stage], completed=done, total=total, info=detail)

    def end(record) -> None:
        finished.add(record.stage)
        total = progress.tasks[bars[record.stage]].total or 1
        progress.update(bars[record.stage], completed=total, total=total,
                        info=f"[green]{record.status}[/] {key_result(record.stage, record.ref.summary)}")

    _quiet_user_errors_in_prefect_console()
    hooks = {"on_stage_start": start, "on_progress": step, "on_stage_end": end}
    display = progress
    if not sys.stdout.isatty():
        lines = ProgressLines(sys.stdout, log_every)
        display = contextlib.nullcontext()
        hooks = {"on_stage_start": lambda stage: (bars.setdefault(stage, len(bars)), lines.start(stage)),
                 "on_progress": lines.step,
                 "on_stage_end": lambda record: (finished.add(record.stage), lines.end(record))}
    token = observers.set(hooks)
    started = time.monotonic()
    try:
        with display:
            result = optimize(str(config), from_stage)
    except (UserError, MissingStageError) as exc:  # e.g. remote data that load_data found bad
        _fail(exc)
    except StoreError as exc:
        if not bars:  # the store could not be used at all: nothing ran
            _fail(exc)
        _stage_failed(bars, finished, exc)
    except Exception as exc:  # noqa: BLE001 - a failed stage: say which, keep the stored ones
        _stage_failed(bars, finished, exc)
    finally:
        observers.reset(token)
    table = Table(title=f"Grove run finished in {time.monotonic() - started:.1f}s")
    for column in ("stage", "cached or ran", "seconds", "key result"):
        table.add_column(column)
    for stage in result["stages"]:
        table.add_row(stage.get("task_run") or stage["stage"], stage["status"], f"{stage['seconds']:.1f}",
                      key_result(stage["stage"], stage["summary"]))
    console.print(table)
    console.print(f"final model: {result['model_path']}\nreport:      {result['report_path']}\n"
                  f"run:         {result['run_id']} (grove show {result['run_id'][:8]} --config {config})")
    promotion = result.get("promotion")
    if promotion:
        from tasks.promote import verdict_words

        colour = {"promoted": "green", "not_promoted": "yellow"}.get(promotion["decision"], "default")
        words, why = verdict_words(promotion)
        console.print(f"model:       {promotion.get('model_name')}: [{colour}]{words}[/]: {why}")


STORE_CONFIG = typer.Option(None, "--config", "-c", help="Run config whose artifact root to use.")
STORE_URI = typer.Option(None, "--store", help="Artifact root (folder or s3://bucket/prefix) instead of --config.")


def _open_store(config: Optional[Path], store: Optional[str]):
    """The artifact store named directly or by a run config (keys from the environment or its block)."""
    from flows.config import load_config
    from grove.store import ArtifactStore

    if (config is None) == (store is None):
        _fail(ValueError("give either --config or --store"))
    with _clean_errors():
        if store is not None:
            return ArtifactStore(store)
        cfg = load_config(config)
        return ArtifactStore(cfg.artifact_root, cfg.aws_credentials_block)


@app.command()
def models(config: Optional[Path] = STORE_CONFIG, store: Optional[str] = STORE_URI,
           as_json: bool = typer.Option(False, "--json", help="Print current models and history as JSON.")) -> None:
    """Current and past models of each name, with the metrics they were promoted on."""
    from tasks.promote import current_models, model_history
    from grove.settings import PROMOTION_METRICS
    from grove.store import StoreError

    artifacts = _open_store(config, store)
    try:
        found = {model["name"]: (model, model_history(artifacts, model["name"])) for model in current_models(artifacts)}
    except StoreError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps({name: {"current": current, "history": history}
                          for name, (current, history) in found.items()}, indent=1))
        return
    if not found:
        console.print(f"no promoted models in {artifacts.root}")
        return
    table = Table(title=f"Models in {artifacts.root}")
    for column in ("name", "", "promoted", "run", *PROMOTION_METRICS):
        table.add_column(column)
    table.add_column("model", overflow="fold")
    for name, (current, history) in found.items():
        past = [m for m in history if m["run_id"] != current["run_id"]]
        for index, model in enumerate([current, *past]):
            table.add_row(name if index == 0 else "", "current" if index == 0 else "past",
                          model["promoted_at"][:19], model["run_id"][:8],
                          *(_metric(model["metrics"].get(m)) for m in PROMOTION_METRICS), model["model"]["uri"])
    console.print(table)


@app.command()
def predict(model: Path = typer.Option(..., "--model", help="A shipped folder: <output_dir>/<name> or its model/."),
            texts: Optional[list[str]] = typer.Argument(None, help="Texts to answer, one answer line each."),
            field: Optional[list[str]] = typer.Option(None, "--field", help="NAME=VALUE for a template with "
                                                                           "several fields."),
            adapter: Optional[str] = typer.Option(None, "--adapter", help="A named adapter in adapters/ "
                                                                          "(grove.ship: adapter), active on the base."),
            max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1,
                                                         help="Default: as the evaluation scored it.")) -> None:
    """Answer with a shipped ONNX model exactly as the evaluation scored it (its README.md snippet)."""
    from grove.errors import UserError
    from grove.served import adapter_file, adapter_prompt
    from grove.shipped import ShippedModel

    with _clean_errors():
        folder = model / "model" if (model / "model").is_dir() else model
        if adapter:
            from grove.engines import OnnxEngine

            file = adapter_file(model, adapter)
            spec = adapter_prompt(file)
            if spec is None:
                raise UserError(f"{file}: no prompt template shipped with it (adapters/{adapter}.grove_prompt.json)")
            shipped = ShippedModel(folder, OnnxEngine(folder, set(spec["eos_token_ids"]), adapter=file), spec)
        else:
            shipped = ShippedModel(folder)
        if max_new_tokens:
            shipped.spec = {**shipped.spec, "max_new_tokens": max_new_tokens}
        rows = [shipped.row_from_text(text) for text in texts or []]
        if field:
            pairs = [f.split("=", 1) for f in field]
            if any(len(p) != 2 for p in pairs):
                raise UserError("--field takes NAME=VALUE")
            rows.append(dict(pairs))
        if not rows:
            raise UserError("give a text to answer (or --field NAME=VALUE)")
        for row in rows:
            print(shipped.answer(row))


def _metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


@app.command()
def runs(config: Optional[Path] = STORE_CONFIG, store: Optional[str] = STORE_URI,
         as_json: bool = typer.Option(False, "--json", help="Print the run records as JSON.")) -> None:
    """The runs recorded in an artifact store, newest first."""
    from flows.runs import list_runs
    from grove.store import StoreError

    artifacts = _open_store(config, store)
    try:
        recorded = list_runs(artifacts)
    except StoreError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(recorded, indent=1))
        return
    table = Table(title=f"Runs in {artifacts.root}")
    for column in ("run", "started", "name", "status", "ran", "cached", "produced"):
        table.add_column(column)
    for run in recorded:
        ran = [s for s in run["stages"] if s["status"] == "ran"]
        status = f"failed at {run['failed_stage']}" if run.get("failed_stage") else run["status"]
        table.add_row(run["run_id"][:8], run["started"][:19], run["name"], status, str(len(ran)),
                      str(len(run["stages"]) - len(ran)), _mb(sum(s["size_bytes"] for s in ran)))
    console.print(table)


@app.command()
def show(run_id: str = typer.Argument(..., help="Run id (a unique prefix is enough)."),
         config: Optional[Path] = STORE_CONFIG, store: Optional[str] = STORE_URI,
         as_json: bool = typer.Option(False, "--json", help="Print the run record as JSON.")) -> None:
    """The entries a run used or produced: stage, cached or ran, size, where they are."""
    from flows.runs import find_run
    from grove.store import StoreError

    artifacts = _open_store(config, store)
    try:
        run = find_run(artifacts, run_id)
    except (LookupError, StoreError) as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(run, indent=1))
        return
    console.print(f"run {run['run_id']} ({run['name']}, {run['config']}): {run['status']}, started {run['started']}"
                  + (f"\nerror: {run['error']}" if run.get("error") else ""), highlight=False)
    table = Table()
    for column in ("stage", "used or produced", "size"):
        table.add_column(column)
    table.add_column("stored at", overflow="fold")  # a URI is only useful whole
    for stage in run["stages"]:
        table.add_row(stage["stage"], "produced" if stage["status"] == "ran" else "used (cached)",
                      _mb(stage["size_bytes"]), stage["uri"])
    console.print(table)


@app.command()
def gc(keep: int = typer.Option(..., "--keep", min=0, help="Keep what the newest N runs used or produced."),
       config: Optional[Path] = STORE_CONFIG, store: Optional[str] = STORE_URI,
       grace_minutes: float = typer.Option(60, help="Leave files younger than this (runs in progress)."),
       dry_run: bool = typer.Option(False, "--dry-run", help="Say what would go, remove nothing.")) -> None:
    """Remove entries no recent run references, and files no entry refers to."""
    from flows.runs import garbage_collect
    from grove.store import StoreError

    artifacts = _open_store(config, store)
    try:
        report, runs_dropped = garbage_collect(artifacts, keep, grace_minutes, dry_run)
    except StoreError as exc:
        _fail(exc)
    verb = "would remove" if dry_run else "removed"
    console.print(f"{verb} {len(report.entries)} entries, {report.blobs} files ({_mb(report.bytes_freed)}), "
                  f"{report.other} other records and {runs_dropped} run records from {artifacts.root}")
    for name in report.entries:
        console.print(f"  {name}", highlight=False)


@app.command()
def serve(config: str = typer.Option(..., "--config", "-c", help="Run config (path or URL) the schedule runs."),
          cron: str = typer.Option("0 2 * * *", help="When to run (cron, five fields)."),
          timezone: str = typer.Option("UTC", help="Timezone of the cron schedule."),
          name: str = typer.Option("grove-nightly", help="Deployment name."),
          from_stage: Optional[str] = FROM_STAGE) -> None:
    """Serve the flow on a schedule from this process (no work pool needed); Ctrl-C stops it."""
    from flows.deployments import serve as serve_flow

    with _clean_errors():
        serve_flow(config, cron, timezone, name, from_stage)


@app.command()
def deploy(prefect_yaml: Path = typer.Option(Path("prefect.yaml"), "--file", help="The deployments file."),
           pool: str = typer.Option("grove-process", help="Process work pool to create if missing."),
           crash_after: float = typer.Option(
               None, min=30, help="With a placement: seconds without a heartbeat after which a child flow run "
                                  "counts as crashed and its group starts again (default: 3 heartbeats)")) -> None:
    """Check prefect.yaml, create the process work pool if missing, then `prefect deploy --all`."""
    import subprocess

    import tempfile

    from flows.deployments import check_prefect_yaml, placement_pools, with_group_deployments

    with _clean_errors():
        deployments = check_prefect_yaml(prefect_yaml)
        group_pools = placement_pools(deployments, prefect_yaml.resolve().parent)
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    env = {**os.environ, "GROVE_PROJECT_DIR": str(prefect_yaml.resolve().parent)}
    for name in [pool, *group_pools]:
        pools = subprocess.run(prefect + ["work-pool", "inspect", name], capture_output=True, text=True, env=env)
        if pools.returncode != 0:
            console.print(f"creating process work pool {name}")
            subprocess.run(prefect + ["work-pool", "create", name, "--type", "process"], check=True, env=env,
                           capture_output=True)
    with tempfile.TemporaryDirectory() as folder:
        # the stage-group deployments of every placement pool join prefect.yaml's, in one deploy
        spec = Path(folder) / "prefect.yaml"
        spec.write_text(with_group_deployments(prefect_yaml, group_pools))
        done = subprocess.run(prefect + ["deploy", "--all", "--prefect-file", str(spec)],
                              cwd=prefect_yaml.resolve().parent, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        console.print(done.stdout[-3000:] + done.stderr[-3000:], highlight=False, markup=False)
        raise typer.Exit(1)
    if group_pools:
        from flows.placement import DEFAULT_CRASH_AFTER, ensure_crash_automation

        ensure_crash_automation(crash_after or DEFAULT_CRASH_AFTER)
    names = ", ".join([d["name"] for d in deployments] + [f"grove-stages/{p}" for p in group_pools])
    console.print(f"deployed {names}; start a worker on each pool: prefect worker start --pool NAME "
                  f"({', '.join([pool, *group_pools])})")


def main() -> None:
    """The `grove` command. A user's mistake raised outside a command's own handling still ends as
    one line (exit 2); anything else keeps its traceback, it is a bug to report."""
    try:
        app(standalone_mode=True)
    except user_mistakes() as exc:
        try:
            _fail(exc)
        except typer.Exit as done:
            sys.exit(done.exit_code)


if __name__ == "__main__":
    sys.exit(main())
