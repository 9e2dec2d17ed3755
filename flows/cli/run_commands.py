"""`grove validate`, `stages` and `run`: a run config checked, planned, run."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from flows.cli.app import CONFIG, DEVICE, FROM_STAGE, Device, OVERRIDES, app, console, server_ready, with_device
from flows.cli.errors import (clean_errors, fail, quiet_user_errors_in_prefect_console, said_once, stage_failed,
                              stderr_console)
from flows.cli.output import Listing
from flows.progress_lines import DEFAULT_EVERY, ProgressLines


@app.command()
def validate(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES, device: Optional[Device] = DEVICE,
             resolved: bool = typer.Option(False, "--resolved", help="Print each stage's resolved settings and the "
                                                                    "plan as JSON on stdout (the rest on stderr).")) -> None:
    """Check a run config without running anything; say what it would build and when it promotes."""
    from flows.config import load_config
    from flows.plan_words import plan_lines, plan_of

    warnings: list[str] = []
    with clean_errors(), said_once(warnings):
        cfg = load_config(config, warnings=warnings, overrides=with_device(overrides, device))
    if resolved:  # stdout is the JSON and nothing else: `grove validate --resolved | jq` works
        print(json.dumps({**cfg.model_dump(mode="json"), "plan": plan_of(cfg)}, indent=2), flush=True)
    say = stderr_console if resolved else console
    say.print(f"[green]ok[/]: {config} -> model {cfg.model.name}, data {cfg.data.files[0]}, "
              f"train {cfg.train.method if cfg.train else 'none'}, store {cfg.artifact_root}", highlight=False)
    for line in plan_lines(cfg):
        say.print(line, highlight=False, markup=False)


@app.command()
def stages(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES, device: Optional[Device] = DEVICE,
           from_stage: Optional[str] = FROM_STAGE) -> None:
    """The plan: each stage, whether it would be a cache hit, and why not."""
    from flows.config import load_config
    from flows.optimize import check_from_stage, plan
    from flows.plan_words import plan_lines
    from grove.stage import STAGES

    overrides = with_device(overrides, device)
    with clean_errors():
        check_from_stage(from_stage, "--from-stage")
        cfg = load_config(config, overrides=overrides)
        records = {r.stage: r for r in plan(str(config), from_stage, overrides, loaded=cfg)}
    table = Listing(f"Plan for {config}", ["stage", "cache", "why", "key"])
    for stage in STAGES:
        record = records.get(stage)
        if record is None:
            table.add_row(stage, "[dim]skipped[/]", "not in this config's passes", "")
        elif record.status == "hit":
            table.add_row(stage, "[green]hit[/]", record.reason, record.ref.key[:12])
        else:
            table.add_row(stage, "[yellow]miss[/]", record.reason, "")
    table.print()
    for line in plan_lines(cfg):
        console.print(line, highlight=False, markup=False)


@app.command()
def run(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES, device: Optional[Device] = DEVICE,
        from_stage: Optional[str] = FROM_STAGE,
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

    overrides = with_device(overrides, device)
    with clean_errors():  # bad input fails here: before Prefect starts, before the store is touched
        check_from_stage(from_stage, "--from-stage")
        cfg = load_config(config, overrides=overrides)
    from flows.server import launching
    from grove.models import model_folder, needs_conversion

    if needs_conversion(cfg.model) and launching():  # the one-time conversion, while the server boots
        console.print(f"converting the bundled model {cfg.model.name} (once per machine)", highlight=False)
        model_folder(cfg.model)
    server_ready()
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

    quiet_user_errors_in_prefect_console()
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
            result = optimize(str(config), from_stage, overrides or None)
    except (UserError, MissingStageError) as exc:  # e.g. remote data that load_data found bad
        fail(exc)
    except StoreError as exc:
        if not bars:  # the store could not be used at all: nothing ran
            fail(exc)
        stage_failed(bars, finished, exc)
    except Exception as exc:  # noqa: BLE001 - a failed stage: say which, keep the stored ones
        stage_failed(bars, finished, exc)
    finally:
        observers.reset(token)
    table = Listing(f"Grove run finished in {time.monotonic() - started:.1f}s",
                    ["stage", "cached or ran", "seconds", "key result"])
    for stage in result["stages"]:  # escaped: a search's `build_onnx[int4-b16]` is a name, not markup
        table.add_row(escape(stage.get("task_run") or stage["stage"]), stage["status"], f"{stage['seconds']:.1f}",
                      escape(key_result(stage["stage"], stage["summary"])))
    table.print()
    console.print(f"final model: {result['model_path']}\nshipped:     {result.get('shipped') or 'nothing (no merge or build pass)'}"
                  + "".join(f"\n{line}" for line in evaluation_lines(result.get("metrics") or {}))
                  + f"\nreport:      {Path(result['report_path']).with_suffix('.md')} (report.json beside it)\n"
                  f"run:         {result['run_id']} (grove show {result['run_id'][:8]} --config {config})\n"
                  f"prefect:     {flow_run_where(result['run_id'])}", highlight=False, markup=False)
    promotion = result.get("promotion")
    if promotion:
        from tasks.promote import verdict_words

        colour = {"promoted": "green", "not_promoted": "yellow"}.get(promotion["decision"], "default")
        words, why = verdict_words(promotion)
        console.print(f"model:       {promotion.get('model_name')}: [{colour}]{escape(words)}[/]: {escape(why)}")


def evaluation_lines(metrics: dict) -> list[str]:
    """`eval:` lines: each scored model's accuracy, eval loss and perplexity (and whatever else
    evaluate or build_onnx measured), as report.md's Evaluation table has them."""
    from flows.compare import evaluation_table

    columns, rows = evaluation_table(metrics)
    return [f"eval:        {label:<13} " + ", ".join(f"{c} {v}" for c, v in zip(columns, values) if v != "-")
            for label, *values in rows]


def flow_run_where(run_id: str) -> str:
    """The flow run's page in the Prefect UI when a server with a UI is known; Prefect's temporary
    server has none that outlives the command, so then the id and how to keep one."""
    from prefect.utilities.urls import url_for

    url = url_for("flow-run", obj_id=run_id)
    return url or (f"flow run {run_id} on Prefect's temporary server (gone with this command; "
                   f"`grove server start` keeps a server with a UI)")
