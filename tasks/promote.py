"""After benchmark: promote the new model to be its name's current one, if it passes the gate.

The current model of a name is a pointer object in the artifact store,
`models/<name>/current.json`, and every model that was ever current has a copy under
`models/<name>/history/`. A model is promoted only if it passes every rule of RULES:
its gate metric is at least `min`; its accuracy (the shipped ONNX model's, or the merged
model's without a build) is at most `max_drop_from_fine_tuned` below the model it was
built from and, when it was fine-tuned, at least `min_gain_over_base` above the base
model (with `tolerance_metric` eval_loss or kl, for data without a label column, instead: its
teacher-forced eval loss at most `max_loss_increase_from_fine_tuned` above, or its KL from, the
model it was built from at most `max_kl_from_fine_tuned`); and its gate metric is not more than `max_drop` below the current model's.
Otherwise the run still completes, says which rule failed and why, and the current
model stays.

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
# The gate's rules, in the order they are checked; a not-promoted result names the one that failed.
RULES = {
    "measured": "the gate metric was measured",
    "min": "gate metric >= min",
    "max_drop_from_fine_tuned": "shipped accuracy within max_drop_from_fine_tuned of the model it was built from",
    "min_gain_over_base": "shipped accuracy at least min_gain_over_base above the base model",
    "max_loss_increase_from_fine_tuned": "shipped eval loss within max_loss_increase_from_fine_tuned of the "
                                         "model it was built from (tolerance_metric eval_loss)",
    "max_kl_from_fine_tuned": "shipped KL from the model it was built from within max_kl_from_fine_tuned "
                              "(tolerance_metric kl)",
    "max_drop": "gate metric within max_drop of the current model",
}


def verdict_words(promotion: dict[str, Any]) -> tuple[str, str]:
    """(verdict, why) as the CLI, the report and the log show a decision: a model that was not
    promoted names the rule it failed."""
    words = VERDICTS[promotion["decision"]]
    if promotion.get("rule"):
        words += f" (failed rule {promotion['rule']})"
    return words, promotion["reason"]


# Accuracies are fractions rounded to 4 places; compare with a little slack.
EPS = 1e-9


def _read(refs: dict[str, ArtifactRef | None], stage: str, path: str) -> float | None:
    value: Any = refs[stage].summary if refs.get(stage) is not None else None
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def metrics_of(refs: dict[str, ArtifactRef | None]) -> dict[str, float | None]:
    """Every gate metric this run measured (None where a stage did not run or did not measure it)."""
    return {name: _read(refs, stage, path) for name, (stage, path) in PROMOTION_METRICS.items()}


def accuracies_of(refs: dict[str, ArtifactRef | None]) -> dict[str, float | None]:
    """The accuracies the accuracy rules compare: the shipped model (the ONNX build, else the merged
    model), the model it was built from (the fine-tune, else the base) and the base model."""
    base = _read(refs, "evaluate", "base.accuracy")
    tuned = _read(refs, "evaluate", "fine_tuned.accuracy")
    shipped = _read(refs, "build_onnx", "accuracy") if refs.get("build_onnx") is not None else tuned
    return {"shipped": shipped, "built_from": tuned if refs.get("train") is not None else base,
            "base": base if refs.get("train") is not None else None}


def qualities_of(refs: dict[str, ArtifactRef | None]) -> dict[str, float | None]:
    """The label-free measures the loss and KL rules compare (grove/teacher_forcing.py): the shipped
    model's teacher-forced eval loss (the ONNX build's, else the merged model's), the eval loss of
    the model it was built from, the base's, and the shipped model's KL and top-1 agreement with the
    model it was built from (0 and 1 without a build: it is that model)."""
    base = _read(refs, "evaluate", "base.eval_loss")
    tuned = _read(refs, "evaluate", "fine_tuned.eval_loss")
    built_from = tuned if refs.get("train") is not None else base
    if refs.get("build_onnx") is not None:
        shipped, kl, agreement = (_read(refs, "build_onnx", key) for key in
                                  ("eval_loss", "kl_from_merged", "token_agreement"))
    else:
        shipped, kl, agreement = built_from, (0.0 if built_from is not None else None), \
            (1.0 if built_from is not None else None)
    return {"shipped_eval_loss": shipped, "built_from_eval_loss": built_from,
            "base_eval_loss": base if refs.get("train") is not None else None,
            "kl_from_built_from": kl, "token_agreement": agreement}


def quality_failure(gate: PromotionSettings, quality: dict[str, float | None]) -> tuple[str, str] | None:
    """(rule, why) when the gate's tolerance metric is eval_loss or kl and the shipped model breaks its
    rule; None otherwise. Not applied when not measured (no evaluate reference, no build scoring)."""
    if gate.tolerance_metric == "eval_loss":
        shipped, source = quality.get("shipped_eval_loss"), quality.get("built_from_eval_loss")
        if shipped is not None and source is not None and \
                shipped > source + gate.max_loss_increase_from_fine_tuned + EPS:
            return "max_loss_increase_from_fine_tuned", (
                f"the shipped model's eval loss {shipped:.4f} is {shipped - source:.4f} above the model it was "
                f"built from ({source:.4f}); the gate allows {gate.max_loss_increase_from_fine_tuned:g} "
                f"(grove.promotion.max_loss_increase_from_fine_tuned)")
    if gate.tolerance_metric == "kl":
        kl = quality.get("kl_from_built_from")
        if kl is not None and kl > gate.max_kl_from_fine_tuned + EPS:
            return "max_kl_from_fine_tuned", (
                f"the shipped model's mean KL from the model it was built from is {kl:.4g}; the gate allows "
                f"{gate.max_kl_from_fine_tuned:g} (grove.promotion.max_kl_from_fine_tuned)")
    return None


def _pts(value: float) -> str:
    return f"{value * 100:.1f}"


def accuracy_failure(gate: PromotionSettings, accuracy: dict[str, float | None]) -> tuple[str, str] | None:
    """(rule, why) for the first accuracy rule the shipped model breaks; None if it breaks none.
    A rule whose accuracies were not measured (no label column) is not applied; neither are these
    when the gate's tolerance metric is eval_loss or kl."""
    shipped, source, base = accuracy.get("shipped"), accuracy.get("built_from"), accuracy.get("base")
    if shipped is None or gate.tolerance_metric != "accuracy":
        return None
    if source is not None and shipped < source - gate.max_drop_from_fine_tuned - EPS:
        return "max_drop_from_fine_tuned", (
            f"the shipped model's accuracy {_pts(shipped)} is {_pts(source - shipped)} points below the model it "
            f"was built from ({_pts(source)}); the gate allows {_pts(gate.max_drop_from_fine_tuned)} "
            f"(grove.promotion.max_drop_from_fine_tuned)")
    if base is not None and shipped < base + gate.min_gain_over_base - EPS:
        return "min_gain_over_base", (
            f"the shipped model's accuracy {_pts(shipped)} is not clearly above the base model's {_pts(base)}: "
            f"the gate asks for {_pts(gate.min_gain_over_base)} points more (grove.promotion.min_gain_over_base)")
    return None


