"""The label-free tolerances' defaults, measured: which teacher-forced eval-loss increase (and KL)
corresponds to the 2-point accuracy rule on the bundled data.

    python bench/quality_calibration.py [--store /tmp/grove-quality-calibration] \
        [--candidates bench/quality_candidates.json] [--out bench/results/quality_calibration.json]

Runs configs/smollm2-tone.json (the bundled SmolLM2-135M fine-tuned on the bundled tone data)
with the candidates of bench/quality_candidates.json (the CPU ladder's rungs and the builtin
list's fast-building variants, plus rtn variants that land on both sides of the 2-point rule;
"builtin" for Grove's list) and no early stop, so each candidate is built and scored both ways: task accuracy on the eval split, and teacher-
forced eval loss, token agreement and KL against the merged PyTorch model (grove/teacher_forcing.py).
Then, per label-free metric, the bound that agrees best with the accuracy rule (within 2 points of
the merged model) over the candidates: the midpoint of the widest gap between candidates that
leaves the fewest disagreements. grove/settings.py's MAX_LOSS_INCREASE and MAX_KL come from it.
The artifact store is reused: a rerun takes training and every candidate from the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from int4_search import search_config  # noqa: E402 - a sibling script (bench/ is the script's folder on sys.path)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def best_bound(points: list[tuple[float, bool]]) -> dict:
    """The bound b ("within" when value <= b) that disagrees with the accuracy rule on the fewest
    candidates; among equals, the midpoint of the widest gap between neighbouring values."""
    values = sorted({v for v, _ in points})
    cuts = [values[0] / 2] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [values[-1] * 1.5]
    gaps = [values[0]] + [b - a for a, b in zip(values, values[1:])] + [values[-1]]

    def errors(bound: float) -> int:
        return sum((v <= bound) != within for v, within in points)

    bound, gap = min(zip(cuts, gaps), key=lambda c: (errors(c[0]), -c[1]))
    return {"bound": round(bound, 4), "disagreements": errors(bound), "candidates": len(points),
            "gap": round(gap, 4)}


def from_store(store_root: str, config: Path) -> tuple[dict, list[tuple[str, dict]], dict]:
    """evaluate's summary and (name, summary) of each candidate whose build_onnx entry is stored,
    matched to the config's candidates by their build settings."""
    from flows.config import load_config
    from grove.store import ArtifactStore

    cfg = load_config(str(config))
    names = {json.dumps(c.build.model_dump(mode="json"), sort_keys=True): c.name for c in cfg.search.candidates}
    store = ArtifactStore(store_root)
    [evaluate] = store.entries("evaluate")
    found = {}
    for entry in store.entries("build_onnx"):
        name = names.get(json.dumps(entry.manifest["meta"]["settings"]["build"], sort_keys=True))
        if name:
            found[name] = entry.manifest["meta"]["summary"]
    order = [c.name for c in cfg.search.candidates]
    return (evaluate.manifest["meta"]["summary"], sorted(found.items(), key=lambda kv: order.index(kv[0])),
            {name: None for name in found})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2-tone.json"))
    parser.add_argument("--store", default="/tmp/grove-quality-calibration", help="artifact root, reused")
    parser.add_argument("--candidates", default=str(ROOT / "bench" / "quality_candidates.json"),
                        help="JSON list of candidates, or 'builtin'")
    parser.add_argument("--tolerance", type=float, default=2.0, help="the accuracy rule, in points")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--from-store", action="store_true",
                        help="no run: read evaluate and every candidate built so far from --store")
    args = parser.parse_args()

    candidates = args.candidates if args.candidates == "builtin" else json.loads(Path(args.candidates).read_text())
    config = search_config(args.config, args.store, {"candidates": candidates, "tolerance_metric": "accuracy",
                                                     "tolerance_points": args.tolerance, "early_stop": False},
                           "calibration-config.json")

    started = time.monotonic()
    if args.from_store:  # what the store holds already (a run cut short): the candidates built so far
        scores, candidates, seconds = from_store(args.store, config)
    else:
        from flows.optimize import optimize

        result = optimize(str(config))
        report = json.loads(Path(result["report_path"]).read_text())
        stages = {s.get("task_run") or s["stage"]: s for s in report["stages"]}
        scores = stages["evaluate"]["summary"]
        candidates = [(row["name"], {**row, "teacher_forced_seconds": (stages.get(f"build_onnx[{row['name']}]") or {})
                                     .get("summary", {}).get("teacher_forced_seconds")})
                      for row in report["quantization_search"]["candidates"]]
        seconds = {name: s["seconds"] for name, s in stages.items() if name.startswith("build_onnx")}
    tuned = scores["fine_tuned"]
    rows = []
    for name, row in candidates:
        if not row.get("loaded") or row.get("accuracy") is None or row.get("eval_loss") is None:
            continue
        drop = round((tuned["accuracy"] - row["accuracy"]) * 100, 2)
        rows.append({"name": name, "accuracy": row["accuracy"], "accuracy_drop_points": drop,
                     "within_accuracy_rule": drop <= args.tolerance + 1e-6, "eval_loss": row["eval_loss"],
                     "eval_loss_increase": round(row["eval_loss"] - tuned["eval_loss"], 4),
                     "perplexity": row.get("perplexity"), "token_agreement": row.get("token_agreement"),
                     "kl_from_merged": row.get("kl_from_merged"), "size_bytes": row.get("size_bytes"),
                     "teacher_forced_seconds": row.get("teacher_forced_seconds")})
    out = {
        "command": "python bench/quality_calibration.py --out bench/results/quality_calibration.json",
        "candidates_file": args.candidates,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "run_s": round(time.monotonic() - started, 1),
        "eval_rows": sum(v["total"] for v in (tuned.get("per_label") or {}).values()),
        "base": {k: scores["base"].get(k) for k in ("accuracy", "eval_loss", "perplexity")},
        "merged": {k: tuned.get(k) for k in ("accuracy", "eval_loss", "perplexity")},
        "accuracy_rule_points": args.tolerance,
        "candidates": sorted(rows, key=lambda r: r["eval_loss_increase"]),
        "eval_loss_increase_bound": best_bound([(r["eval_loss_increase"], r["within_accuracy_rule"]) for r in rows]),
        "kl_bound": best_bound([(r["kl_from_merged"], r["within_accuracy_rule"]) for r in rows]),
        "build_stage_seconds": seconds,
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
