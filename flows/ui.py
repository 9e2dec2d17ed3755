"""What each stage shows in the Prefect UI: table and progress artifacts.

The flow hands a `PrefectArtifacts` to the stages as RunContext.publisher (grove/stage.py);
no stage imports this module, so it is in no stage's cache key: editing how a result is
shown never reruns a stage. A stage that runs publishes its artifacts from inside its task
run, so the UI lists them under that task; a cached stage publishes nothing new (the run's
report covers it).
Artifact keys are per model name (`grove-<name>-<what>`), so the UI's Artifacts page keeps
each table's history across nightly runs. Showing is never worth failing a stage for:
an API error here is logged and the stage goes on.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable

log = logging.getLogger("grove.ui")


def artifact_key(model_name: str, what: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", f"grove-{model_name}-{what}".lower())).strip("-")


def flow_run_name(model_name: str, run_id: str) -> str:
    return f"{model_name}-{run_id[:8]}"


def name_flow_run(model_name: str) -> None:
    """The flow run, named and tagged for the model it makes (`smollm2-tone-1a2b3c4d`, tags `grove`
    and `model:smollm2-tone`) instead of Prefect's random name: the model name is known only once
    the config is read, inside the run. Tags it already has (a deployment's) are kept."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if run_id is None:
        return
    tags = sorted({*(flow_run.tags or []), "grove", f"model:{model_name}"})

    def rename() -> None:
        from prefect.context import FlowRunContext

        name = flow_run_name(model_name, run_id)
        with get_client(sync_client=True) as client:
            client.update_flow_run(run_id, name=name, tags=tags)
        context = FlowRunContext.get()
        if context is not None and context.flow_run is not None:  # the run's own log lines say it too
            context.flow_run.name, context.flow_run.tags = name, tags

    _safely("flow-run name", rename)


def _in_task_or_flow() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def _safely(what: str, publish: Callable[[], Any]) -> Any:
    if not _in_task_or_flow():
        return None
    try:
        return publish()
    except Exception as exc:  # noqa: BLE001 - the UI is a view; the stage's work stands
        log.warning("could not publish the %s artifact: %s", what, exc)
        return None


def _table(model_name: str, what: str, rows: list[dict[str, Any]], description: str) -> None:
    from prefect.artifacts import create_table_artifact

    _safely(what, lambda: create_table_artifact(table=rows, key=artifact_key(model_name, what),
                                                description=description))


# ---- per stage ------------------------------------------------------------------------------------
def data_counts(model_name: str, summary: dict[str, Any]) -> None:
    train, held_out = summary.get("train_labels") or {}, summary.get("eval_labels") or {}
    rows = [{"label": label, "train": train.get(label, 0), "eval": held_out.get(label, 0)}
            for label in sorted(set(train) | set(held_out))]
    rows.append({"label": "(all)", "train": summary.get("train_rows"), "eval": summary.get("eval_rows")})
    _table(model_name, "data", rows, f"Rows per label after removing {summary.get('duplicates_removed', 0)} "
                                     f"exact duplicates ({summary.get('rows')} rows read)")


def accuracy(model_name: str, what: str, results: dict[str, dict[str, Any]], description: str) -> None:
    """results: model name (base, fine_tuned, onnx) -> its scores with per_label counts."""
    labels = sorted({label for scores in results.values() for label in (scores.get("per_label") or {})})
    rows = [{"label": "(all)", **{name: scores.get("accuracy") for name, scores in results.items()}}]
    rows += [{"label": label, **{name: (scores.get("per_label") or {}).get(label, {}).get("accuracy")
                                 for name, scores in results.items()}} for label in labels]
    _table(model_name, what, rows, description)


def generation(model_name: str, what: str, results: dict[str, dict[str, Any]]) -> None:
    """grove.evaluate.answer: text: exact match and chrF per model, instead of accuracy per label."""
    rows = [{"model": name, **{k: scores["generation"].get(k) for k in ("rows", "exact_match", "chrf")}}
            for name, scores in results.items() if scores.get("generation")]
    _table(model_name, what, rows, "Free-text answers, greedy as served: exact match (fraction) and chrF (0-100)")


def evaluation(model_name: str, summary: dict[str, Any]) -> None:
    results = {name: scores for name, scores in summary.items() if isinstance(scores, dict)}
    if any(scores.get("generation") for scores in results.values()):
        return generation(model_name, "evaluate", results)
    accuracy(model_name, "evaluate", results, "Task accuracy (greedy exact match) on the eval split: "
             + ", ".join(f"{name} eval loss {scores.get('eval_loss')}" for name, scores in results.items()))


def onnx_accuracy(model_name: str, summary: dict[str, Any]) -> None:
    if summary.get("generation"):
        return generation(model_name, "onnx-generation", {"onnx": summary})
    if summary.get("accuracy") is None:
        return
    accuracy(model_name, "onnx-accuracy", {"onnx": summary},
             f"Task accuracy of the {summary.get('precision')} ONNX model on the eval split "
             f"({summary.get('execution_provider')}, {summary.get('size_bytes', 0) / 2**20:.1f} MB)")


def benchmark_table(model_name: str, summary: dict[str, Any]) -> None:
    columns = ("device", "latency_ms", "time_to_first_token_ms", "decode_tokens_per_s", "peak_rss_mb", "size_mb")
    rows = [{"engine": name, **{c: metrics.get(c) for c in columns}}
            for name, metrics in summary.items() if isinstance(metrics, dict)]
    _table(model_name, "benchmark", rows, f"Same prompts on each engine (medians); ONNX speed-up "
                                          f"{summary.get('onnx_speedup')}x")


def loss_table(model_name: str, history: list[dict[str, Any]]) -> None:
    rows = [{"step": h.get("step"), "loss": h.get("loss"), "learning_rate": h.get("learning_rate"),
             "grad_norm": h.get("grad_norm")} for h in history if "loss" in h]
    _table(model_name, "train-loss", rows, "Training loss per logged step")


STAGE_TABLES: dict[str, Callable[[str, dict[str, Any]], None]] = {
    "load_data": data_counts, "evaluate": evaluation, "build_onnx": onnx_accuracy, "benchmark": benchmark_table}


def publish_stage(stage: str, model_name: str, summary: dict[str, Any]) -> None:
    publisher = STAGE_TABLES.get(stage)
    if publisher is not None:
        _safely(stage, lambda: publisher(model_name, summary))


class TrainingProgress:
    """A progress artifact that follows training, updated at most every `every` percent."""

    def __init__(self, model_name: str, every: float = 2.0):
        from prefect.artifacts import create_progress_artifact

        self.every, self.shown = every, -every
        self.artifact_id = _safely("training progress", lambda: create_progress_artifact(
            progress=0.0, key=artifact_key(model_name, "train-progress"), description="Training steps done (%)"))

    def update(self, step: int, total: int) -> None:
        from prefect.artifacts import update_progress_artifact

        percent = 100.0 * step / total if total else 100.0
        if self.artifact_id is None or (percent - self.shown < self.every and percent < 100.0):
            return
        self.shown = percent
        _safely("training progress", lambda: update_progress_artifact(self.artifact_id, progress=percent))


class PrefectArtifacts:
    """RunContext.publisher (grove.stage.Publisher) for one run: the artifacts above."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.progress: TrainingProgress | None = None

    def stage_summary(self, stage: str, summary: dict[str, Any]) -> None:
        publish_stage(stage, self.model_name, summary)

    def training_started(self) -> None:
        self.progress = TrainingProgress(self.model_name)

    def training_step(self, step: int, total: int) -> None:
        if self.progress is not None:
            self.progress.update(step, total)

    def training_ended(self, log_history: list[dict[str, Any]]) -> None:
        loss_table(self.model_name, log_history)