def passed_rules(gate: PromotionSettings, value: float, accuracy: dict[str, float | None],
                 current: dict[str, Any] | None, quality: dict[str, float | None] | None = None) -> str:
    """Every rule a promoted model passed, with its numbers, in the order RULES checks them."""
    shipped, source, base = accuracy.get("shipped"), accuracy.get("built_from"), accuracy.get("base")
    rules, unmeasured = [f"{gate.metric} {value:.4g} >= min {gate.min:.4g}"], []
    quality = quality or {}
    if gate.tolerance_metric == "eval_loss":
        loss, from_loss = quality.get("shipped_eval_loss"), quality.get("built_from_eval_loss")
        if loss is not None and from_loss is not None:
            rules.append(f"shipped eval loss {loss:.4f} is {loss - from_loss:.4f} above the model it was built from "
                         f"({from_loss:.4f}; max_loss_increase_from_fine_tuned "
                         f"{gate.max_loss_increase_from_fine_tuned:g})")
        else:
            unmeasured.append("max_loss_increase_from_fine_tuned")
    elif gate.tolerance_metric == "kl":
        if quality.get("kl_from_built_from") is not None:
            rules.append(f"shipped KL {quality['kl_from_built_from']:.4g} from the model it was built from "
                         f"(max_kl_from_fine_tuned {gate.max_kl_from_fine_tuned:g})")
        else:
            unmeasured.append("max_kl_from_fine_tuned")
    elif shipped is not None and source is not None:
        rules.append(f"shipped accuracy {_pts(shipped)} is {_pts(source - shipped)} points below the model it was "
                     f"built from ({_pts(source)}; max_drop_from_fine_tuned {_pts(gate.max_drop_from_fine_tuned)})")
    else:
        unmeasured.append("max_drop_from_fine_tuned")
    if gate.tolerance_metric == "accuracy":
        if shipped is not None and base is not None:
            rules.append(f"{_pts(shipped - base)} points above the base model ({_pts(base)}; "
                         f"min_gain_over_base {_pts(gate.min_gain_over_base)})")
        else:
            unmeasured.append("min_gain_over_base")
    before = current.get("metrics", {}).get(gate.metric) if current is not None else None
    if current is None:
        rules.append("max_drop: first model of this name")
    elif before is None:
        rules.append(f"max_drop: the current model has no {gate.metric}")
    else:
        rules.append(f"{gate.metric} {value:.4g} vs the current model's {before:.4g} (max_drop {gate.max_drop:.4g})")
    skipped = f"; not applied (accuracy not measured or no fine-tune): {', '.join(unmeasured)}" if unmeasured else ""
    return "passes every rule of the gate: " + "; ".join(rules) + skipped


