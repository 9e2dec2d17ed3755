"""What each run used and produced, kept in the artifact store: `grove runs`, `grove show`, `grove gc`.

A run writes runs/<started>-<id>.json when it starts and again after each stage, so a run
in progress (or one that crashed) is visible too, and `gc` never removes what a recent or
running run depends on.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from flows.compare import run_metrics
from tasks.promote import current_models
from grove.stage import StageRecord
from grove.store import ArtifactStore
from grove.store.gc import GcReport, collect_garbage

RUNS = "runs"
# A run still marked running after this long crashed without saying so.
RUNNING_FOR_AT_MOST = timedelta(days=1)


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class RunLog:
    store: ArtifactStore
    name: str
    config: str
    from_stage: str | None
    run_id: str = ""
    started: datetime = field(default_factory=_now)
    stages: list[dict[str, Any]] = field(default_factory=list)
    current: str | None = None  # the stage running now: the failed one if the run fails
    promotion: dict[str, Any] | None = None  # the promote step's decision and why
    overrides: list[str] = field(default_factory=list)  # `key.path=value` given on the command line
    settings: dict[str, str] = field(default_factory=dict)  # the config as run, flat (flows/compare.py)
    metrics: dict[str, float] = field(default_factory=dict)  # what the run measured, flat (flows/compare.py)
    shipped: str | None = None  # the build it ships: a search's kept candidate, else its precision

    def __post_init__(self) -> None:
        if not self.run_id:
            from prefect.runtime import flow_run

            self.run_id = flow_run.get_id() or uuid.uuid4().hex
        self.path = f"{RUNS}/{self.started:%Y%m%dT%H%M%S%f}-{self.run_id[:8]}.json"
        self._write("running")

    def started_stage(self, stage: str) -> None:
        self.current = stage

    def add(self, record: StageRecord) -> None:
        self.current = None
        ref = record.ref
        self.stages.append({"stage": record.stage, "status": record.status, "seconds": round(record.seconds, 2),
                            "key": ref.key, "digest": ref.digest, "size_bytes": ref.size_bytes, "uri": ref.uri})
        self._write("running")

    def finish(self, status: str, error: str | None = None) -> None:
        self._write(status, error)

    def _write(self, status: str, error: str | None = None) -> None:
        self.store.put_json(self.path, {
            "run_id": self.run_id, "record": self.path, "name": self.name, "config": self.config, "from_stage": self.from_stage,
            "status": status, "started": self.started.isoformat(timespec="microseconds"),
            "updated": _now().isoformat(timespec="seconds"), "error": error,
            "failed_stage": self.current if status == "failed" else None, "stages": self.stages,
            "promotion": self.promotion, "overrides": self.overrides, "shipped": self.shipped,
            "metrics": self.metrics, "settings": self.settings})


def list_runs(store: ArtifactStore) -> list[dict[str, Any]]:
    """Every recorded run, newest first."""
    runs = [r for r in store.list_json(RUNS) if isinstance(r, dict) and "run_id" in r]
    return sorted(runs, key=lambda r: r["started"], reverse=True)


def find_run(store: ArtifactStore, run_id: str) -> dict[str, Any]:
    matches = [r for r in list_runs(store) if r["run_id"].startswith(run_id)]
    if len(matches) != 1:
        known = ", ".join(r["run_id"][:8] for r in list_runs(store)[:10]) or "none"
        what = "no run" if not matches else f"{len(matches)} runs"
        raise LookupError(f"{what} with id {run_id!r} in {store.root} (recent: {known})")
    return matches[0]


def measured(store: ArtifactStore, run: dict[str, Any]) -> dict[str, float]:
    """A run record's metrics; a record from before runs kept them gets them from the summaries
    of the entries it names (a search's kept candidate is the last build_onnx it recorded)."""
    if run.get("metrics"):
        return run["metrics"]
    summaries = {}
    for stage in run.get("stages", []):
        entry = store.by_digest(stage["digest"]) if stage.get("digest") else None
        if entry is not None:
            summaries[stage["stage"]] = entry.manifest.get("meta", {}).get("summary") or {}
    return run_metrics(summaries)


def _still_running(run: dict[str, Any]) -> bool:
    return run["status"] == "running" and _now() - datetime.fromisoformat(run["updated"]) < RUNNING_FOR_AT_MOST


def garbage_collect(store: ArtifactStore, keep: int, grace_minutes: float = 60,
                    dry_run: bool = False) -> tuple[GcReport, int]:
    """Keep the entries of the newest `keep` runs, of runs still going and of every name's
    current model, with the record of the run that made it (what `grove models` names and
    `grove show`/`diff`/`export RUN` read); remove the rest.

    Returns the store's report and how many run records were dropped with them.
    """
    runs = list_runs(store)
    models = current_models(store)
    made_current = {m.get("run_id") for m in models}
    kept = runs[:keep] + [r for r in runs[keep:] if _still_running(r) or r["run_id"] in made_current]
    # what each kept run record and promoted model names, by key (the entry) and by digest (the
    # exact manifest: a --from-stage rerun may have pointed the key at a newer one since); the
    # entries those manifests used (meta.uses: the adapter-ship base) follow in collect_garbage
    named = [s for r in kept for s in r["stages"]] + [e for m in models for e in m["entries"]]
    live = {(e["stage"], e["key"]) for e in named if e.get("key")}
    digests = {e["digest"] for e in named if e.get("digest") and not e["digest"].startswith("pending:")}
    report = collect_garbage(store, live, grace_seconds=grace_minutes * 60, dry_run=dry_run, keep_digests=digests)
    dropped = [r for r in runs if r not in kept]
    if not dry_run:
        for run in dropped:
            store.remove(run["record"])
    return report, len(dropped)
