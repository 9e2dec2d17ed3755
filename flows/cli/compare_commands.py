"""`grove diff RUN RUN`: two runs side by side: the settings that differ, the stages whose stored
entries differ, and every number either measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from flows.cli.app import STORE_CONFIG, STORE_URI, app, console
from flows.cli.errors import fail
from flows.cli.output import Listing
from flows.cli.store_commands import open_store


@app.command()
def diff(first: str = typer.Argument(..., metavar="RUN", help="Run id (a unique prefix is enough)."),
         second: str = typer.Argument(..., metavar="RUN", help="The run to compare it with."),
         config: Optional[Path] = STORE_CONFIG, store: Optional[str] = STORE_URI,
         as_json: bool = typer.Option(False, "--json", help="Print the differences as JSON.")) -> None:
    """Two runs side by side: settings that differ (key paths as config errors name them, overrides
    included), stages whose stored entries differ, and their metrics."""
    from flows.compare import differing, number
    from flows.runs import find_run, measured
    from grove.store import StoreError

    artifacts = open_store(config, store)
    try:
        runs = [find_run(artifacts, run_id) for run_id in (first, second)]
        metrics = [measured(artifacts, run) for run in runs]
    except (LookupError, StoreError) as exc:
        fail(exc)
    a, b = (run["run_id"][:8] for run in runs)
    unrecorded = [run["run_id"][:8] for run in runs if not run.get("settings")]
    settings = differing(*(run.get("settings") or {} for run in runs)) if not unrecorded else []
    entries = differing(*({s["stage"]: s["key"][:12] for s in run["stages"]} for run in runs))
    if as_json:
        print(json.dumps({"runs": [run["run_id"] for run in runs],
                          "settings": {key: [left, right] for key, left, right in settings},
                          "settings_not_recorded": unrecorded,
                          "entries": {stage: [left, right] for stage, left, right in entries},
                          "metrics": {key: [m.get(key) for m in metrics] for key in dict.fromkeys([*metrics[0], *metrics[1]])}},
                         indent=1))
        return
    same = runs[0]["run_id"] == runs[1]["run_id"]  # two prefixes of one run: say so, not a table of equals
    for run in runs[:1] if same else runs:
        console.print(f"{run['run_id'][:8]}: {run['name']} ({run['config']}), {run['status']}, started "
                      f"{run['started'][:19]}" + (f", shipped {run['shipped']}" if run.get("shipped") else ""),
                      highlight=False, markup=False)
    if same:
        console.print(f"{first} and {second} are the same run: nothing differs (grove show {a} for its metrics)",
                      highlight=False, markup=False)
        return
    missing = "-"
    if unrecorded:
        console.print(f"settings: not recorded by run {', '.join(unrecorded)} (a run from before runs kept them)",
                      highlight=False, markup=False)
    elif not settings:
        console.print("settings: the same", highlight=False)
    else:
        table = Listing("Settings that differ", ["key", a, b])
        for key, left, right in settings:
            table.add_row(escape(key), escape(left or missing), escape(right or missing))
        table.print()
    if entries:
        table = Listing("Stored entries that differ (a stage whose inputs, settings or code changed)",
                        ["stage", a, b])
        for stage, left, right in entries:
            table.add_row(stage, left or missing, right or missing)
        table.print()
    table = Listing("Metrics", ["metric", (a, {"justify": "right"}), (b, {"justify": "right"})])
    for key in dict.fromkeys([*metrics[0], *metrics[1]]):  # as the stages measured them: evaluate first
        table.add_row(escape(key), *(number(m.get(key)) for m in metrics))
    table.print()
