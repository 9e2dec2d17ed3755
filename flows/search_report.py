"""The report's quantization search: its table (report.md and a Prefect table artifact) and the plot
of the judged metric (accuracy, eval loss or KL) against size on disk."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


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



SEARCH_COLUMNS = ("candidate", "size_mb", "accuracy", "eval_loss", "token_agreement", "kl_from_merged",
                  "decode_tokens_per_s", "build_seconds", "chosen", "why")


def search_table(search: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per candidate, as shown in report.md and the Prefect table artifact."""
    return [{"candidate": r["name"],
             "size_mb": round(r["size_bytes"] / 2**20, 1) if r.get("size_bytes") is not None else None,
             "accuracy": r.get("accuracy"), "eval_loss": r.get("eval_loss"),
             "token_agreement": r.get("token_agreement"), "kl_from_merged": r.get("kl_from_merged"),
             "decode_tokens_per_s": r.get("decode_tokens_per_s"),
             "build_seconds": r.get("build_seconds"), "chosen": "yes" if r.get("chosen") else "no",
             "why": r.get("reason", "")} for r in search["candidates"]]


def search_markdown(search: dict[str, Any]) -> list[str]:
    flag = "" if search["within_tolerance"] else " **(fails the tolerance)**"
    # what was measured (free text has no accuracy): never the word None
    measured = [f"{name} {search.get(key)}" for name, key in (("accuracy", "baseline_accuracy"),
                                                              ("eval loss", "baseline_eval_loss"))
                if search.get(key) is not None]
    lines = ["", "## Quantization search", "",
             f"Baseline: {', '.join([search['baseline'], *measured])}; tolerance by {tolerance_text(search)}. "
             f"Kept: **{search['chosen']}**{flag}.", "",
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


def tolerance_text(search: dict[str, Any]) -> str:
    metric = search.get("tolerance_metric", "accuracy")
    if metric == "accuracy":
        return f"accuracy, {search['tolerance_points']} points"
    return f"{metric}, {search.get('tolerance')} " + ("nats per token" if metric == "eval_loss" else "")


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

    metric = search.get("tolerance_metric", "accuracy")  # the y axis: what the search judged by
    column, scale = {"accuracy": ("accuracy", 100), "eval_loss": ("eval_loss", 1), "kl": ("kl_from_merged", 1)}[metric]
    rows = [r for r in search["candidates"] if r.get("loaded") and r.get(column) is not None]
    figure, axes = plt.subplots(figsize=(8, 5), dpi=100)
    baseline = search.get("baseline_accuracy" if metric == "accuracy" else "baseline_eval_loss")
    if metric == "kl":
        axes.axhspan(0, search["tolerance"], color="tab:green", alpha=0.1, label=f"tolerance ({search['tolerance']:g})")
    elif baseline is not None:
        tolerance = search["tolerance_points"] if metric == "accuracy" else -search["tolerance"]
        axes.axhline(baseline * scale, color="tab:green", linestyle="--", label="merged PyTorch")
        axes.axhspan(baseline * scale - tolerance, baseline * scale, color="tab:green", alpha=0.1,
                     label=f"tolerance ({abs(tolerance):g})")
    for row in rows:
        size_mb, value = row["size_bytes"] / 2**20, row[column] * scale
        axes.scatter([size_mb], [value], s=80 if row.get("chosen") else 30,
                     color="tab:red" if row.get("chosen") else "tab:blue", zorder=3)
        axes.annotate(row["name"], (size_mb, value), textcoords="offset points", xytext=(4, 4), fontsize=7)
    failed = [r["name"] for r in search["candidates"] if not r.get("loaded")]
    title = f"kept {search['chosen']}" + ("" if search["within_tolerance"] else " (fails the tolerance)")
    axes.set_title(title + (f"; failed: {', '.join(failed)}" if failed else ""), fontsize=9)
    axes.set_xlabel("size on disk (MB)")
    axes.set_ylabel("task accuracy on the eval split (%)" if metric == "accuracy" else f"{column} on the eval split")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path.name


def prefect_table(search: dict[str, Any], name: str) -> None:
    """Every candidate as a Prefect table artifact, when running inside a flow run."""
    from prefect.artifacts import create_table_artifact
    from prefect.context import FlowRunContext

    from flows.ui import artifact_key

    if FlowRunContext.get() is not None:  # per model name, like every Grove artifact: one history per model
        create_table_artifact(table=search_table(search), key=artifact_key(name, "quantization-search"),
                              description=f"Grove quantization search for {name}: {search['verdict']}")
