"""The end of a run: copy the final model to output_dir and write the report (JSON + Markdown)."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tasks.settings import RunConfig
from tasks.stage import ArtifactRef, StageRecord
from tasks.store import ArtifactStore


def key_result(stage: str, summary: dict[str, Any]) -> str:
    """One line per stage for the summary table."""
    s = summary or {}
    if stage == "load_data":
        return f"{s.get('train_rows')} train / {s.get('eval_rows')} eval rows, {s.get('duplicates_removed')} duplicates removed"
    if stage == "template_corpus":
        return f"{s.get('train_examples')} training examples, {s.get('train_tokens')} tokens"
    if stage == "train":
        first, final = s.get("first_loss"), s.get("final_loss")
        loss = f"loss {first:.3f} -> {final:.3f}" if first is not None and final is not None else ""
        resumed = f" (resumed at step {s['resumed_from_step']})" if s.get("resumed_from_step") else ""
        return f"{s.get('method')} {s.get('steps')} steps on {s.get('device')}{resumed}, {loss}"
    if stage == "evaluate":
        parts = [f"{name} acc {m.get('accuracy')}" for name, m in s.items() if isinstance(m, dict)
                 and m.get("accuracy") is not None]
        loss = [f"{name} loss {m.get('eval_loss')}" for name, m in s.items() if isinstance(m, dict)]
        return ", ".join(parts or loss)
    if stage == "merge_adapters":
        return f"{s.get('size_bytes', 0) / 2**20:.0f} MB safetensors"
    if stage == "build_onnx":
        acc = f", acc {s['accuracy']}" if s.get("accuracy") is not None else ""
        return f"{s.get('precision')} {s.get('execution_provider', 'cpu')} {s.get('size_bytes', 0) / 2**20:.0f} MB{acc}"
    if stage == "benchmark":
        torch_run, onnx_run = s.get("pytorch") or {}, s.get("onnx") or {}
        torch_tps, onnx_tps = torch_run.get("decode_tokens_per_s"), onnx_run.get("decode_tokens_per_s")
        torch_on = f" on {torch_run['device']}" if torch_run.get("device") else ""
        onnx_on = f" on {onnx_run['device']}" if onnx_run.get("device") else ""
        if onnx_tps:
            return (f"decode {onnx_tps} tok/s ONNX{onnx_on} vs {torch_tps} PyTorch{torch_on} "
                    f"({s.get('onnx_speedup')}x)")
        return f"decode {torch_tps} tok/s PyTorch{torch_on}"
    return ""


def publish(cfg: RunConfig, refs: dict[str, ArtifactRef | None], records: list[StageRecord],
            store: ArtifactStore, promotion: dict[str, Any] | None = None, run_id: str | None = None) -> dict[str, Any]:
    """Copies the final model (ONNX if built, else the merged model) and writes report.json/.md."""
    out = Path(cfg.output_dir) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    final = refs.get("build_onnx") or refs.get("merge_adapters")
    model_path = None
    if final is not None:
        entry = store.lookup(final.stage, final.key)
        source = store.materialize(entry)
        source = source / "model" if (source / "model").is_dir() else source
        model_path = out / "model"
        staging = out / ".model-staging"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns(".complete"))
        shutil.rmtree(model_path, ignore_errors=True)
        staging.rename(model_path)
    report = {
        "name": cfg.name,
        "run_id": run_id,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "artifact_root": cfg.artifact_root,
        "model_path": str(model_path) if model_path else None,
        "stages": [{"stage": r.stage, "status": r.status, "seconds": round(r.seconds, 2),
                    "key": r.ref.key if r.ref else None, "uri": r.ref.uri if r.ref else None,
                    "summary": r.ref.summary if r.ref else {}} for r in records],
        "promotion": promotion,
    }
    report_json = out / "report.json"
    report_json.write_text(json.dumps(report, indent=1))
    markdown = render_markdown(report)
    (out / "report.md").write_text(markdown)
    _prefect_artifact(markdown, cfg.name)
    if promotion:
        log_promotion(promotion)
    return {"model_path": report["model_path"], "report_path": str(report_json), "stages": report["stages"],
            "promotion": promotion}


def render_markdown(report: dict[str, Any]) -> str:
    final = next((s for s in reversed(report["stages"]) if s["stage"] in ("build_onnx", "merge_adapters")), None)
    lines = [f"# Grove run: {report['name']}", "", f"Run `{report.get('run_id')}`, finished {report['finished']}.", "",
             f"- final model (stored): `{final['uri'] if final else None}`",
             f"- final model (copied to): `{report['model_path']}`",
             f"- artifact store: `{report['artifact_root']}`"]
    promotion = report.get("promotion")
    if promotion:
        verdict = {"promoted": "**promoted**", "unchanged": "current model unchanged",
                   "not_promoted": "**not promoted**"}[promotion["decision"]]
        lines.append(f"- {promotion.get('model_name', report['name'])}: {verdict}: {promotion['reason']}")
    lines += ["", "## Stages", "",
             "| stage | status | seconds | result | stored at |", "|---|---|---|---|---|"]
    for stage in report["stages"]:
        lines.append(f"| {stage['stage']} | {stage['status']} | {stage['seconds']} | "
                     f"{key_result(stage['stage'], stage['summary'])} | `{stage['uri']}` |")
    evaluate = next((s["summary"] for s in report["stages"] if s["stage"] == "evaluate"), {})
    onnx = next((s["summary"] for s in report["stages"] if s["stage"] == "build_onnx"), {})
    per_model = {name: m.get("per_label") for name, m in evaluate.items() if isinstance(m, dict)}
    if onnx.get("per_label"):
        per_model["onnx"] = onnx["per_label"]
    labels = sorted({label for table in per_model.values() if table for label in table})
    if labels:
        lines += ["", "## Accuracy per label", "", "| label | " + " | ".join(per_model) + " |",
                  "|---|" + "---|" * len(per_model)]
        for label in labels:
            cells = [f"{(table or {}).get(label, {}).get('accuracy', '-')}" for table in per_model.values()]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    bench = next((s["summary"] for s in report["stages"] if s["stage"] == "benchmark"), {})
    engines = {name: m for name, m in bench.items() if isinstance(m, dict)}
    if engines:
        columns = ("device", "latency_ms", "time_to_first_token_ms", "decode_tokens_per_s", "peak_rss_mb", "size_mb")
        lines += ["", "## Benchmark (medians)", "", "| engine | " + " | ".join(columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for name, metrics in engines.items():
            lines.append(f"| {name} | " + " | ".join(str(metrics.get(c, "-")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def log_promotion(promotion: dict[str, Any]) -> None:
    """In the flow run's log (the UI shows it), or Grove's own log outside a run."""
    import logging

    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        logger = get_run_logger()
    except MissingContextError:
        logger = logging.getLogger("grove.promote")
    if promotion["decision"] == "not_promoted":
        logger.warning("not promoted: %s", promotion["reason"])
    else:
        logger.info("%s: %s", promotion["decision"].replace("_", " "), promotion["reason"])


def _prefect_artifact(markdown: str, name: str) -> None:
    """Shows the report in the Prefect UI when running inside a flow run."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext

    from tasks.ui import artifact_key

    if FlowRunContext.get() is not None:
        create_markdown_artifact(markdown=markdown, key=artifact_key(name, "report"),
                                 description=f"Grove report for {name}")