def decide(gate: PromotionSettings, metrics: dict[str, float | None], model_digest: str,
           current: dict[str, Any] | None, accuracy: dict[str, float | None] | None = None,
           quality: dict[str, float | None] | None = None) -> tuple[str, str, str | None]:
    """(decision, why, rule): decision is promoted, not_promoted or unchanged; rule names the gate
    rule that failed (a key of RULES), None unless not promoted. A promoted model's why names every
    rule it passed, with the numbers."""
    value = metrics.get(gate.metric)
    if _is_current(current, model_digest):
        return "unchanged", f"this model is already the current {gate.model_name} (run {current['run_id'][:8]})", None
    if value is None:
        return "not_promoted", f"{gate.metric} was not measured by this run", "measured"
    if value < gate.min:
        return "not_promoted", f"{gate.metric} {value:.4g} is below the gate's min {gate.min:.4g}", "min"
    failed = accuracy_failure(gate, accuracy or {}) or quality_failure(gate, quality or {})
    if failed is not None:
        return "not_promoted", failed[1], failed[0]
    before = current.get("metrics", {}).get(gate.metric) if current is not None else None
    if before is not None and value < before - gate.max_drop:
        return "not_promoted", (f"{gate.metric} {value:.4g} is {before - value:.4g} below the current model's "
                                f"{before:.4g} (run {current['run_id'][:8]}); the gate allows "
                                f"{gate.max_drop:.4g}"), "max_drop"
    return "promoted", passed_rules(gate, value, accuracy or {}, current, quality), None


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


def already_current(store: ArtifactStore, gate: PromotionSettings, refs: dict[str, ArtifactRef | None]) -> bool:
    """Whether this run's model is its name's current model already (a cached rerun): promote
    then only says so."""
    final = refs.get("build_onnx") or refs.get("merge_adapters")
    return final is not None and _is_current(current_model(store, gate.model_name), final.digest)


def _is_current(current: dict[str, Any] | None, model_digest: str) -> bool:
    return current is not None and current["model"]["digest"] == model_digest


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
        return {"decision": "not_promoted", "rule": None,
                "reason": "this run produced no model (no merge or ModelBuilder pass)"}
    metrics = metrics_of(refs)
    current = current_model(store, gate.model_name)
    accuracy, quality = accuracies_of(refs), qualities_of(refs)
    decision, reason, rule = decide(gate, metrics, final.digest, current, accuracy, quality)
    result = {"decision": decision, "reason": reason, "rule": rule, "model_name": gate.model_name, "metric": gate.metric,
              "accuracy": accuracy, "quality": quality, "tolerance_metric": gate.tolerance_metric,
              "value": metrics.get(gate.metric), "model_uri": final.uri,
              "current_run_id": current["run_id"] if current else None}
    if decision == "not_promoted":
        return result
    now = datetime.now(timezone.utc)
    record = {"name": gate.model_name, "run_id": run_id, "config": config,
              "promoted_at": now.isoformat(timespec="microseconds"), "gate": gate.model_dump(),
              "metrics": metrics, "model": _entry(final),
              # what gc must keep while this model is current
              "entries": [_entry(r) for r in refs.values() if r is not None] + _base_entries(final),
              "previous_run_id": current["run_id"] if current else None}
    if decision == "unchanged":
        if {e["digest"] for e in record["entries"]} == {e["digest"] for e in current["entries"]}:
            return result
        # the current model measured again (a --from-stage rerun, other benchmark settings): same
        # model, new entries; its record takes them, as `grove models` and `grove export NAME` show
        result["reason"] += "; its record now holds this run's measurements"
    elif decision != "promoted":
        return result
    # history first: a crash between the two writes leaves the old pointer, never a dangling one
    store.put_json(f"{MODELS}/{gate.model_name}/history/{now:%Y%m%dT%H%M%S%fZ}-{run_id[:8]}.json", record)
    store.put_json(f"{MODELS}/{gate.model_name}/current.json", record)
    return {**result, "current_run_id": run_id}
