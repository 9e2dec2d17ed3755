"""The `grove` command: validate a run config, show the plan, run the flow with progress."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
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


@app.callback()
def _setup(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand != "server":
        # before anything imports prefect: its settings are fixed for the process at import
        from flows.server import use_local_server

        started = use_local_server(start_if_missing=ctx.invoked_subcommand == "run")
        if started:
            console.print(started, highlight=False)
    _quiet_libraries()


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


def _fail(error: Exception) -> None:
    console.print(f"[bold red]error:[/] {error}", highlight=False, markup=True)
    raise typer.Exit(2)


@app.command()
def validate(config: Path = CONFIG) -> None:
    """Check a run config without running anything."""
    from flows.config import ConfigError, load_config

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        _fail(exc)
    console.print(f"[green]ok[/]: {config} -> model {cfg.model.name}, data {cfg.data.files[0]}, "
                  f"train {cfg.train.method if cfg.train else 'none'}, build "
                  f"{cfg.build.precision if cfg.build else 'none'}, store {cfg.artifact_root}")


@app.command()
def stages(config: Path = CONFIG, from_stage: Optional[str] = FROM_STAGE) -> None:
    """The plan: each stage, whether it would be a cache hit, and why not."""
    from flows.config import ConfigError
    from flows.optimize import plan
    from grove.stage import STAGES

    try:
        records = {r.stage: r for r in plan(str(config), from_stage)}
    except ConfigError as exc:
        _fail(exc)
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
    console.print(f"[bold red]error:[/] stage {failed} failed: {exc}", highlight=False)
    console.print("stages that finished are stored; run again to resume from the failed stage")
    raise typer.Exit(1) from exc


@app.command()
def run(config: Path = CONFIG, from_stage: Optional[str] = FROM_STAGE,
        log_every: int = typer.Option(DEFAULT_EVERY, "--log-every", min=1,
                                      help="When stdout is not a terminal: a training line every N steps.")) -> None:
    """Run the recipe: seven cached stages, progress per stage, then a summary table.

    On a terminal the progress is live bars; anywhere else (a log file, CI, a worker) plain
    lines as stages start and end (flows/progress_lines.py)."""
    from flows.config import ConfigError, load_config
    from flows.optimize import check_from_stage, observers, optimize
    from flows.report import key_result
    from grove.stage import MissingStageError
    from grove.store import StoreError

    try:
        check_from_stage(from_stage)
        load_config(config)  # fail on bad input before Prefect starts
    except ConfigError as exc:
        _fail(exc)
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
    except (ConfigError, MissingStageError) as exc:
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
    from flows.config import ConfigError, load_config
    from grove.store import ArtifactStore

    if (config is None) == (store is None):
        _fail(ValueError("give either --config or --store"))
    if store is not None:
        return ArtifactStore(store)
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        _fail(exc)
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
def predict(model: Path = typer.Option(..., "--model", help="A shipped model folder: <output_dir>/<name>/model."),
            texts: Optional[list[str]] = typer.Argument(None, help="Texts to answer, one answer line each."),
            field: Optional[list[str]] = typer.Option(None, "--field", help="NAME=VALUE for a template with "
                                                                           "several fields.")) -> None:
    """Answer with a shipped ONNX model exactly as the evaluation scored it (its README.md snippet)."""
    from grove.shipped import ShippedModel

    try:
        shipped = ShippedModel(model)
        rows = [shipped.row_from_text(text) for text in texts or []]
        if field:
            pairs = [f.split("=", 1) for f in field]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("--field takes NAME=VALUE")
            rows.append(dict(pairs))
        if not rows:
            raise ValueError("give a text to answer (or --field NAME=VALUE)")
        for row in rows:
            print(shipped.answer(row))
    except ValueError as exc:
        _fail(exc)


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
    from flows.config import ConfigError
    from flows.deployments import serve as serve_flow

    try:
        serve_flow(config, cron, timezone, name, from_stage)
    except ConfigError as exc:
        _fail(exc)


@app.command()
def deploy(prefect_yaml: Path = typer.Option(Path("prefect.yaml"), "--file", help="The deployments file."),
           pool: str = typer.Option("grove-process", help="Process work pool to create if missing.")) -> None:
    """Check prefect.yaml, create the process work pool if missing, then `prefect deploy --all`."""
    import subprocess

    from flows.config import ConfigError
    from flows.deployments import check_prefect_yaml

    try:
        deployments = check_prefect_yaml(prefect_yaml)
    except ConfigError as exc:
        _fail(exc)
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    env = {**os.environ, "GROVE_PROJECT_DIR": str(prefect_yaml.resolve().parent)}
    pools = subprocess.run(prefect + ["work-pool", "inspect", pool], capture_output=True, text=True, env=env)
    if pools.returncode != 0:
        console.print(f"creating process work pool {pool}")
        subprocess.run(prefect + ["work-pool", "create", pool, "--type", "process"], check=True, env=env,
                       capture_output=True)
    done = subprocess.run(prefect + ["deploy", "--all", "--prefect-file", str(prefect_yaml.resolve())],
                          cwd=prefect_yaml.resolve().parent, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        console.print(done.stdout[-3000:] + done.stderr[-3000:], highlight=False, markup=False)
        raise typer.Exit(1)
    names = ", ".join(d["name"] for d in deployments)
    console.print(f"deployed {names}; start a worker: prefect worker start --pool {pool}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
