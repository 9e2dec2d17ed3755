"""After benchmark: promote the new model to be its name's current one, if it passes the gate.

The current model of a name is a pointer object in the artifact store,
`models/<name>/current.json`, and every model that was ever current has a copy under
`models/<name>/history/`. A model is promoted only if its gate metric is at least
`min` and not more than `max_drop` below the current model's; otherwise the run still
completes, says why it was not promoted, and the current model stays.

This step is not cached: its answer depends on the current model, which other runs move.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from grove.settings import PROMOTION_METRICS, PromotionSettings
from grove.stage import ArtifactRef, current_run
from grove.store import ArtifactStore

MODELS = "models"
# How each decision reads in the CLI, the report and the run's log.
VERDICTS = {"promoted": "promoted", "unchanged": "current model unchanged", "not_promoted": "not promoted"}


def metrics_of(refs: dict[str, ArtifactRef | None]) -> dict[str, float | None]:
    """Every gate metric this run measured (None where a stage did not run or did not measure it)."""
    found: dict[str, float | None] = {}
    for name, (stage, path) in PROMOTION_METRICS.items():
        value: Any = refs[stage].summary if refs.get(stage) is not None else None
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        found[name] = float(value) if isinstance(value, (int, float)) else None
    return found


def decide(gate: PromotionSettings, metrics: dict[str, float | None], model_digest: str,
           current: dict[str, Any] | None) -> tuple[str, str]:
    """(decision, why): decision is promoted, not_promoted or unchanged."""
    value = metrics.get(gate.metric)
    if current is not None and current["model"]["digest"] == model_digest:
        return "unchanged", f"this model is already the current {gate.model_name} (run {current['run_id'][:8]})"
    if value is None:
        return "not_promoted", f"{gate.metric} was not measured by this run"
    if value < gate.min:
        return "not_promoted", f"{gate.metric} {value:.4g} is below the gate's min {gate.min:.4g}"
    if current is not None:
        before = current.get("metrics", {}).get(gate.metric)
        if before is not None and value < before - gate.max_drop:
            return "not_promoted", (f"{gate.metric} {value:.4g} is {before - value:.4g} below the current model's "
                                    f"{before:.4g} (run {current['run_id'][:8]}); the gate allows {gate.max_drop:.4g}")
        shown = "" if before is None else f", current {before:.4g}, allowed drop {gate.max_drop:.4g}"
        return "promoted", f"{gate.metric} {value:.4g} passes the gate (min {gate.min:.4g}{shown})"
    return "promoted", f"{gate.metric} {value:.4g} passes the gate (min {gate.min:.4g}); first model of this name"


def current_model(store: ArtifactStore, name: str) -> dict[str, Any] | None:
    record = store.get_json(f"{MODELS}/{name}/current.json")
    return record if isinstance(record, dict) and "model" in record else None


def model_history(store: ArtifactStore, name: str) -> list[dict[str, Any]]:
    """Every model that was current for `name`, newest first."""
    history = [d for d in store.list_json(f"{MODELS}/{name}/history") if isinstance(d, dict) and "run_id" in d]
    return sorted(history, key=lambda d: d["promoted_at"], reverse=True)


def current_models(store: ArtifactStore) -> list[dict[str, Any]]:
    """The current model of every name in the store."""
    return sorted((d for d in store.list_json(MODELS, "*/current.json") if isinstance(d, dict) and "model" in d),
                  key=lambda d: d["name"])


def _entry(ref: ArtifactRef) -> dict[str, str]:
    return {"stage": ref.stage, "key": ref.key, "digest": ref.digest, "uri": ref.uri}


def _base_entries(final: ArtifactRef) -> list[dict[str, str]]:
    """grove.ship: adapter: the stored base the promoted adapter runs on is part of the model."""
    base = (final.summary or {}).get("base")
    return [{"stage": base["stage"], "key": base["key"], "digest": base["digest"], "uri": ""}] if base else []


@task(name="promote", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, tags=["grove", "stage:promote"])
def promote(gate: PromotionSettings, refs: dict[str, ArtifactRef | None], run_id: str, config: str) -> dict[str, Any]:
    """Move models/<name>/current.json to this run's model if it passes the gate."""
    store = current_run().store
    final = refs.get("build_onnx") or refs.get("merge_adapters")
    if final is None:
        return {"decision": "not_promoted", "reason": "this run produced no model (no merge or ModelBuilder pass)"}
    metrics = metrics_of(refs)
    current = current_model(store, gate.model_name)
    decision, reason = decide(gate, metrics, final.digest, current)
    result = {"decision": decision, "reason": reason, "model_name": gate.model_name, "metric": gate.metric,
              "value": metrics.get(gate.metric), "model_uri": final.uri,
              "current_run_id": current["run_id"] if current else None}
    if decision != "promoted":
        return result
    now = datetime.now(timezone.utc)
    record = {"name": gate.model_name, "run_id": run_id, "config": config,
              "promoted_at": now.isoformat(timespec="microseconds"), "gate": gate.model_dump(),
              "metrics": metrics, "model": _entry(final),
              # what gc must keep while this model is current
              "entries": [_entry(r) for r in refs.values() if r is not None] + _base_entries(final),
              "previous_run_id": current["run_id"] if current else None}
    # history first: a crash between the two writes leaves the old pointer, never a dangling one
    store.put_json(f"{MODELS}/{gate.model_name}/history/{now:%Y%m%dT%H%M%S%fZ}-{run_id[:8]}.json", record)
    store.put_json(f"{MODELS}/{gate.model_name}/current.json", record)
    return {**result, "current_run_id": run_id}
