"""Shipping an adapter vs a merged model, on the bundled SmolLM2 and tone data (issue 15).

    python bench/adapter_serving.py [--config configs/smollm2-tone.json] [--out bench/results/adapter_serving.json]
    python3 bench/adapter_serving.py --device cuda --out adapter_serving_gpu.json   # on a CUDA machine

--device cuda (bench/gpu_device.sh adapters): the same LoRA config with the CUDA execution provider
and Grove's CUDA build defaults (the builder's int4, CUDA graphs on), trained and evaluated on the
GPU, decode measured on the GPU; each ONNX variant is also measured with CUDA graphs off (a copy of
its folder with enable_cuda_graph "0" in genai_config.json). A variant or run that fails is
recorded with its error instead of ending the bench.

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
import shutil
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


def run(config: dict, folder: Path, ship: str, label: str | None = None) -> dict:
    label = label or ship
    config = json.loads(json.dumps(config))
    config.setdefault("grove", {})["ship"] = ship
    config.setdefault("engine", {}).update(cache_dir=str(folder / "store"), output_dir=str(folder / label))
    path = folder / f"{label}.json"
    path.write_text(json.dumps(config))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])})
    if done.returncode != 0:
        raise RunFailed(f"grove run ({label}) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    name = next(iter((folder / label).iterdir()))
    report = json.loads((name / "report.json").read_text())
    return {"seconds": round(time.monotonic() - started, 1), "out": name,
            "stages": {s["stage"]: s for s in report["stages"]}}


class RunFailed(RuntimeError):
    pass


def on_cuda(config: dict) -> dict:
    """The config on the CUDA execution provider: the build targets cuda with Grove's CUDA defaults."""
    config = json.loads(json.dumps(config))
    for system in config.get("systems", {}).values():
        for accelerator in system.get("accelerators", []):
            accelerator.update(device="gpu", execution_providers=["CUDAExecutionProvider"])
    config.setdefault("grove", {})["device"] = "cuda"
    return config


def without_cuda_graph(model: Path, target: Path) -> Path:
    """A copy of an ONNX model folder with CUDA graphs off in its genai_config.json."""
    shutil.copytree(model, target)
    path = target / "genai_config.json"
    genai = json.loads(path.read_text())
    for entry in genai["model"]["decoder"].get("session_options", {}).get("provider_options", []):
        if "cuda" in entry:
            entry["cuda"]["enable_cuda_graph"] = "0"
    path.write_text(json.dumps(genai, indent=4))
    return target


def cuda_graph_setting(model: Path) -> str | None:
    genai = json.loads((model / "genai_config.json").read_text())
    for entry in genai["model"]["decoder"].get("session_options", {}).get("provider_options", []):
        if "cuda" in entry:
            return entry["cuda"].get("enable_cuda_graph")
    return None


SCORE_ROWS = 120  # rows of configs/data/tone.jsonl (train and eval alike) scored per ONNX variant on CUDA


def score_worker(request: dict) -> dict:
    """Greedy answers of one ONNX variant on the first SCORE_ROWS rows, as build_onnx scores (the shipped
    prompt, the engine's generate). `max_length`: every generator gets that max_length instead of
    prompt + max_new_tokens (one CUDA graph for every prompt)."""
    from grove.engines import OnnxEngine
    from grove.scoring import summarize
    from grove.shipped import ShippedModel

    spec = json.loads(Path(request["spec"]).read_text())
    adapter = Path(request["adapter"]) if request.get("adapter") else None
    engine = OnnxEngine(Path(request["model"]), set(spec["eos_token_ids"]), adapter=adapter)
    if request.get("max_length"):
        og, fixed = engine.og, int(request["max_length"])

        def generator(prompt, max_new_tokens, force):
            params = og.GeneratorParams(engine.model)
            params.set_search_options(max_length=fixed, do_sample=False)
            made = og.Generator(engine.model, params)
            if engine.adapters is not None:
                made.set_active_adapter(engine.adapters, "active")
            return made

        engine._generator = generator
    shipped = ShippedModel(Path(request["model"]), engine, spec)
    lines = (ROOT / "configs" / "data" / "tone.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()][:SCORE_ROWS]
    predictions = [shipped.answer(row) for row in rows]
    summary = summarize(predictions, [str(row[spec["label_col"]]).strip() for row in rows])
    return {"accuracy": summary["accuracy"], "rows": len(rows), "predicted": summary["predicted"],
            "first_predictions": predictions[:8], "device": engine.device_type}


def score(model: Path, spec: Path, adapter: Path | None, max_length: int | None = None) -> dict:
    request = {"model": str(model), "spec": str(spec), "adapter": str(adapter) if adapter else None,
               "max_length": max_length}
    done = subprocess.run([sys.executable, __file__, "--score"], input=json.dumps(request), capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])})
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 1)


