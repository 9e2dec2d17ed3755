"""Stage 7, benchmark: the PyTorch model and the ONNX model on the same prompts.

Each engine runs in its own subprocess so its peak memory (max RSS) is its own. Per
engine: warm-up runs, then repeats on every prompt with every new token forced; reported
as medians: end-to-end latency, time to first token, decode tokens/s, plus peak memory
and size on disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tasks.models import model_folder
from tasks.settings import BenchmarkSettings, EvalSettings, ModelSettings
from tasks.stage import ArtifactRef, current_run, grove_stage, open_artifact, output_dir
from tasks.store import folder_bytes
from tasks.textdata import encode, prompt_and_answer, read_jsonl


def worker_environment() -> dict[str, str]:
    """This process's environment (CUDA settings, library paths) with Grove's own source first
    on the path, so the worker runs the same `tasks` package whatever the working directory."""
    root = str(Path(__file__).resolve().parents[1])
    path = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def measure_engine(engine: str, folder: Path, tokenizer_folder: Path, prompts: list[list[int]],
                   settings: BenchmarkSettings, device: str) -> dict:
    """Runs one engine in a fresh Python process and returns its JSON report."""
    request = {"engine": engine, "folder": str(folder), "tokenizer": str(tokenizer_folder),
               "prompts": prompts, "max_new_tokens": settings.max_new_tokens,
               "warmup": settings.warmup, "repeats": settings.repeats, "device": device}
    done = subprocess.run([sys.executable, "-m", "tasks.benchmark_worker"], input=json.dumps(request),
                          capture_output=True, text=True, check=False, env=worker_environment())
    if done.returncode != 0:
        raise RuntimeError(f"benchmark of the {engine} engine failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["size_mb"] = round(folder_bytes(folder) / 2**20, 1)
    return report


@grove_stage("benchmark", tags=("gpu",))
def benchmark(settings: BenchmarkSettings, evaluation: EvalSettings, model: ModelSettings,
              merged: ArtifactRef | None, onnx: ArtifactRef | None, data: ArtifactRef) -> dict:
    """Stores benchmark.json: per engine latency, time to first token, decode tokens/s, memory, size."""
    from tasks.models import load_tokenizer, resolve_device

    pytorch_folder = open_artifact(merged) if merged is not None else model_folder(model)
    tokenizer = load_tokenizer(pytorch_folder, model.trust_remote_code)
    rows = read_jsonl(open_artifact(data), "eval")[: settings.prompts]
    prompts = [encode(tokenizer, prompt_and_answer(evaluation.text_template, evaluation.label_col, r)[0],
                      eos=False)[0] for r in rows]
    device = resolve_device(current_run().device)
    results = {"device": device,
               "pytorch": measure_engine("pytorch", pytorch_folder, pytorch_folder, prompts, settings, device)}
    if onnx is not None:
        results["onnx"] = measure_engine("onnx", open_artifact(onnx) / "model", pytorch_folder, prompts,
                                         settings, device)
        base = results["pytorch"]["decode_tokens_per_s"]
        results["onnx_speedup"] = round(results["onnx"]["decode_tokens_per_s"] / base, 2) if base else None
    (output_dir() / "benchmark.json").write_text(json.dumps(results, indent=1))
    return results
