"""`grove models`, `runs`, `show`, `export` and `gc`: what an artifact store holds, and taking it out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.markup import escape

from flows.cli.app import STORE_CONFIG, STORE_URI, app, console
from flows.cli.errors import clean_errors, fail
from flows.cli.output import Listing


def open_store(config: Optional[Path], store: Optional[str]):
    """The artifact store named directly or by a run config (keys from the environment or its block);
    with neither, the one a config without a store setting uses: .grove-cache here. A store that
    holds nothing is a mistyped root, said as such (exit 2), not an empty listing."""
    return open_store_of(config, store)[0]


def open_store_of(config: Optional[Path], store: Optional[str]):
    """open_store, and the name of the config's model (None with --store or neither)."""
    from flows.config import DEFAULT_ARTIFACT_ROOT, load_config
    from flows.config.checks import refuse_keys_in_url
    from grove.store import ArtifactStore, StoreError

    if config is not None and store is not None:
        fail(ValueError("give --config or --store, not both"))
    name = None
    with clean_errors():
        if config is not None:
            cfg = load_config(config)
            artifacts, name = ArtifactStore(cfg.artifact_root, cfg.aws_credentials_block), cfg.name
        else:
            if store is not None and "://" in store:
                refuse_keys_in_url(store, "--store")
            artifacts = ArtifactStore(store or str(Path.cwd() / DEFAULT_ARTIFACT_ROOT))
        if not artifacts.exists():
            how = "" if config or store else " (the default store; name one with --store or --config)"
            raise StoreError(f"no artifact store at {artifacts.location}{how}: nothing was ever stored there")
    return artifacts, name


@app.command()
def models(config: Optional[Path] = STORE_CONFIG, store: Optional[str] = STORE_URI,
           as_json: bool = typer.Option(False, "--json", help="Print current models and history as JSON.")) -> None:
    """Current and past models of each name, with the metrics they were promoted on."""
    from flows.compare import short
    from tasks.promote import current_models, model_history
    from grove.settings import PROMOTION_METRICS
    from grove.store import StoreError

    artifacts = open_store(config, store)
    try:
        found = {model["name"]: (model, model_history(artifacts, model["name"])) for model in current_models(artifacts)}
    except StoreError as exc:
        fail(exc)
    if as_json:
        print(json.dumps({name: {"current": current, "history": history}
                          for name, (current, history) in found.items()}, indent=1))
        return
    if not found:
        console.print(f"no promoted models in {artifacts.root}")
        return
    # short headers and no box lines: fits 80 columns; the store URI of an entry is in --json only
    # (predict takes an exported or shipped folder, not an entry). Only the gate metrics some model
    # has: a labelled task's accuracies, a free-text task's chrF and exact match.
    listed = [model for current, history in found.values() for model in (current, *history)]
    shown = [m for m in PROMOTION_METRICS if any(model["metrics"].get(m) is not None for model in listed)]
    fixed = {"no_wrap": True}
    table = Listing(f"Models in {artifacts.root}",
                    [("name", {"overflow": "fold"}), ("promoted", fixed), ("run", fixed),
                     *((METRIC_HEADERS.get(m, m), {**fixed, "justify": "right"}) for m in shown)],
                    box=box.SIMPLE_HEAD)
    for name, (current, history) in found.items():
        past = [m for m in history if m["run_id"] != current["run_id"]]
        for index, model in enumerate([current, *past]):
            table.add_row(name if index == 0 else "  past", model["promoted_at"][:16].replace("T", " "),
                          model["run_id"][:8], *(short(model["metrics"].get(m)) for m in shown))
    table.print()
    where = f" --store {artifacts.root}"
    print(f"take one out: grove export NAME (or a past RUN id) --to FOLDER{where}\n"
          f"then answer with it: grove predict --model FOLDER \"a text\"", flush=True)


METRIC_HEADERS = {"onnx_accuracy": "acc", "fine_tuned_accuracy": "tuned", "onnx_decode_tokens_per_s": "tok/s",
                  "onnx_chrf": "chrF", "onnx_exact_match": "exact", "fine_tuned_chrf": "tuned chrF",
                  "fine_tuned_exact_match": "tuned exact", "onnx_token_agreement": "agree"}


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


STATUS_WORDS = {"completed": "done"}


