"""Choosing one quantization candidate: pure functions over a table, no models, no I/O.

The rule (issue: int4 that keeps its accuracy): among the candidates whose model loads,
keep the smallest one whose task accuracy on the eval split is within `tolerance_points`
accuracy points of the merged PyTorch model; equal sizes go to the higher decode tokens/s.
If none is within tolerance, keep the most accurate one (then smallest, then fastest) and
say that it fails the tolerance. A candidate that failed to build or load is never kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Accuracies are fractions rounded to 4 places; compare with a little slack.
EPS = 1e-9


def candidate_row(name: str, summary: dict[str, Any], key: str = "") -> dict[str, Any]:
    """One table row from a build_onnx candidate's summary."""
    return {"name": name, "key": key, "loaded": bool(summary.get("loaded", summary.get("accuracy") is not None)),
            "accuracy": summary.get("accuracy"), "size_bytes": summary.get("size_bytes"),
            "decode_tokens_per_s": summary.get("decode_tokens_per_s"), "build_seconds": summary.get("build_seconds"),
            "precision": summary.get("precision"), "algo": summary.get("algo"),
            "block_size": summary.get("block_size"), "accuracy_level": summary.get("accuracy_level"),
            "mixed_precision": summary.get("mixed_precision"), "error": summary.get("error")}


def within_tolerance(row: dict[str, Any], baseline: float | None, tolerance_points: float) -> bool:
    """Whether a candidate loaded and scored within tolerance (no baseline: any that loaded)."""
    if not row.get("loaded") or row.get("accuracy") is None:
        return False
    return baseline is None or row["accuracy"] >= baseline - tolerance_points / 100 - EPS


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


def select_candidate(rows: list[dict[str, Any]], baseline: float | None, tolerance_points: float) -> Selection:
    """Marks every row chosen or not, with the reason; see the module docstring for the rule."""
    rows = [dict(r) for r in rows]
    usable = [r for r in rows if r.get("loaded") and r.get("accuracy") is not None]
    is_usable = {id(r) for r in usable}
    floor = None if baseline is None else baseline - tolerance_points / 100
    for row in rows:
        row["within_tolerance"] = id(row) in is_usable and within_tolerance(row, baseline, tolerance_points)
    qualifying = [r for r in usable if r["within_tolerance"]]
    size = lambda r: r["size_bytes"] if r.get("size_bytes") is not None else float("inf")  # noqa: E731
    speed = lambda r: r.get("decode_tokens_per_s") or 0.0  # noqa: E731
    if qualifying:
        chosen = min(qualifying, key=lambda r: (size(r), -speed(r), r["name"]))
        met = True
        verdict = (f"kept {chosen['name']}: the smallest candidate within {tolerance_points:g} points of the merged "
                   f"PyTorch model ({_points(chosen['accuracy'])} vs {_points(baseline)})" if baseline is not None
                   else f"kept {chosen['name']}: the smallest candidate (no PyTorch accuracy to compare with)")
    elif usable:
        chosen = max(usable, key=lambda r: (r["accuracy"], -size(r), speed(r)))
        met = False
        verdict = (f"NO candidate is within {tolerance_points:g} points of the merged PyTorch model "
                   f"({_points(baseline)}); kept the most accurate one, {chosen['name']} "
                   f"({_points(chosen['accuracy'])}), which FAILS the tolerance")
    else:
        for row in rows:
            row.update(chosen=False, reason=f"failed: {row.get('error') or 'no accuracy measured'}")
        return Selection(None, False, "no candidate built a model that loads", rows)
    for row in rows:
        row["chosen"] = row is chosen
        if row is chosen:
            row["reason"] = "kept: " + ("smallest within tolerance" if met else "most accurate; fails the tolerance")
            if met and any(size(o) == size(row) and o is not row for o in qualifying):
                row["reason"] += ", fastest of equal size"
        elif id(row) not in is_usable:
            row["reason"] = f"failed: {row.get('error') or 'no accuracy measured'}"
        elif not row["within_tolerance"]:
            row["reason"] = (f"outside tolerance: {_points(row['accuracy'])} < {_points(floor)}" if met else
                             f"less accurate than {chosen['name']}" if row["accuracy"] < chosen["accuracy"] - EPS
                             else f"as accurate as {chosen['name']} but larger or slower")
        elif size(row) > size(chosen):
            row["reason"] = f"within tolerance but larger ({_mb(row.get('size_bytes'))} vs {_mb(chosen['size_bytes'])})"
        else:
            row["reason"] = (f"same size as {chosen['name']}, slower ({speed(row)} vs {speed(chosen)} tok/s)")
    return Selection(chosen["name"], met, verdict, rows)
