"""The quantization search on the bundled SmolLM2 fine-tuned on the bundled tone data.

    python bench/int4_search.py [--store /tmp/grove-int4-search] [--out bench/results/int4_search.json]

Runs configs/smollm2-tone.json with `grove.quantization_search` (Grove's built-in candidate
list, or --candidates FILE with a JSON list of candidates) as one Grove run, then builds the
fp32 ONNX model of the same merged model as the size reference. Prints one JSON object:
per candidate accuracy, size, decode tokens/s, build seconds and verdict; the kept model
against the targets (issue: int4 that keeps its accuracy):

- accuracy within 2 points of the merged PyTorch model (evaluate: fine_tuned, same eval split);
- size on disk at most 40% of the fp32 ONNX model's;
- decode tokens/s at least 3x the merged PyTorch model's (benchmark stage, same prompts).

The artifact store (--store) is reused across runs: training and every candidate already
built are cache hits, so a rerun after a change costs only what changed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def fp32_onnx_bytes(store_root: str, merged_key: str) -> int:
    """Size of the fp32 ONNX build of the merged model: the reference the size target is relative to."""
    from tasks.build_onnx.builder import run_builder
    from grove.settings import BuildSettings
    from grove.store import ArtifactStore, folder_bytes

    store = ArtifactStore(store_root)
    source = store.materialize(store.lookup("merge_adapters", merged_key))
    with tempfile.TemporaryDirectory(prefix="grove-fp32-onnx-") as target:
        run_builder(source, Path(target) / "model", BuildSettings(precision="fp32"), trust_remote_code=False)
        return folder_bytes(Path(target) / "model")


def search_config(config: str, store: str, search: dict, name: str) -> Path:
    """`config` as a bench run of it: its store and output under `store`, its data files found from
    the project root, `grove.quantization_search` set to `search`; written as `store/name`."""
    raw = json.loads(Path(config).read_text())
    raw.setdefault("grove", {})["artifact_root"] = store
    raw.setdefault("engine", {})["output_dir"] = str(Path(store) / "output")
    for data in raw.get("data_configs", []):
        params = data["load_dataset_config"]["params"]
        params["data_files"] = str((ROOT / params["data_files"]).resolve())
    raw["grove"]["quantization_search"] = search
    Path(store).mkdir(parents=True, exist_ok=True)
    written = Path(store) / name
    written.write_text(json.dumps(raw, indent=1))
    return written


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2-tone.json"))
    parser.add_argument("--store", default="/tmp/grove-int4-search", help="artifact root, reused across runs")
    parser.add_argument("--candidates", help="JSON file with a list of candidates (default: Grove's built-in list)")
    parser.add_argument("--tolerance", type=float, default=2.0, help="accuracy points")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    candidates = json.loads(Path(args.candidates).read_text()) if args.candidates else "builtin"
    config = search_config(args.config, args.store, {"candidates": candidates, "tolerance_points": args.tolerance},
                           "int4-search-config.json")

    from flows.optimize import optimize

    started = time.monotonic()
    result = optimize(str(config))
    run_s = time.monotonic() - started
    report = json.loads(Path(result["report_path"]).read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    search = report["quantization_search"]
    bench = stages["benchmark"]["summary"]
    torch_tps = bench["pytorch"]["decode_tokens_per_s"]
    onnx_tps = bench["onnx"]["decode_tokens_per_s"]
    started = time.monotonic()
    fp32_bytes = fp32_onnx_bytes(args.store, stages["merge_adapters"]["key"])
    fp32_s = time.monotonic() - started
    chosen = next(r for r in search["candidates"] if r["chosen"])
    baseline = search["baseline_accuracy"]
    table = [{"name": r["name"], "accuracy": r["accuracy"], "size_mb": round(r["size_bytes"] / 2**20, 1)
              if r.get("size_bytes") else None,
              "size_vs_fp32_onnx": round(r["size_bytes"] / fp32_bytes, 3) if r.get("size_bytes") else None,
              "decode_tokens_per_s": r["decode_tokens_per_s"], "build_seconds": r["build_seconds"],
              "loaded": r["loaded"], "within_tolerance": r["within_tolerance"], "chosen": r["chosen"],
              "why": r["reason"]} for r in search["candidates"]]
    targets = {
        "accuracy_within_points": {"target": args.tolerance,
                                   "reached": round((baseline - chosen["accuracy"]) * 100, 2),
                                   "met": search["within_tolerance"]},
        "size_vs_fp32_onnx": {"target": 0.40, "reached": round(chosen["size_bytes"] / fp32_bytes, 3),
                              "met": chosen["size_bytes"] <= 0.40 * fp32_bytes},
        "decode_speedup_vs_merged_pytorch": {"target": 3.0, "reached": round(onnx_tps / torch_tps, 2),
                                             "met": onnx_tps >= 3 * torch_tps},
    }
    output = {
        "command": "python bench/int4_search.py" + (f" --candidates {args.candidates}" if args.candidates else "")
                   + (f" --tolerance {args.tolerance:g}" if args.tolerance != 2.0 else ""),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "run_s": round(run_s, 1),
        "stage_status": {s["stage"] if not s.get("task_run") else s["task_run"]: s["status"]
                         for s in report["stages"]},
        "eval_rows": stages["evaluate"]["summary"].get("fine_tuned", {}).get("per_label") and sum(
            v["total"] for v in stages["evaluate"]["summary"]["fine_tuned"]["per_label"].values()),
        "merged_pytorch": {"accuracy": baseline, "decode_tokens_per_s": torch_tps},
        "fp32_onnx": {"size_mb": round(fp32_bytes / 2**20, 1), "build_s": round(fp32_s, 1)},
        "chosen": {"name": chosen["name"], "accuracy": chosen["accuracy"],
                   "size_mb": round(chosen["size_bytes"] / 2**20, 1), "decode_tokens_per_s_benchmark": onnx_tps,
                   "decode_tokens_per_s_search": chosen["decode_tokens_per_s"]},
        "verdict": search["verdict"],
        "targets": targets,
        "all_targets_met": all(t["met"] for t in targets.values()),
        "candidates": table,
        "report": result["report_path"],
    }
    text = json.dumps(output, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
