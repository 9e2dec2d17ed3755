"""The report's quality table: base, fine-tuned and shipped models side by side on any data.

eval loss and perplexity of all three on the same labelled positions (evaluate's PyTorch forward
pass; the shipped ONNX model teacher-forced through onnxruntime-genai, grove/teacher_forcing.py),
the shipped model's top-1 agreement and KL against the model it was built from, and task accuracy
where a label column measures it.
"""

from __future__ import annotations

from typing import Any

from flows.compare import MODELS, evaluation_table, number

SHIPPED = dict(MODELS)["onnx"]


def quality_rows(stages: list[dict[str, Any]], onnx: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per model: base, fine_tuned (when trained), shipped (the ONNX build, when built).
    loss_increase and the agreement columns compare with the model the shipped one was built from."""
    evaluate = next((s["summary"] for s in stages if s["stage"] == "evaluate"), None) or {}
    models = {name: m for name, m in evaluate.items() if name in ("base", "fine_tuned") and isinstance(m, dict)}
    if not models:
        return []
    source = models.get("fine_tuned") or models["base"]
    rows = [{"model": name, "eval_loss": m.get("eval_loss"), "perplexity": m.get("perplexity"),
             "loss_increase": None, "token_agreement": None, "kl_from_merged": None,
             "accuracy": m.get("accuracy")} for name, m in models.items()]
    if onnx and onnx.get("eval_loss") is not None:
        increase = onnx["eval_loss"] - source["eval_loss"] if source.get("eval_loss") is not None else None
        rows.append({"model": f"shipped ({onnx.get('candidate') or onnx.get('precision')})",
                     "eval_loss": onnx["eval_loss"], "perplexity": onnx.get("perplexity"),
                     "loss_increase": round(increase, 4) if increase is not None else None,
                     "token_agreement": onnx.get("token_agreement"), "kl_from_merged": onnx.get("kl_from_merged"),
                     "accuracy": onnx.get("accuracy")})
    return rows


def quality_markdown(metrics: dict[str, float], rows: list[dict[str, Any]]) -> list[str]:
    """report.md's one quality table: every number the stages scored per model (evaluate's and
    build_onnx's metrics), with the shipped row named by its candidate and its loss increase over
    the model it was built from."""
    columns, table = evaluation_table(metrics)
    if not table:
        return []
    shipped = next((row for row in rows if row["model"].startswith("shipped")), None)
    if shipped and shipped.get("loss_increase") is not None:
        at = columns.index("perplexity") + 1 if "perplexity" in columns else len(columns)
        columns.insert(at, "loss_increase")
        for cells in table:
            cells.insert(at + 1, number(shipped["loss_increase"]) if cells[0] == SHIPPED else "-")
    if shipped:
        for cells in table:
            if cells[0] == SHIPPED:
                cells[0] = shipped["model"]
    return ["", "## Quality on the eval split", "",
            "Eval loss and perplexity over the labelled tokens (the shipped model teacher-forced as served); "
            "the shipped model's loss increase, top-1 token agreement and KL(merged || shipped) against the "
            "model it was built from.", "", "| model | " + " | ".join(columns) + " |",
            "|---|" + "---|" * len(columns), *("| " + " | ".join(cells) + " |" for cells in table)]
