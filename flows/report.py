"""The end of a run: copy the final model to output_dir and write the report (JSON + Markdown)."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flows.compare import EVAL_WORDS, MODELS, run_metrics, shipped_name
from flows.quality import quality_markdown, quality_rows
from flows.search_report import plot_once, prefect_table, search_markdown
from grove.served import BASE_FILE, publish_served
from grove.settings import RunConfig
from grove.stage import ArtifactRef, StageRecord
from grove.store import ArtifactStore


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
        return ", ".join(f"{name} {model_words(m)}" for name, m in s.items() if isinstance(m, dict))
    if stage == "merge_adapters":
        return f"{s.get('size_bytes', 0) / 2**20:.0f} MB safetensors"
    if stage == "build_onnx":
        if s.get("loaded") is False:
            return f"{s.get('precision')} {s.get('algo', '')}: FAILED ({str(s.get('error'))[:120]})"
        acc = f", acc {s['accuracy']}" if s.get("accuracy") is not None else ""
        if (s.get("generation") or {}).get("chrf") is not None:
            acc = f", chrF {s['generation']['chrf']}, exact {s['generation']['exact_match']}"
        shipped = f"{s['candidate']}: " if s.get("candidate") else ""
        loss = f", loss {s['eval_loss']} (agreement {s.get('token_agreement')})" if s.get("eval_loss") is not None else ""
        return (f"{shipped}{s.get('precision')} {s.get('execution_provider', 'cpu')} "
                f"{s.get('size_bytes', 0) / 2**20:.1f} MB{acc}{loss}")
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


def model_words(scores: dict[str, Any]) -> str:
    """One model's evaluation in a few words: accuracy, loss, perplexity, and chrF of free-text answers."""
    words = [f"{word} {scores[key]}" for key, word in EVAL_WORDS if scores.get(key) is not None]
    if (scores.get("generation") or {}).get("chrf") is not None:
        words.append(f"chrF {scores['generation']['chrf']}")
    return " ".join(words)


def publish(cfg: RunConfig, refs: dict[str, ArtifactRef | None], records: list[StageRecord],
            store: ArtifactStore, promotion: dict[str, Any] | None = None, run_id: str | None = None) -> dict[str, Any]:
    """Copies the final model (ONNX if built, else the merged model) and writes report.json/.md."""
    summaries = {stage: ref.summary for stage, ref in refs.items() if ref is not None}
    out = Path(cfg.output_dir) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    final = refs.get("build_onnx") or refs.get("merge_adapters")
    model_path = None
    if final is not None:
        # by digest: exactly the model this run produced or used, whatever its key names now
        entry = store.by_digest(final.digest, final.stage, final.key)
        if entry is None:
            raise RuntimeError(f"the final model {final.stage}/{final.key} (manifest {final.digest[:12]}) is "
                               f"missing or damaged in {store.root}; rerun with --from-stage {final.stage}")
        source = store.materialize(entry)
        if (source / BASE_FILE).is_file():  # grove.ship: adapter: the base once, named adapters
            model_path = publish_served(store, source, out, cfg.name)
    if final is not None and model_path is None:
        model_path = out / "model"
        copy_model(source / "model" if (source / "model").is_dir() else source, model_path, final.digest)
    report = {
        "name": cfg.name,
        "run_id": run_id,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "artifact_root": cfg.artifact_root,
        "model_path": str(model_path) if model_path else None,
        "stages": [{"stage": r.stage, "status": r.status, "seconds": round(r.seconds, 2),
                    "key": r.ref.key if r.ref else None, "uri": r.ref.uri if r.ref else None,
                    **({"task_run": r.reason} if r.reason else {}),
                    "summary": r.ref.summary if r.ref else {}} for r in records],
        "promotion": promotion,
        "shipped": shipped_name(summaries),
        "metrics": run_metrics(summaries),
    }
    onnx = refs.get("build_onnx")
    search = (onnx.summary or {}).get("search") if onnx is not None else None
    if onnx is not None:
        report["onnx"] = {k: v for k, v in onnx.summary.items() if k != "search"}
    report["quality"] = quality_rows(report["stages"], report.get("onnx"))
    if search:
        report["quantization_search"] = {**search, "plot": plot_once(search, out / "accuracy_vs_size.png")}
    report_json = out / "report.json"
    report_json.write_text(json.dumps(report, indent=1))
    markdown = render_markdown(report)
    (out / "report.md").write_text(markdown)
    _prefect_artifact(markdown, cfg.name)
    if search:
        prefect_table(search, cfg.name)
    if promotion:
        log_promotion(promotion)
    return {"model_path": report["model_path"], "report_path": str(report_json), "stages": report["stages"],
            "promotion": promotion, "shipped": report["shipped"], "metrics": report["metrics"]}


