"""Stage 7, benchmark: the PyTorch model and the ONNX model on the same prompts.

Each engine runs in its own subprocess so its peak memory (max RSS) is its own. Per
engine: warm-up runs, then repeats on every prompt with every new token forced; reported
as medians: end-to-end latency, time to first token, decode tokens/s, plus peak memory
and size on disk. On a GPU each engine also gets the fraction of the memory-bandwidth bound
it reaches: batch-1 decode reads every weight once per token, so it can go no faster than
peak bandwidth / bytes of weights read per token (embedding tables excepted: a token reads
one row of them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from grove.engines import eos_ids_of
from grove.machine import worker_environment
from grove.models import load_tokenizer, model_folder
from grove.settings import BenchmarkSettings, EvalSettings, ModelSettings
from grove.served import served_model
from grove.stage import ArtifactRef, current_run, grove_stage, open_artifact, output_dir
from grove.store import folder_bytes
from grove.textdata import encode, prompt_and_answer, read_jsonl
from tasks.benchmark import worker  # run in a subprocess below: imported so the cache key covers it

# Peak memory bandwidth (bytes/s) by GPU name, from the vendors' data sheets; the longest key
# found in torch.cuda.get_device_name() wins ("H100 PCIe" before "H100").
GPU_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 NVL": 3.9e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,
    "GH200": 4.0e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100 80GB PCIe": 1.935e12,
    "A100": 1.555e12,
    "L40S": 0.864e12,
    "A10G": 0.6e12,
    "L4": 0.3e12,
    "RTX 4090": 1.008e12,
}
SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                        "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def peak_bandwidth(device_name: str | None) -> float | None:
    if not device_name:
        return None
    name = device_name.lower()
    found = [key for key in GPU_BANDWIDTH if key.lower() in name]
    return GPU_BANDWIDTH[max(found, key=len)] if found else None


def bandwidth_fraction(weight_bytes: int | None, tokens_per_s: float | None, bandwidth: float | None) -> dict | None:
    """How close batch-1 decode comes to reading the weights once per token at peak bandwidth."""
    if not weight_bytes or not tokens_per_s or not bandwidth:
        return None
    return {"weight_bytes_per_token": int(weight_bytes), "peak_bandwidth_bytes_per_s": bandwidth,
            "bound_tokens_per_s": round(bandwidth / weight_bytes, 1),
            "fraction": round(weight_bytes * tokens_per_s / bandwidth, 6)}


def safetensors_weight_bytes(folder: Path) -> int:
    """Bytes of a HF folder's weights that one decode step reads: all of them except input
    embedding tables (a token gathers one row), which count once when lm_head is tied to them."""
    import struct

    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    tied = bool(config.get("tie_word_embeddings", False))
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(size))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if "embed_tokens" in name or name.endswith(("wte.weight", "word_embeddings.weight")):
                if not tied:
                    continue
            start, end = meta["data_offsets"]
            total += end - start
    return total


def onnx_weight_bytes(folder: Path) -> int:
    """Bytes of the decoder's initializers that one decode step reads: those consumed only by
    Gather ops (embedding tables) are left out. Reads the graph, not the external data."""
    import math

    import onnx

    config = json.loads((folder / "genai_config.json").read_text())
    model = onnx.load(str(folder / config["model"]["decoder"]["filename"]), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in model.graph.initializer:
        ops = consumers.get(init.name, set())
        if ops and ops <= {"Gather", "GatherBlockQuantized"}:
            continue
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        count = math.prod(init.dims)
        if init.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            total += (count + 1) // 2
        else:
            total += count * itemsize
    return total


def weight_bytes(engine: str, folder: Path) -> int | None:
    try:
        return onnx_weight_bytes(folder) if engine == "onnx" else safetensors_weight_bytes(folder)
    except (OSError, ValueError, KeyError) as exc:  # an unusual layout: report no fraction, not fail
        import logging

        logging.getLogger("grove.benchmark").warning("weight bytes of %s: %s", folder, exc)
        return None


def measure_engine(engine: str, folder: Path, tokenizer_folder: Path, prompts: list[list[int]],
                   settings: BenchmarkSettings, device: str, adapter: Path | None = None,
                   eos_ids: set[int] | None = None) -> dict:
    """Runs one engine in a fresh Python process and returns its JSON report (`adapter`: an
    .onnx_adapter active on the ONNX model, as served; `eos_ids`: where the ONNX engine stops)."""
    if engine == "onnx" and eos_ids is None:
        eos_ids = eos_ids_of(load_tokenizer(tokenizer_folder))
    request = {"engine": engine, "folder": str(folder), "tokenizer": str(tokenizer_folder),
               "eos_ids": sorted(eos_ids or ()),
               "adapter": str(adapter) if adapter else None,
               "prompts": prompts, "max_new_tokens": settings.max_new_tokens,
               "warmup": settings.warmup, "repeats": settings.repeats, "device": device}
    done = subprocess.run([sys.executable, "-m", worker.__name__], input=json.dumps(request),
                          capture_output=True, text=True, check=False, env=worker_environment())
    if done.returncode != 0:
        raise RuntimeError(f"benchmark of the {engine} engine failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["size_mb"] = round(folder_bytes(folder) / 2**20, 1)
    if adapter is not None:
        report["adapter_size_mb"] = round(adapter.stat().st_size / 2**20, 3)
    if report.get("device") == "cuda":
        bound = bandwidth_fraction(weight_bytes(engine, folder), report.get("decode_tokens_per_s"),
                                   peak_bandwidth(report.get("gpu")))
        if bound:
            report["bandwidth"] = bound
    return report


@grove_stage("benchmark", tags=("gpu",))
def benchmark(settings: BenchmarkSettings, evaluation: EvalSettings, model: ModelSettings,
              merged: ArtifactRef | None, onnx: ArtifactRef | None, data: ArtifactRef) -> dict:
    """Stores benchmark.json: per engine latency, time to first token, decode tokens/s, memory, size."""
    from grove.models import resolve_device

    pytorch_folder = open_artifact(merged) if merged is not None else model_folder(model)
    tokenizer = load_tokenizer(pytorch_folder, model.trust_remote_code)
    rows = read_jsonl(open_artifact(data), "eval")[: settings.prompts]
    prompts = [encode(tokenizer, prompt_and_answer(evaluation.text_template, evaluation.label_col, r)[0],
                      eos=False)[0] for r in rows]
    device = resolve_device(current_run().device)
    results = {"device": device,
               "pytorch": measure_engine("pytorch", pytorch_folder, pytorch_folder, prompts, settings, device)}
    if onnx is not None:
        folder, adapter = served_model(current_run().store, open_artifact(onnx))
        results["onnx"] = measure_engine("onnx", folder, pytorch_folder, prompts, settings, device, adapter,
                                         eos_ids_of(tokenizer))
        base = results["pytorch"]["decode_tokens_per_s"]
        results["onnx_speedup"] = round(results["onnx"]["decode_tokens_per_s"] / base, 2) if base else None
    (output_dir() / "benchmark.json").write_text(json.dumps(results, indent=1))
    return results