def layer_ops(folder: Path) -> dict[str, int]:
    """The operators of the first decoder layer of an ONNX model folder: at batch 1 on a GPU each
    is about one kernel launch, and a small model's decode time follows their count."""
    from collections import Counter

    import onnx

    graph = onnx.load(next(folder.glob("*.onnx")), load_external_data=False).graph
    ops = Counter(node.op_type for node in graph.node if "/layers.0/" in node.name)
    return {"total": sum(ops.values()), **dict(ops.most_common())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2-tone.json"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "adapter_serving.json"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the config on the CUDA execution provider, Grove's CUDA build defaults")
    parser.add_argument("--score", action="store_true", help=argparse.SUPPRESS)  # the scoring worker
    args = parser.parse_args()
    if args.score:
        print(json.dumps(score_worker(json.loads(sys.stdin.read()))))
        return
    from grove.settings import BenchmarkSettings
    from tasks.benchmark.stage import measure_engine

    config = json.loads(Path(args.config).read_text())
    if args.device == "cuda":
        # Grove's CUDA build for a plain `precision: int4` pass (the builder's int4, CUDA graphs on):
        # both ship modes build it, as a user's CUDA run would
        config = on_cuda(config)
        # the runs' own benchmark stage is not what this bench reports: kept short (one call's 10 minutes)
        config["grove"]["benchmark"] = {"prompts": 1, "max_new_tokens": 8, "warmup": 1, "repeats": 1}
        build = None
    else:
        # both runs on the same int4 build (the default ladder's first rung, the base grove.ship: adapter
        # builds for a plain int4 pass), written out so the merged run builds exactly that, no search
        config["passes"]["builder"]["config"] = SAME_BUILD
        build = SAME_BUILD
    load_before = os.getloadavg()[0]
    from flows import server

    had_server = server.running() is not None
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="grove-adapter-bench-") as tmp:
        folder = Path(tmp)
        adapter = None
        try:
            merged = run(config, folder, "merged")
            try:
                adapter = run(config, folder, "adapter")
            except RunFailed as exc:
                errors["adapter_run"] = str(exc)
                print(exc, file=sys.stderr)
                if args.device == "cuda":  # is it CUDA graphs? the same run with them off
                    off = json.loads(json.dumps(config))
                    off["grove"].setdefault("build", {})["cuda_graph"] = False
                    try:
                        adapter = run(off, folder, "adapter", "adapter_no_cuda_graph")
                    except RunFailed as again:
                        errors["adapter_run_no_cuda_graph"] = str(again)
                        print(again, file=sys.stderr)
        finally:  # the local Prefect server `grove run` started for these runs (none configured)
            if not had_server and "PREFECT_API_URL" not in os.environ:
                server.stop()
        tuned = merged["stages"]["evaluate"]["summary"]["fine_tuned"]["accuracy"]
        onnx_merged = merged["stages"]["build_onnx"]["summary"]
        onnx_adapter = adapter["stages"]["build_onnx"]["summary"] if adapter else {}
        merged_dir = merged["out"] / "model"
        base_dir = adapter["out"] / "model" if adapter else None
        adapter_file = next((adapter["out"] / "adapters").glob("*.onnx_adapter")) if adapter else None
        speed = BenchmarkSettings(prompts=4, max_new_tokens=48, warmup=1, repeats=2)
        prompts = [[1, 504, 2657, 42, 1032, 337, 30, 1145], [1, 2083, 314, 260, 3575, 282, 4649, 47],
                   [1, 20, 18, 5250, 42, 339, 1538, 1107], [1, 1345, 10, 29, 5113, 28, 1023, 93]]
        variants = [("merged_int4", merged_dir, None)]
        if adapter:
            variants += [("base_no_adapter", base_dir, None), ("base_with_adapter", base_dir, adapter_file)]
        if args.device == "cuda":  # the same folders with CUDA graphs off
            variants += [(f"{label}_no_cuda_graph", without_cuda_graph(model, folder / f"{label}-no-graph")
                          if cuda_graph_setting(model) not in (None, "0") else model, extra)
                         for label, model, extra in list(variants)]
        rates: dict[str, list[float]] = {label: [] for label, _, _ in variants}
        devices: dict[str, str] = {}
        for round_ in range(args.rounds):  # interleaved: a load spike hits every variant alike
            for label, model, extra in variants:
                if label in errors or (round_ and label.endswith("_no_cuda_graph")):  # those: one round
                    continue
                try:
                    report = measure_engine("onnx", model, base_dir or merged_dir, prompts, speed, args.device, extra)
                except RuntimeError as exc:
                    errors[label] = str(exc)[-3000:]
                    print(f"{label}: {exc}", file=sys.stderr)
                    continue
                rates[label].append(report["decode_tokens_per_s"])
                devices[label] = report.get("device")
        scores = {}
        if args.device == "cuda":  # accuracy of each ONNX variant with CUDA graphs on, off, and on with one max_length
            specs = {"merged_int4": merged_dir / "grove_prompt.json"}
            if adapter_file:
                specs["base_with_adapter"] = adapter_file.with_name(adapter_file.name.removesuffix(".onnx_adapter")
                                                                    + ".grove_prompt.json")
            for label, spec in specs.items():
                model, extra = next((m, e) for name, m, e in variants if name == label)
                graphless = next(m for name, m, _ in variants if name == f"{label}_no_cuda_graph")
                scores[label] = score(model, spec, extra)
                scores[f"{label}_no_cuda_graph"] = score(graphless, spec, extra)
                scores[f"{label}_max_length_256"] = score(model, spec, extra, 256)
                print(label, json.dumps({k: v for k, v in scores.items() if k.startswith(label)}), file=sys.stderr)
        load_after = os.getloadavg()[0]
        cores = os.cpu_count() or 1
        command = "python bench/adapter_serving.py" + (f" --device cuda --rounds {args.rounds}"
                                                       if args.device == "cuda" else "")
        result = {
            "command": command,
            "model": config["input_model"].get("model_path"), "machine_cores": cores, "device": args.device,
            "build": build or {k: onnx_merged.get(k) for k in ("precision", "block_size", "algo", "execution_provider",
                                                               "builder_options")},
            "cuda_graph": {"merged_int4": cuda_graph_setting(merged_dir),
                           "base": cuda_graph_setting(base_dir) if base_dir else None} if args.device == "cuda" else None,
            "gpu": gpu_name() if args.device == "cuda" else None,
            "onnx_device_type": {"merged_int4": onnx_merged.get("device_type"),
                                 "base_plus_adapter": onnx_adapter.get("device_type")},
            "decode_device": devices,
            "accuracy": {"merged_pytorch": tuned, "merged_int4": onnx_merged.get("accuracy"),
                         "base_plus_adapter_int4": onnx_adapter.get("accuracy"),
                         "eval_rows": config.get("grove", {}).get("evaluate", {}).get("max_rows")},
            "within_2_points_of_merged_pytorch": {
                k: (abs(v - tuned) <= 0.02 if v is not None and tuned is not None else None)
                for k, v in (("merged_int4", onnx_merged.get("accuracy")),
                             ("base_plus_adapter_int4", onnx_adapter.get("accuracy")))},
            "scored_rows": ({"rows": f"the first {SCORE_ROWS} of configs/data/tone.jsonl (train and eval alike)",
                             **scores} if scores else None),
            "decode_tokens_per_s": {k: {"median": sorted(v)[len(v) // 2], "runs": v} if v else None
                                    for k, v in rates.items()},
            "sizes_mb": {"merged_int4_model": folder_mb(merged_dir),
                         "base_with_slots": folder_mb(base_dir) if base_dir else None,
                         "adapter_file": round(adapter_file.stat().st_size / 2**20, 3) if adapter_file else None},
            "ops_per_layer": {"merged_int4_model": layer_ops(merged_dir),
                              "base_with_slots": layer_ops(base_dir) if base_dir else None},
            "run_seconds": {"merged": merged["seconds"], "adapter": adapter["seconds"] if adapter else None},
            "train": {k: merged["stages"]["train"]["summary"].get(k) for k in ("device", "base_dtype", "steps")},
            "load_average": {"before": load_before, "after": load_after},
            "noisy_timings": max(load_before, load_after) > cores,
            "errors": errors,
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def gpu_name() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return None


if __name__ == "__main__":
    main()