# Written into the published model folder: which stored entry it is a copy of.
SOURCE_FILE = ".grove-source.json"


def copy_model(source: Path, target: Path, digest: str) -> None:
    """Copies a stored model to the output folder, whole or not at all; a folder that already holds
    this very entry (same digest, every file there at its size) is left as it is, so a cached
    rerun does not copy hundreds of MB again."""
    files = {str(p.relative_to(source)): p.stat().st_size for p in sorted(source.rglob("*"))
             if p.is_file() and p.name != ".complete"}
    try:
        marker = json.loads((target / SOURCE_FILE).read_text())
        if marker == {"digest": digest, "files": files} and all(
                (target / name).is_file() and (target / name).stat().st_size == size for name, size in files.items()):
            return
    except (OSError, ValueError):
        pass
    staging = target.with_name(f".{target.name}-staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns(".complete"))
    (staging / SOURCE_FILE).write_text(json.dumps({"digest": digest, "files": files}))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def render_markdown(report: dict[str, Any]) -> str:
    final = next((s for s in reversed(report["stages"]) if s["stage"] in ("build_onnx", "merge_adapters")), None)
    lines = [f"# Grove run: {report['name']}", "", f"Run `{report.get('run_id')}`, finished {report['finished']}.", "",
             f"- final model (stored): `{final['uri'] if final else None}`",
             f"- final model (copied to): `{report['model_path']}`",
             f"- shipped: **{report.get('shipped')}**",
             f"- artifact store: `{report['artifact_root']}`"]
    promotion = report.get("promotion")
    if promotion:
        from tasks.promote import verdict_words

        words, why = verdict_words(promotion)
        verdict = words if promotion["decision"] == "unchanged" else f"**{words}**"
        lines.append(f"- {promotion.get('model_name', report['name'])}: {verdict}: {why}")
    lines += ["", "## Stages", "",
             "| stage | status | seconds | result | stored at |", "|---|---|---|---|---|"]
    for stage in report["stages"]:
        name = stage.get("task_run") or stage["stage"]
        lines.append(f"| {name} | {stage['status']} | {stage['seconds']} | "
                     f"{key_result(stage['stage'], stage['summary'])} | `{stage['uri']}` |")
    lines += quality_markdown(report.get("metrics") or {}, report.get("quality") or [])
    evaluate = next((s["summary"] for s in report["stages"] if s["stage"] == "evaluate"), {})
    onnx = report.get("onnx") or next((s["summary"] for s in report["stages"] if s["stage"] == "build_onnx"), {})
    per_model = {dict(MODELS).get(name, name): m.get("per_label") for name, m in evaluate.items() if isinstance(m, dict)}
    if onnx.get("per_label"):
        per_model[dict(MODELS)["onnx"]] = onnx["per_label"]
    labels = sorted({label for table in per_model.values() if table for label in table})
    if labels:
        lines += ["", "## Accuracy per label", "", "| label | " + " | ".join(per_model) + " |",
                  "|---|" + "---|" * len(per_model)]
        for label in labels:
            cells = [f"{(table or {}).get(label, {}).get('accuracy', '-')}" for table in per_model.values()]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if report.get("quantization_search"):
        lines += search_markdown(report["quantization_search"])
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
    from tasks.promote import verdict_words

    words, why = verdict_words(promotion)
    (logger.warning if promotion["decision"] == "not_promoted" else logger.info)("%s: %s", words, why)


def _prefect_artifact(markdown: str, name: str) -> None:
    """Shows the report in the Prefect UI when running inside a flow run."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext

    from flows.ui import artifact_key

    if FlowRunContext.get() is not None:
        create_markdown_artifact(markdown=markdown, key=artifact_key(name, "report"),
                                 description=f"Grove report for {name}")
