"""Batch-1 decode on one GPU: int4 ONNX (onnxruntime-genai-cuda) against PyTorch bf16 (HF generate).

One process: builds a Phi-3-mini-shaped model with random weights (a word-level tokenizer made
here: nothing can be downloaded), builds it int4 for CUDA with Grove's default build settings
(flows/config/build.py: enable_cuda_graph on), and times both engines through the benchmark stage's
own worker (tasks/benchmark/stage.py measure_engine: a process per engine, same prompts, every new
token forced, medians after a warm-up), including the fraction of the memory-bandwidth bound.
Then the ONNX runtime settings one at a time (CUDA graphs off; other builds if time is left).

    python3 bench/gpu_onnx_decode.py --out $OUT/onnx_decode.json
    python3 bench/gpu_onnx_decode.py --no-pytorch --variants block_size_64,block_size_128,accuracy_level_4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from gpu_train_throughput import PHI3_MINI, TINY, build_random_model, save_report  # noqa: E402

STARTED = time.monotonic()
# ModelBuilder pass keys tried against Grove's default CUDA build (the pass keys a config sets)
VARIANTS = {"block_size_32": {"int4_block_size": 32}, "block_size_64": {"int4_block_size": 64},
            "block_size_128": {"int4_block_size": 128}, "accuracy_level_4": {"int4_accuracy_level": 4},
            # the builder's CUDA options (onnxruntime-genai 0.18 builder --help)
            "prepacked_sm90": {"extra_options": {"matmulnbits_weights_prepacked": "2"}},  # Hopper fpA_intB layout
            "fused_gate_up": {"extra_options": {"fuse_mlp_gate_up": "true"}},  # one MatMulNBits + Split per MLP
            "fused_gate_up_prepacked_sm90": {"extra_options": {"fuse_mlp_gate_up": "true",
                                                               "matmulnbits_weights_prepacked": "2"}},
            "bf16_io": {"extra_options": {"use_cuda_bf16": "true"}},
            "fp16_lm_head": {"int4_nodes_to_exclude": ["/lm_head/MatMul"]},
            # what Grove ships by default on CUDA: the CUDA ladder's first rung (flows/config/candidates.py)
            "cuda_ladder_first_rung": {"int4_block_size": 32, "int4_is_symmetric": False,
                                       "extra_options": {"algo_config": "rtn",
                                                         "matmul_mixed_precision": "last_matmul:int8,mixed_layers:int8"}}}
# runtime settings tried on every build: environment variables onnxruntime reads when it loads the model
RUNTIME_VARIANTS = {"fpa_intb": {"ORT_FPA_INTB_GEMM": "1"}}  # TensorRT-LLM's fpA_intB GEMM/GEMV for MatMulNBits


def say(*parts):
    print(f"[{time.monotonic() - STARTED:7.1f}s]", *parts, file=sys.stderr, flush=True)


def word_tokenizer(folder: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="t1", eos_token="t2", pad_token="t0",
                            unk_token="t0").save_pretrained(folder)


def set_cuda_graph(model_dir: Path, on: bool) -> None:
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    for entry in config["model"]["decoder"]["session_options"]["provider_options"]:
        if "cuda" in entry:
            entry["cuda"]["enable_cuda_graph"] = "1" if on else "0"
    path.write_text(json.dumps(config, indent=4))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=400)
    parser.add_argument("--variants", default="block_size_128",
                        help="builds besides Grove's default, comma-separated: " + ", ".join(VARIANTS))
    parser.add_argument("--runtime-variants", default="",
                        help="measured on every build, comma-separated: " + ", ".join(RUNTIME_VARIANTS))
    parser.add_argument("--no-cuda-graph-off", action="store_true", help="skip the CUDA-graphs-off measurement")
    parser.add_argument("--no-pytorch", action="store_true",
                        help="only ONNX builds (compared with Grove's default build of the same run)")
    opts = parser.parse_args()

    import torch

    from flows.config import build_settings  # Grove's own defaults
    from tasks.benchmark.stage import measure_engine
    from tasks.build_onnx.builder import builder_options, run_builder
    from grove.settings import BenchmarkSettings, ModelSettings

    device = "cuda" if torch.cuda.is_available() and not opts.tiny else "cpu"
    shape = TINY if opts.tiny else PHI3_MINI
    folder = Path("/tmp/grove-phi3-decode" if not opts.tiny else "/tmp/grove-phi3-decode-tiny")
    report: dict = {"command": " ".join(["python3"] + sys.argv), "device": device, "shape": shape, "runs": {}}
    if not (folder / "config.json").exists():
        say("building the random bf16 model")
        build_random_model(folder, shape, device)
        word_tokenizer(folder, shape["vocab_size"])
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, shape["vocab_size"] - 100) for _ in range(opts.prompt_tokens - 1)]
               for _ in range(opts.prompts)]
    settings = BenchmarkSettings(prompts=opts.prompts, max_new_tokens=opts.new_tokens, warmup=1, repeats=1)

    def measure(name, engine, model_dir):
        say(f"measure {name}")
        try:
            report["runs"][name] = measure_engine(engine, model_dir, folder, prompts, settings, device)
        except Exception as exc:  # noqa: BLE001 - a failing variant is a result too
            report["runs"][name] = {"error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
        say(f"  -> {json.dumps(report['runs'][name])}")
        save_report(report, opts.out)

    provider = "cuda" if device == "cuda" else "cpu"
    # Grove's default build for this provider: what flows/config makes of a ModelBuilder int4 pass
    model = ModelSettings(name=str(folder), path=str(folder), content_sha256="random")

    def grove_build(keys: dict):
        return build_settings({"precision": "int4", **keys}, "passes.builder", provider, model)

    build = grove_build({})
    report["grove_build_settings"] = build.model_dump()
    builds = {"grove_default": build}
    for name in filter(None, opts.variants.split(",")):
        builds[name] = grove_build(VARIANTS[name])
    for name, settings_ in builds.items():
        if name != "grove_default" and opts.budget_s - (time.monotonic() - STARTED) < 150:
            report["runs"][name] = {"skipped": "time budget"}
            continue
        target = Path(f"/tmp/grove-onnx-{name}")
        shutil.rmtree(target, ignore_errors=True)
        say(f"build {name}: {builder_options(settings_, False)}")
        started = time.monotonic()
        run_builder(folder, target, settings_, False)
        report.setdefault("build_seconds", {})[name] = round(time.monotonic() - started, 1)
        measure(f"onnx_{name}", "onnx", target)
        for variant in filter(None, opts.runtime_variants.split(",")):
            saved = {key: os.environ.get(key) for key in RUNTIME_VARIANTS[variant]}
            os.environ.update(RUNTIME_VARIANTS[variant])  # the engine's worker process inherits it
            try:
                measure(f"onnx_{name}_{variant}", "onnx", target)
            finally:
                for key, value in saved.items():
                    os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
        if name == "grove_default" and not opts.no_pytorch:
            measure("pytorch_bf16", "pytorch", folder)
            if provider == "cuda" and not opts.no_cuda_graph_off:
                set_cuda_graph(target, False)
                measure("onnx_grove_default_cuda_graph_off", "onnx", target)
                set_cuda_graph(target, True)
        shutil.rmtree(target, ignore_errors=True)

    runs = report["runs"]
    base = runs.get("pytorch_bf16", {}).get("decode_tokens_per_s")
    default = runs.get("onnx_grove_default", {}).get("decode_tokens_per_s")
    summary = {}
    for name, result in runs.items():
        if name.startswith("onnx") and result.get("decode_tokens_per_s"):
            summary[name] = {"decode_tokens_per_s": result["decode_tokens_per_s"],
                             "ttft_ms": result.get("time_to_first_token_ms"),
                             "size_mb": result.get("size_mb"),
                             "vs_grove_default": round(result["decode_tokens_per_s"] / default, 3) if default else None,
                             "speedup_vs_pytorch": round(result["decode_tokens_per_s"] / base, 2) if base else None,
                             "bandwidth_fraction": (result.get("bandwidth") or {}).get("fraction")}
    if base:
        summary["pytorch_bf16"] = {k: runs["pytorch_bf16"].get(k) for k in
                                   ("decode_tokens_per_s", "time_to_first_token_ms")}
        summary["pytorch_bf16"]["bandwidth_fraction"] = (runs["pytorch_bf16"].get("bandwidth") or {}).get("fraction")
    report["summary"] = summary
    report["seconds"] = round(time.monotonic() - STARTED, 1)
    save_report(report, opts.out, final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
