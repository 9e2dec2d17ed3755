"""Where does a CUDA int4 build of the bundled fine-tune lose its accuracy? (issue 20: configs/smollm2-tone-cuda.json
shipped CUDA int4 at 0.733 against 0.842 for the fine-tuned PyTorch model, where CPU int4 loses ~0-2 points.)

    python3 bench/gpu_onnx_precision_probe.py --out probe.json      (bench/gpu_device.sh probe)

One `grove run` of configs/smollm2-tone-cuda.json (QLoRA, CUDA EP, ship: merged, no quantization search), then the
run's merged HF folder is scored as PyTorch on the GPU (fp32, fp16) and built again as each VARIANT below
(one factor changed at a time from Grove's CUDA default for SmolLM2: int4, block 32, symmetric, the builder's
default algorithm, which quantizes the tied LM head to int4 with the embedding; fp16 io; CUDA graphs on), each scored as
served on its provider on the first 120 rows of configs/data/tone.jsonl with the run's shipped prompt
(adapter_serving.score). `served_on`: a CPU build (fp32 io) served by the CUDA provider, or a copy with CUDA
graphs off. The JSON is rewritten after every step, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

def merged_folder(store_root: Path, key: str) -> Path:
    from grove.store import ArtifactStore

    store = ArtifactStore(str(store_root))
    folder = store.materialize(store.lookup("merge_adapters", key))
    return next(p.parent for p in folder.rglob("config.json"))


def pytorch_score(folder: Path, spec_file: Path, dtype: str = "float32") -> dict:
    """The merged HF folder in `dtype` on the GPU, greedy, with the shipped prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grove.scoring import first_line, summarize
    from grove.shipped import render_prompt

    spec = json.loads(spec_file.read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to("cuda").eval()
    rows = [json.loads(line) for line in (ROOT / "configs" / "data" / "tone.jsonl").read_text().splitlines()
            if line.strip()][:120]
    predictions = []
    for row in rows:
        ids = tokenizer(render_prompt(spec, row), add_special_tokens=False, return_tensors="pt").input_ids.to("cuda")
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=spec["max_new_tokens"], do_sample=False,
                                 eos_token_id=spec["eos_token_ids"], pad_token_id=spec["eos_token_ids"][0])
        predictions.append(first_line(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
    summary = summarize(predictions, [str(r[spec["label_col"]]).strip() for r in rows])
    return {"accuracy": summary["accuracy"], "predicted": summary["predicted"], "first_predictions": predictions[:8]}


GRAPH = {"enable_cuda_graph": "true"}
HEAD = ["/lm_head/MatMul"]
MIXED = {"last_matmul": "int8", "mixed_layers": "int8"}
# name: (BuildSettings fields, how it is served: None as built, "graph_off", "on_cuda" (a CPU build on CUDA))
VARIANTS = {
    # Grove's CUDA int4 build at 9eb1786 for SmolLM2 (block 128 does not divide its 960: the builder's 32)
    "cuda_int4_b32": (dict(block_size=32, extra_options=GRAPH), None),
    "cuda_int4_b32_graph_off": (dict(block_size=32, extra_options=GRAPH), "graph_off"),
    "cpu_int4_b32": (dict(block_size=32, execution_provider="cpu"), None),  # the same weights, fp32 io, CPU
    "cpu_int4_b32_served_on_cuda": (dict(block_size=32, execution_provider="cpu"), "on_cuda"),
    "cuda_fp16": (dict(precision="fp16", extra_options=GRAPH), None),
    "cuda_int4_b32_fp16_head": (dict(block_size=32, nodes_to_exclude=HEAD, extra_options=GRAPH), None),
    "cuda_int4_b32_int8_head": (dict(block_size=32, algo="rtn", mixed_precision={"last_matmul": "int8"},
                                     extra_options=GRAPH), None),
    "cuda_int4_rtn_asym_b16_mixed": (dict(block_size=16, algo="rtn", is_symmetric=False, mixed_precision=MIXED,
                                          extra_options=GRAPH), None),  # the CPU ladder's first rung, on CUDA
    "cuda_int4_b16": (dict(block_size=16, extra_options=GRAPH), None),
    "cuda_int4_b32_bf16_io": (dict(block_size=32, extra_options={**GRAPH, "use_cuda_bf16": "true"}), None),
    "cuda_int8": (dict(precision="int8", extra_options=GRAPH), None),
    "cuda_int4_rtn_asym_b32_mixed": (dict(block_size=32, algo="rtn", is_symmetric=False, mixed_precision=MIXED,
                                          extra_options=GRAPH), None),
    "cuda_int4_b128": (dict(block_size=128, extra_options=GRAPH), None),
    "cuda_int4_b32_acc4": (dict(block_size=32, accuracy_level=4, extra_options=GRAPH), None),
    "cpu_int4_rtn_asym_b16_mixed": (dict(block_size=16, algo="rtn", is_symmetric=False, mixed_precision=MIXED,
                                         execution_provider="cpu"), None),  # the CPU ladder's first rung
    "cuda_fp32": (dict(precision="fp32", extra_options=GRAPH), None),
}


def served_on_cuda(model: Path, target: Path) -> Path:
    """A copy of a CPU build whose genai_config.json names the CUDA provider (its fp32 io on CUDA kernels)."""
    shutil.copytree(model, target)
    path = target / "genai_config.json"
    genai = json.loads(path.read_text())
    genai["model"]["decoder"].setdefault("session_options", {})["provider_options"] = [
        {"cuda": {"enable_cuda_graph": "0"}}]
    path.write_text(json.dumps(genai, indent=4))
    return target


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2-tone-cuda.json"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default=os.environ.get("PROBE_ONLY"),
                        help="comma-separated variant names (default: all, in order; or $PROBE_ONLY)")
    args = parser.parse_args()
    from adapter_serving import RunFailed, folder_mb, on_cuda, run, score, without_cuda_graph

    from grove.settings import BuildSettings
    from tasks.build_onnx.builder import run_builder

    out = Path(args.out)
    result: dict = {"command": "python3 bench/gpu_onnx_precision_probe.py", "rows": "first 120 of tone.jsonl",
                    "config": str(Path(args.config).relative_to(ROOT) if Path(args.config).is_absolute()
                                  else args.config)}

    def save() -> None:
        out.write_text(json.dumps(result, indent=1))

    config = on_cuda(json.loads(Path(args.config).read_text()))
    config["grove"]["benchmark"] = {"prompts": 1, "max_new_tokens": 8, "warmup": 1, "repeats": 1}
    config["grove"]["quantization_search"] = {"enabled": False}  # Grove's plain CUDA default build
    for data in config.get("data_configs", []):
        params = data["load_dataset_config"]["params"]
        params["data_files"] = str((ROOT / params["data_files"]).resolve())
    with tempfile.TemporaryDirectory(prefix="grove-precision-probe-") as tmp:
        folder = Path(tmp)
        started = time.monotonic()
        try:
            merged = run(config, folder, "merged")
        except RunFailed as exc:
            result["error"] = str(exc)
            save()
            raise SystemExit(1)
        onnx = merged["stages"]["build_onnx"]["summary"]
        result["grove_run"] = {"seconds": round(time.monotonic() - started, 1),
                               "fine_tuned_pytorch_eval_split": merged["stages"]["evaluate"]["summary"]["fine_tuned"]["accuracy"],
                               "onnx_eval_split": onnx.get("accuracy"), "block_size": onnx.get("block_size"),
                               "prompts_unlike_training": onnx.get("prompts_unlike_training"),
                               "sample": onnx.get("sample")}
        spec = merged["out"] / "model" / "grove_prompt.json"
        result["scores"] = {"grove_default_as_built": score(merged["out"] / "model", spec, None)}
        save()
        source = merged_folder(folder / "store", merged["stages"]["merge_adapters"]["key"])
        for dtype in ("float32", "float16"):
            started = time.monotonic()
            try:
                result["scores"][f"pytorch_{dtype}"] = pytorch_score(source, spec, dtype)
            except Exception as exc:  # noqa: BLE001 - a probe records what failed
                result["scores"][f"pytorch_{dtype}"] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
            result["scores"][f"pytorch_{dtype}"]["seconds"] = round(time.monotonic() - started, 1)
            print(dtype, result["scores"][f"pytorch_{dtype}"].get("accuracy"), file=sys.stderr)
            save()
        names = args.only.split(",") if args.only else list(VARIANTS)
        built: dict[str, Path] = {}
        for name in names:
            fields, served = VARIANTS[name]
            build = BuildSettings(**{"execution_provider": "cuda", **fields})
            key = build.model_dump_json()
            started = time.monotonic()
            entry: dict = {"build": {k: v for k, v in fields.items()}, "served": served or "as built"}
            try:
                if key not in built:
                    target = folder / name
                    run_builder(source, target, build, False)
                    built[key] = target
                    entry["build_seconds"] = round(time.monotonic() - started, 1)
                model = built[key]
                if served == "graph_off":
                    model = without_cuda_graph(model, folder / f"{name}-served")
                elif served == "on_cuda":
                    model = served_on_cuda(model, folder / f"{name}-served")
                entry.update(score(model, spec, None), size_mb=folder_mb(built[key]))
            except Exception as exc:  # noqa: BLE001
                entry["error"] = f"{type(exc).__name__}: {exc}"[:1000]
            entry["seconds"] = round(time.monotonic() - started, 1)
            result["scores"][name] = entry
            print(name, entry.get("accuracy"), entry.get("device"), entry.get("error", "")[:300], file=sys.stderr)
            save()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
