"""Choosing one quantization candidate: pure functions over a table, no models, no I/O.

The rule (issue: int4 that keeps its accuracy): among the candidates whose model loads,
keep the smallest one within tolerance of the merged PyTorch model; equal sizes go to the
higher decode tokens/s. Within tolerance, by the search's tolerance metric:

- accuracy: task accuracy on the eval split at most `tolerance` accuracy points below;
- eval_loss: teacher-forced eval loss at most `tolerance` (nats per token) above;
- kl: mean KL(merged || candidate) over the labelled tokens at most `tolerance`.

The last two need no label column (grove/teacher_forcing.py). If none is within tolerance,
keep the best one by the metric (then smallest, then fastest) and say that it fails the
tolerance. A candidate that failed to build or load is never kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Accuracies are fractions rounded to 4 places, losses to 4, KL to 5: compare with a little slack.
EPS = 1e-9
# metric -> (the candidate summary's column, whether higher is better)
METRICS = {"accuracy": ("accuracy", True), "eval_loss": ("eval_loss", False), "kl": ("kl_from_merged", False)}


def candidate_row(name: str, summary: dict[str, Any], key: str = "") -> dict[str, Any]:
    """One table row from a build_onnx candidate's summary."""
    return {"name": name, "key": key, "loaded": bool(summary.get("loaded", summary.get("accuracy") is not None)),
            "accuracy": summary.get("accuracy"), "eval_loss": summary.get("eval_loss"),
            "perplexity": summary.get("perplexity"), "token_agreement": summary.get("token_agreement"),
            "kl_from_merged": summary.get("kl_from_merged"), "size_bytes": summary.get("size_bytes"),
            "decode_tokens_per_s": summary.get("decode_tokens_per_s"), "build_seconds": summary.get("build_seconds"),
            "precision": summary.get("precision"), "algo": summary.get("algo"),
            "block_size": summary.get("block_size"), "accuracy_level": summary.get("accuracy_level"),
            "mixed_precision": summary.get("mixed_precision"), "error": summary.get("error")}


def limit(baseline: float | None, tolerance: float, metric: str = "accuracy") -> float | None:
    """The worst value still within tolerance (None: no baseline to compare with)."""
    if metric == "kl":
        return tolerance
    if baseline is None:
        return None
    return baseline - tolerance / 100 if metric == "accuracy" else baseline + tolerance


def _value(row: dict[str, Any], metric: str) -> float | None:
    return row.get(METRICS[metric][0])


def within_tolerance(row: dict[str, Any], baseline: float | None, tolerance: float,
                     metric: str = "accuracy") -> bool:
    """Whether a candidate loaded and scored within tolerance (no baseline: any that loaded and scored)."""
    value = _value(row, metric)
    if not row.get("loaded") or value is None:
        return False
    bound = limit(baseline, tolerance, metric)
    if bound is None:
        return True
    return value >= bound - EPS if METRICS[metric][1] else value <= bound + EPS


@dataclass
class Selection:
    chosen: str | None  # the kept candidate's name (None: no candidate loaded)
    within_tolerance: bool  # whether the kept candidate meets the tolerance
    verdict: str  # one sentence for the report
    rows: list[dict[str, Any]]  # the input rows, each with `chosen`, `within_tolerance`, `reason`


def _mb(size: int | None) -> str:
    return f"{size / 2**20:.1f} MB" if size is not None else "? MB"


def _points(accuracy: float) -> str:
    return f"{accuracy * 100:.1f}"


def shown(value: float | None, metric: str) -> str:
    """A metric's value as the verdicts write it: accuracy in points, loss and KL as numbers."""
    if value is None:
        return "?"
    return _points(value) if metric == "accuracy" else f"{value:.4g}"


def tolerance_words(tolerance: float, metric: str) -> str:
    return {"accuracy": f"within {tolerance:g} points of the merged PyTorch model",
            "eval_loss": f"with an eval loss at most {tolerance:g} above the merged PyTorch model's",
            "kl": f"with a KL from the merged PyTorch model of at most {tolerance:g}"}[metric]


def select_candidate(rows: list[dict[str, Any]], baseline: float | None, tolerance: float,
                     metric: str = "accuracy") -> Selection:
    """Marks every row chosen or not, with the reason; see the module docstring for the rule.
    `baseline`: the merged PyTorch model's accuracy or eval loss (unused for kl); `tolerance` in
    the metric's unit (accuracy points, nats per token, KL)."""
    column, higher = METRICS[metric]
    rows = [dict(r) for r in rows]
    usable = [r for r in rows if r.get("loaded") and r.get(column) is not None]
    is_usable = {id(r) for r in usable}
    bound = limit(baseline, tolerance, metric)
    for row in rows:
        row["within_tolerance"] = id(row) in is_usable and within_tolerance(row, baseline, tolerance, metric)
    qualifying = [r for r in usable if r["within_tolerance"]]
    size = lambda r: r["size_bytes"] if r.get("size_bytes") is not None else float("inf")  # noqa: E731
    speed = lambda r: r.get("decode_tokens_per_s") or 0.0  # noqa: E731
    goodness = lambda r: r[column] if higher else -r[column]  # noqa: E731
    best = "most accurate" if metric == "accuracy" else f"lowest {column}"
    against = "" if metric == "kl" else f" ({shown(baseline, metric)})"
    if qualifying:
        chosen = min(qualifying, key=lambda r: (size(r), -speed(r), r["name"]))
        met = True
        verdict = (f"kept {chosen['name']}: the smallest candidate {tolerance_words(tolerance, metric)} "
                   f"({column} {shown(chosen[column], metric)}" +
                   ("" if metric == "kl" else f" vs {shown(baseline, metric)}") + ")" if bound is not None
                   else f"kept {chosen['name']}: the smallest candidate (no PyTorch {column} to compare with)")
    elif usable:
        chosen = max(usable, key=lambda r: (goodness(r), -size(r), speed(r)))
        met = False
        verdict = (f"NO candidate is {tolerance_words(tolerance, metric)}{against}; kept the {best} one, "
                   f"{chosen['name']} ({shown(chosen[column], metric)}), which FAILS the tolerance")
    else:
        for row in rows:
            row.update(chosen=False, reason=f"failed: {row.get('error') or f'no {column} measured'}")
        return Selection(None, False, "no candidate built a model that loads", rows)
    for row in rows:
        row["chosen"] = row is chosen
        if row is chosen:
            row["reason"] = "kept: " + ("smallest within tolerance" if met else f"{best}; fails the tolerance")
            if met and any(size(o) == size(row) and o is not row for o in qualifying):
                row["reason"] += ", fastest of equal size"
        elif id(row) not in is_usable:
            row["reason"] = f"failed: {row.get('error') or f'no {column} measured'}"
        elif not row["within_tolerance"]:
            worse = "<" if higher else ">"
            row["reason"] = (f"outside tolerance: {shown(row[column], metric)} {worse} {shown(bound, metric)}" if met
                             else f"{'less accurate' if higher else f'higher {column}'} than {chosen['name']}"
                             if goodness(row) < goodness(chosen) - EPS
                             else f"as good as {chosen['name']} but larger or slower")
        elif size(row) > size(chosen):
            row["reason"] = f"within tolerance but larger ({_mb(row.get('size_bytes'))} vs {_mb(chosen['size_bytes'])})"
        else:
            row["reason"] = (f"same size as {chosen['name']}, slower ({speed(row)} vs {speed(chosen)} tok/s)")
    return Selection(chosen["name"], met, verdict, rows)
