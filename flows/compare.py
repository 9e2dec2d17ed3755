"""Runs side by side: the numbers a run measured, flat, and the settings it ran with, flat, as
`grove runs`, `grove diff`, report.md and the end-of-run summary show them.

Metrics are read from the stages' summaries by shape, not by a list of names, so a metric a stage
starts reporting (an ONNX eval loss, a free-text score) shows up in `grove diff` and the run
record without a change here: every number in evaluate's per-model results (`base.accuracy`,
`fine_tuned.eval_loss`, `fine_tuned.generation.chrf`), the shipped ONNX model's quality numbers
(`onnx.accuracy`, ...), its size, and the benchmark's per-engine timings. Settings are the
config's keys as written plus the command line's overrides, flattened to the key paths config
errors name (`passes.lora.config.training_args.max_steps`, data configs by their name).
"""

from __future__ import annotations

import json
from typing import Any

from grove.settings import BuildSettings

# Numbers in a summary that count or configure rather than measure quality or speed.
NOT_METRICS = {"per_label", "search", "prompt_tokens", "new_tokens", "runs", "size_mb", "rows",
               "rows_proven_by_forward_pass"}
# ... and in build_onnx's: its settings, the speed of scoring (the benchmark measures speed) and
# the teacher-forced pass's bookkeeping (its loss, agreement and KL are the metrics)
NOT_BUILD_METRICS = {*NOT_METRICS, *BuildSettings.model_fields, "build_seconds", "size_bytes",
                     "prompts_unlike_training", "decode_tokens_per_s", "teacher_forced_seconds",
                     "scored_tokens", "non_finite_tokens"}


def _leaves(prefix: str, value: Any, into: dict[str, float], skip: set[str] = NOT_METRICS) -> None:
    """Every number under `value` as `prefix.key.sub` (booleans are not numbers here)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if key not in skip:
                _leaves(f"{prefix}.{key}", inner, into, skip)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        into[prefix] = value


def run_metrics(summaries: dict[str, dict[str, Any] | None]) -> dict[str, float]:
    """The numbers one run measured, flat, from its stages' summaries (stage name -> summary)."""
    found: dict[str, float] = {}
    for model, scores in (summaries.get("evaluate") or {}).items():
        if isinstance(scores, dict):
            _leaves(model, scores, found)
    onnx = summaries.get("build_onnx") or {}
    if onnx.get("loaded") is not False:
        _leaves("onnx", onnx, found, NOT_BUILD_METRICS)
    shipped = onnx or summaries.get("merge_adapters") or {}
    if isinstance(shipped.get("size_bytes"), (int, float)):
        found["shipped.size_mb"] = round(shipped["size_bytes"] / 2**20, 2)
    for engine, timings in (summaries.get("benchmark") or {}).items():
        if isinstance(timings, dict):
            _leaves(f"bench.{engine}", timings, found)
    return found


def shipped_name(summaries: dict[str, dict[str, Any] | None]) -> str | None:
    """What the run ships: a search's kept candidate, else the build's precision, else the merged model."""
    onnx = summaries.get("build_onnx") or {}
    if onnx:
        return onnx.get("candidate") or f"{onnx.get('precision')} {onnx.get('execution_provider', 'cpu')}"
    return "merged PyTorch model" if summaries.get("merge_adapters") else None


# The columns `grove runs` shows, headed as `grove models` heads them: (header, metric names tried
# in order): the fine-tune's accuracy, the shipped model's (ONNX, else the merged fine-tune), the
# eval loss and perplexity of the model trained (the base's without training), the shipped size
# and decode speed.
KEY_METRICS = (
    ("tuned", ("fine_tuned.accuracy",)),
    ("acc", ("onnx.accuracy", "fine_tuned.accuracy")),
    ("loss", ("fine_tuned.eval_loss", "base.eval_loss")),
    ("ppl", ("fine_tuned.perplexity", "base.perplexity")),
    ("MB", ("shipped.size_mb",)),
    ("tok/s", ("bench.onnx.decode_tokens_per_s", "bench.pytorch.decode_tokens_per_s")),
)


def key_metrics(metrics: dict[str, float]) -> dict[str, float | None]:
    return {header: next((metrics[n] for n in names if metrics.get(n) is not None), None)
            for header, names in KEY_METRICS}


def short(value: Any) -> str:
    """A table cell: 4 significant digits, large numbers whole (16069.6 -> 16070)."""
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return number(value)


def number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# ---- report.md's quality table and the run's eval: lines ------------------------------------
# How evaluate's numbers read in one line: (summary key, word).
EVAL_WORDS = (("accuracy", "acc"), ("eval_loss", "loss"), ("perplexity", "ppl"))


# The models evaluate and build_onnx score, in the order they are made.
MODELS = (("base", "base"), ("fine_tuned", "fine-tuned"), ("onnx", "shipped ONNX"))


def evaluation_table(metrics: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    """One row per model scored, one column per number any of them has (accuracy, eval loss,
    perplexity first; then whatever else the stages report), '-' where a model lacks it."""
    per_model = {label: {name[len(model) + 1:]: value for name, value in metrics.items()
                         if name.startswith(f"{model}.")} for model, label in MODELS}
    per_model = {label: numbers for label, numbers in per_model.items() if numbers}
    first = [key for key, _ in EVAL_WORDS]
    columns = first + sorted({c for numbers in per_model.values() for c in numbers} - set(first))
    columns = [c for c in columns if any(c in numbers for numbers in per_model.values())]
    return columns, [[label, *(number(numbers.get(c)) for c in columns)] for label, numbers in per_model.items()]


# ---- settings ------------------------------------------------------------------------------------
def flat_settings(raw: Any, prefix: str = "") -> dict[str, str]:
    """A raw config's keys as config errors name them, each value as JSON text; a list of
    mappings with names (data_configs) is keyed by name, any other list is one value."""
    if isinstance(raw, dict):
        found: dict[str, str] = {}
        for key, value in raw.items():
            found.update(flat_settings(value, f"{prefix}.{key}" if prefix else str(key)))
        return found
    if isinstance(raw, list) and raw and all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in raw):
        found = {}
        for item in raw:
            found.update(flat_settings({k: v for k, v in item.items() if k != "name"}, f"{prefix}.{item['name']}"))
        return found
    return {prefix: json.dumps(raw, sort_keys=True)}


def differing(left: dict[str, Any], right: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, left, right) for every key whose value differs or that only one side has."""
    return [(key, left.get(key), right.get(key)) for key in sorted(set(left) | set(right))
            if left.get(key) != right.get(key)]
