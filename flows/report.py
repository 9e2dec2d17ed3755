"""The end of a run: copy the final model to output_dir and write the report (JSON + Markdown)."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flows.compare import EVAL_WORDS, evaluation_markdown, run_metrics, shipped_name
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
        return (f"{shipped}{s.get('precision')} {s.get('execution_provider', 'cpu')} "
                f"{s.get('size_bytes', 0) / 2**20:.1f} MB{acc}")
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
        entry = store.by_digest(final.digest)
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
    if search:
        report["quantization_search"] = {**search, "plot": plot_once(search, out / "accuracy_vs_size.png")}
    report_json = out / "report.json"
    report_json.write_text(json.dumps(report, indent=1))
    markdown = render_markdown(report)
    (out / "report.md").write_text(markdown)
    _prefect_artifact(markdown, cfg.name)
    if search:
        _prefect_table(search, cfg.name)
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


def plot_once(search: dict[str, Any], path: Path) -> str | None:
    """write_plot, skipped when the plot of these very numbers is already there (matplotlib costs
    ~1 s to import and draw: most of a cached rerun's publish)."""
    digest = hashlib.sha256(json.dumps(search, sort_keys=True, default=str).encode()).hexdigest()
    stamp = path.with_name(f".{path.name}.sha256")
    try:
        if path.is_file() and stamp.read_text() == digest:
            return path.name
    except OSError:
        pass
    written = write_plot(search, path)
    if written:
        stamp.write_text(digest)
    return written


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
    lines += evaluation_markdown(report.get("metrics") or {})
    evaluate = next((s["summary"] for s in report["stages"] if s["stage"] == "evaluate"), {})
    onnx = report.get("onnx") or next((s["summary"] for s in report["stages"] if s["stage"] == "build_onnx"), {})
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


# ---- quantization search ------------------------------------------------------------------------
SEARCH_COLUMNS = ("candidate", "size_mb", "accuracy", "decode_tokens_per_s", "build_seconds", "chosen", "why")


def search_table(search: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per candidate, as shown in report.md and the Prefect table artifact."""
    return [{"candidate": r["name"],
             "size_mb": round(r["size_bytes"] / 2**20, 1) if r.get("size_bytes") is not None else None,
             "accuracy": r.get("accuracy"), "decode_tokens_per_s": r.get("decode_tokens_per_s"),
             "build_seconds": r.get("build_seconds"), "chosen": "yes" if r.get("chosen") else "no",
             "why": r.get("reason", "")} for r in search["candidates"]]


def search_markdown(search: dict[str, Any]) -> list[str]:
    flag = "" if search["within_tolerance"] else " **(fails the tolerance)**"
    lines = ["", "## Quantization search", "",
             f"Baseline: {search['baseline']}, accuracy {search['baseline_accuracy']}; tolerance "
             f"{search['tolerance_points']} points. Kept: **{search['chosen']}**{flag}.", "",
             search["verdict"] + ".", "",
             "| " + " | ".join(SEARCH_COLUMNS) + " |", "|---" * len(SEARCH_COLUMNS) + "|"]
    for row in search_table(search):
        cells = ["-" if row[c] is None else str(row[c]).replace("|", "/") for c in SEARCH_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    if search.get("not_built"):
        lines += ["", f"Not built (early stop at the first candidate within tolerance): "
                      f"{', '.join(search['not_built'])}."]
    if search.get("plot"):
        lines += ["", f"![accuracy against size]({search['plot']})"]
    else:
        lines += ["", "(no plot: matplotlib is not installed; pip install matplotlib==3.11.2)"]
    return lines


def write_plot(search: dict[str, Any], path: Path) -> str | None:
    """accuracy against size on disk, one point per candidate that loaded; returns the file name."""
    try:
        import matplotlib
    except ImportError:
        import logging

        logging.getLogger("grove.report").warning("matplotlib is not installed: no accuracy/size plot")
        return None
    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    rows = [r for r in search["candidates"] if r.get("loaded") and r.get("accuracy") is not None]
    figure, axes = plt.subplots(figsize=(8, 5), dpi=100)
    baseline = search.get("baseline_accuracy")
    if baseline is not None:
        axes.axhline(baseline * 100, color="tab:green", linestyle="--", label="merged PyTorch")
        axes.axhspan((baseline * 100) - search["tolerance_points"], baseline * 100, color="tab:green", alpha=0.1,
                     label=f"tolerance ({search['tolerance_points']:g} points)")
    for row in rows:
        size_mb, accuracy = row["size_bytes"] / 2**20, row["accuracy"] * 100
        axes.scatter([size_mb], [accuracy], s=80 if row.get("chosen") else 30,
                     color="tab:red" if row.get("chosen") else "tab:blue", zorder=3)
        axes.annotate(row["name"], (size_mb, accuracy), textcoords="offset points", xytext=(4, 4), fontsize=7)
    failed = [r["name"] for r in search["candidates"] if not r.get("loaded")]
    title = f"kept {search['chosen']}" + ("" if search["within_tolerance"] else " (fails the tolerance)")
    axes.set_title(title + (f"; failed: {', '.join(failed)}" if failed else ""), fontsize=9)
    axes.set_xlabel("size on disk (MB)")
    axes.set_ylabel("task accuracy on the eval split (%)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path.name


def _prefect_table(search: dict[str, Any], name: str) -> None:
    """Every candidate as a Prefect table artifact, when running inside a flow run."""
    from prefect.artifacts import create_table_artifact
    from prefect.context import FlowRunContext

    from flows.ui import artifact_key

    if FlowRunContext.get() is not None:  # per model name, like every Grove artifact: one history per model
        create_table_artifact(table=search_table(search), key=artifact_key(name, "quantization-search"),
                              description=f"Grove quantization search for {name}: {search['verdict']}")