@app.command()
def runs(config: Optional[Path] = STORE_CONFIG, store: Optional[str] = STORE_URI,
         as_json: bool = typer.Option(False, "--json", help="Print the run records as JSON.")) -> None:
    """The runs recorded in an artifact store, newest first, with their key metrics (with --config:
    that config's runs). Compare two: grove diff RUN RUN."""
    from flows.compare import KEY_METRICS, key_metrics, short
    from flows.runs import list_runs, measured
    from grove.store import StoreError

    artifacts, name = open_store_of(config, store)
    try:
        recorded = [r for r in list_runs(artifacts) if name is None or r["name"] == name]
        metrics = [key_metrics(measured(artifacts, r)) for r in recorded]
    except StoreError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(recorded, indent=1))
        return
    if not recorded:  # a header alone reads as a listing that failed
        console.print(f"no runs{f' of {name}' if name else ''} recorded in {artifacts.root}", highlight=False,
                      markup=False)
        return
    # fits 80 columns on a terminal: short headers (as grove models'), minutes, numbers to 4 digits;
    # ran: the stages that ran of those the run used (the rest were cached)
    right = {"justify": "right", "no_wrap": True}
    table = Listing(f"Runs{f' of {name}' if name else ''} in {artifacts.root}",
                    [("run", {"no_wrap": True}), ("started", {"no_wrap": True}), ("name", {"overflow": "fold"}),
                     ("status", {"overflow": "fold"}), ("ran", right), *((header, right) for header, _ in KEY_METRICS)],
                    box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False, show_edge=False)
    for run, numbers in zip(recorded, metrics):
        ran = [s for s in run["stages"] if s["status"] == "ran"]
        status = f"failed:{run['failed_stage']}" if run.get("failed_stage") else STATUS_WORDS.get(run["status"],
                                                                                                   run["status"])
        table.add_row(run["run_id"][:8], run["started"][5:16].replace("T", " "), escape(run["name"]), status,
                      f"{len(ran)}/{len(run['stages'])}", *(short(v) for v in numbers.values()))
    table.print()


@app.command()
def show(run_id: str = typer.Argument(..., metavar="RUN", help="Run id (a unique prefix is enough)."),
         config: Optional[Path] = STORE_CONFIG, store: Optional[str] = STORE_URI,
         as_json: bool = typer.Option(False, "--json", help="Print the run record as JSON.")) -> None:
    """A run's key metrics and the entries it used or produced: stage, cached or ran, size, where they are
    (every metric: --json, or grove diff)."""
    from flows.runs import find_run
    from grove.store import StoreError

    artifacts = open_store(config, store)
    try:
        run = find_run(artifacts, run_id)
    except (LookupError, StoreError) as exc:
        fail(exc)
    if as_json:
        print(json.dumps(run, indent=1))
        return
    from flows.compare import key_metrics, number
    from flows.runs import measured

    numbers = key_metrics(measured(artifacts, run))
    console.print(f"run {run['run_id']} ({run['name']}, {run['config']}): {run['status']}, started {run['started']}"
                  + (f"\noverrides: {' '.join(run['overrides'])}" if run.get("overrides") else "")
                  + (f"\nshipped: {run['shipped']}" if run.get("shipped") else "")
                  + (f"\nmetrics: " + ", ".join(f"{k} {number(v)}" for k, v in numbers.items() if v is not None)
                     if any(v is not None for v in numbers.values()) else "")
                  + (f"\nerror: {run['error']}" if run.get("error") else ""), highlight=False, markup=False)
    table = Listing(None, ["stage", "used or produced", "size",
                           ("stored at", {"overflow": "fold"})])  # a URI is only useful whole
    for stage in run["stages"]:
        table.add_row(stage["stage"], "produced" if stage["status"] == "ran" else "used (cached)",
                      _mb(stage["size_bytes"]), stage["uri"])
    table.print()


@app.command()
def export(what: str = typer.Argument(..., metavar="NAME|RUN|STAGE/KEY",
                                      help="A promoted model's name (its current model), a run id (a unique "
                                           "prefix) or one stage entry (grove show lists them)."),
           to: Path = typer.Option(..., "--to", "-o", help="A new (or empty) folder to write."),
           config: Optional[Path] = STORE_CONFIG, store: Optional[str] = STORE_URI) -> None:
    """Copy a model out of the store: the ONNX model, the peft adapter, the merged HF model, metrics and
    logs, with a README.md saying what is where."""
    from flows.export import export as export_from

    artifacts = open_store(config, store)
    with clean_errors():
        done = export_from(artifacts, what, to)
    console.print(f"exported {done.source} to {to}: " + ", ".join(f"{folder}/" for folder in done.placed)
                  + f" (see {to / 'README.md'})", highlight=False)
    if "model" in done.placed:
        adapter = f" --adapter {done.adapter}" if done.adapter else ""
        console.print(f"answer with it: grove predict --model {to}{adapter} \"a text\"", highlight=False)


@app.command()
def gc(keep: int = typer.Option(..., "--keep", min=0, help="Keep what the newest N runs used or produced."),
       config: Optional[Path] = STORE_CONFIG, store: Optional[str] = STORE_URI,
       grace_minutes: float = typer.Option(60, help="Leave files younger than this (runs in progress)."),
       dry_run: bool = typer.Option(False, "--dry-run", help="Say what would go, remove nothing.")) -> None:
    """Remove entries no recent run references, and files no entry refers to."""
    from flows.runs import garbage_collect
    from grove.store import StoreError

    artifacts = open_store(config, store)
    try:
        report, runs_dropped = garbage_collect(artifacts, keep, grace_minutes, dry_run)
    except StoreError as exc:
        fail(exc)
    verb = "would remove" if dry_run else "removed"
    console.print(f"{verb} {len(report.entries)} entries, {report.blobs} files ({_mb(report.bytes_freed)}), "
                  f"{report.other} other records and {runs_dropped} run records from {artifacts.root}"
                  + (f"; {report.views} local copies" if report.views else ""))
    for name in report.entries:
        console.print(f"  {name}", highlight=False)
