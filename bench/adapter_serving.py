"""Shipping an adapter vs a merged model, on the bundled SmolLM2 and tone data (issue 15).

    python bench/adapter_serving.py [--config configs/smollm2-tone.json] [--out bench/results/adapter_serving.json]

Runs the config twice through `grove run` into one fresh store, both on one int4 build (the
default ladder's first rung, written out): grove.ship: merged, then
grove.ship: adapter (train and evaluate are cache hits the second time, so both ship the same
fine-tune). Reports accuracy of merged PyTorch (evaluate: fine_tuned), merged int4 and base +
adapter (build_onnx), then decode tokens/s of merged int4, the base with no adapter and the base
with the adapter active, measured interleaved in fresh processes (tasks.benchmark.worker), and
the sizes. The load average is recorded: on a shared machine timings above 1 per core are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


SAME_BUILD = {"precision": "int4", "int4_is_symmetric": False, "int4_block_size": 16,
              "extra_options": {"algo_config": "rtn", "matmul_mixed_precision": "last_matmul:int8,mixed_layers:int8"}}


def run(config: dict, folder: Path, ship: str) -> dict:
    config = json.loads(json.dumps(config))
    config.setdefault("grove", {})["ship"] = ship
    config.setdefault("engine", {}).update(cache_dir=str(folder / "store"), output_dir=str(folder / ship))
    path = folder / f"{ship}.json"
    path.write_text(json.dumps(config))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"grove run ({ship}) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    name = next(iter((folder / ship).iterdir()))
    report = json.loads((name / "report.json").read_text())
    return {"seconds": round(time.monotonic() - started, 1), "out": name,
            "stages": {s["stage"]: s for s in report["stages"]}}


def folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2-tone.json"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "adapter_serving.json"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from grove.settings import BenchmarkSettings
    from tasks.benchmark.stage import measure_engine

    config = json.loads(Path(args.config).read_text())
    # both runs on the same int4 build (the default ladder's first rung, the base grove.ship: adapter
    # builds for a plain int4 pass), written out so the merged run builds exactly that, no search
    config["passes"]["builder"]["config"] = SAME_BUILD
    load_before = os.getloadavg()[0]
    from flows import server

    had_server = server.running() is not None
    with tempfile.TemporaryDirectory(prefix="grove-adapter-bench-") as tmp:
        folder = Path(tmp)
        try:
            merged, adapter = run(config, folder, "merged"), run(config, folder, "adapter")
        finally:  # the local Prefect server `grove run` started for these runs (none configured)
            if not had_server and "PREFECT_API_URL" not in os.environ:
                server.stop()
        tuned = merged["stages"]["evaluate"]["summary"]["fine_tuned"]["accuracy"]
        onnx_merged = merged["stages"]["build_onnx"]["summary"]
        onnx_adapter = adapter["stages"]["build_onnx"]["summary"]
        base_dir = adapter["out"] / "model"
        adapter_file = next((adapter["out"] / "adapters").glob("*.onnx_adapter"))
        merged_dir = merged["out"] / "model"
        speed = BenchmarkSettings(prompts=4, max_new_tokens=48, warmup=1, repeats=2, machine="")
        prompts = [[1, 504, 2657, 42, 1032, 337, 30, 1145], [1, 2083, 314, 260, 3575, 282, 4649, 47],
                   [1, 20, 18, 5250, 42, 339, 1538, 1107], [1, 1345, 10, 29, 5113, 28, 1023, 93]]
        rates: dict[str, list[float]] = {"merged_int4": [], "base_no_adapter": [], "base_with_adapter": []}
        for _ in range(args.rounds):  # interleaved: a load spike hits every variant alike
            for label, model, extra in (("merged_int4", merged_dir, None), ("base_no_adapter", base_dir, None),
                                        ("base_with_adapter", base_dir, adapter_file)):
                report = measure_engine("onnx", model, base_dir, prompts, speed, "cpu", extra)
                rates[label].append(report["decode_tokens_per_s"])
        load_after = os.getloadavg()[0]
        cores = os.cpu_count() or 1
        result = {
            "command": "python bench/adapter_serving.py",
            "model": config["input_model"].get("model_path"), "machine_cores": cores, "build": SAME_BUILD,
            "accuracy": {"merged_pytorch": tuned, "merged_int4": onnx_merged.get("accuracy"),
                         "base_plus_adapter_int4": onnx_adapter.get("accuracy"),
                         "eval_rows": config.get("grove", {}).get("evaluate", {}).get("max_rows")},
            "within_2_points_of_merged_pytorch": {
                k: (abs(v - tuned) <= 0.02 if v is not None and tuned is not None else None)
                for k, v in (("merged_int4", onnx_merged.get("accuracy")),
                             ("base_plus_adapter_int4", onnx_adapter.get("accuracy")))},
            "decode_tokens_per_s": {k: {"median": sorted(v)[len(v) // 2], "runs": v} for k, v in rates.items()},
            "sizes_mb": {"merged_int4_model": folder_mb(merged_dir), "base_with_slots": folder_mb(base_dir),
                         "adapter_file": round(adapter_file.stat().st_size / 2**20, 3)},
            "run_seconds": {"merged": merged["seconds"], "adapter": adapter["seconds"]},
            "load_average": {"before": load_before, "after": load_after},
            "noisy_timings": max(load_before, load_after) > cores,
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
