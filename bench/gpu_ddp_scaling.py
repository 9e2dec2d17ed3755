"""Data-parallel training: Grove's training on one GPU against every GPU of the machine, one call.

Builds the Phi-3-mini-shaped model with random weights (bench/gpu_train_throughput.py), cuts the
same copying examples into Olive's 1024-token `join` blocks, and runs the train stage's own code
(tasks/train/fit.py `fit`, QLoRA nf4 + double quant, bf16, LoRA r=64 on o_proj,qkv_proj, Grove's
CUDA setup) under torchrun exactly as the stage launches it for `grove.train.processes`: first
1 process, then one per GPU, each with the same per-GPU batch (8 x 1024). Tokens/s counts every
token of the timed steps (after the warm-up steps) on all processes; the speed-up is the ratio
of the two runs (target >= 1.8x on 2 GPUs). Prints one JSON object (also written to --out).

    python3 bench/gpu_ddp_scaling.py --out $OUT/ddp_scaling.json          # on nvidia-h200-x2
    python3 bench/gpu_ddp_scaling.py --tiny --processes 2                  # code path check (gloo on CPUs)
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
sys.path.insert(0, str(ROOT / "bench"))

from gpu_train_throughput import (  # noqa: E402
    PHI3_MINI, TINY, build_random_model, join_blocks, make_examples, save_report)


def settings_for(device: str, batch: int, max_steps: int, processes: int):
    from grove.settings import TrainSettings

    args = {"per_device_train_batch_size": batch, "max_steps": max_steps, "learning_rate": 2e-4,
            "logging_steps": 5, "lr_scheduler_type": "constant"}
    if device == "cuda":
        args["bf16"] = True
    return TrainSettings(method="qlora", r=64, alpha=16, dropout=0.05, target_modules=["o_proj", "qkv_proj"],
                         training_args=args, processes=processes)


def worker(request_file: str) -> int:
    """One torchrun process: the stage's fit() with a timer over the steps after the warm-up."""
    import torch
    from transformers import TrainerCallback

    from grove.settings import ModelSettings, TrainSettings
    from tasks.train.fit import fit
    from tasks.train.ddp import leave_the_group

    request = json.loads(Path(request_file).read_text())
    device, warmup = request["device"], request["warmup"]
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timing: dict = {}

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                timing["start"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            timing["end"], timing["steps"] = time.perf_counter(), state.global_step - warmup

    workdir = Path(request["workdir"])
    summary = fit(TrainSettings.model_validate(request["settings"]), ModelSettings.model_validate(request["model"]),
                  Path(request["corpus"]), device, workdir / "out", workdir, 0, None, [StepTimer()])
    if int(os.environ.get("RANK", "0")) == 0:
        (workdir / "timing.json").write_text(json.dumps({**timing, "summary": summary}))
    leave_the_group()
    return 0


def run(processes: int, request: dict, workdir: Path) -> dict:
    """`processes` torchrun processes, launched as the train stage launches them."""
    from grove.machine import worker_environment
    from tasks.train.stage import torchrun_command

    workdir.mkdir(parents=True)
    (workdir / "out").mkdir()
    request = {**request, "workdir": str(workdir),
               "settings": {**request["settings"], "processes": processes}}
    (workdir / "request.json").write_text(json.dumps(request))
    command = torchrun_command(processes, str(Path(__file__).resolve()), "--worker", str(workdir / "request.json"))
    print(f"[{processes} process(es)] {' '.join(command)}", file=sys.stderr, flush=True)
    started = time.monotonic()
    done = subprocess.run(command, env=worker_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, check=False)
    (workdir.parent / f"torchrun-{processes}.log").write_text(done.stdout)
    if done.returncode != 0:
        return {"processes": processes, "error": f"exit {done.returncode}", "log_tail": done.stdout[-3000:]}
    timing = json.loads((workdir / "timing.json").read_text())
    tokens = timing["steps"] * processes * request["batch"] * request["block"]
    seconds = timing["end"] - timing["start"]
    summary = timing["summary"]
    return {"processes": processes, "timed_steps": timing["steps"], "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "peak_gib_rank0": round(summary.get("peak_gpu_mb", 0) / 1024, 1),
            "final_loss": summary["final_loss"], "setup": summary["setup"], "wall_s": round(time.monotonic() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (gloo): code path check")
    parser.add_argument("--processes", type=int, default=0, help="the many-process run (default: one per GPU)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=5)
    opts = parser.parse_args()
    if opts.worker:
        return worker(opts.worker)

    import torch

    device = "cuda" if torch.cuda.is_available() and not opts.tiny else "cpu"
    processes = opts.processes or torch.cuda.device_count()
    shape, batch, block = (TINY, 4, 64) if opts.tiny else (PHI3_MINI, 8, 1024)
    report: dict = {"command": " ".join([Path(sys.executable).name] + sys.argv), "device": device, "shape": shape,
                    "per_process_batch": f"{batch} x {block}", "gpus": torch.cuda.device_count(), "runs": []}
    if device == "cuda":
        import bitsandbytes
        import peft
        import transformers

        report["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                              "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__,
                              "nccl": ".".join(map(str, torch.cuda.nccl.version())),
                              "gpu": torch.cuda.get_device_name(0)}
    if processes < 2:
        report["note"] = f"one process only: this machine has {report['gpus']} GPU(s), no speed-up to measure"

    scratch = Path(tempfile.mkdtemp(prefix="grove-ddp-bench-"))
    folder = scratch / "model"
    build_random_model(folder, shape, device)
    max_processes = max(processes, 1)
    rows_needed = (opts.warmup + opts.steps) * batch * max_processes
    examples = make_examples(rows_needed * block // 500 + 64, shape["vocab_size"], 64, 1024 if not opts.tiny else 64)
    blocks = join_blocks(examples, block)[:rows_needed]
    corpus = scratch / "corpus"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in blocks))
    (corpus / "eval.jsonl").write_text(json.dumps(blocks[0]) + "\n")
    request = {"settings": settings_for(device, batch, opts.warmup + opts.steps, 1).model_dump(mode="json"),
               "model": {"name": str(folder), "path": str(folder), "content_sha256": "random"},
               "corpus": str(corpus), "device": device, "warmup": opts.warmup, "batch": batch, "block": block}
    for count in sorted({1, max_processes}):
        report["runs"].append(run(count, request, scratch / f"p{count}"))
        save_report(report, opts.out)
    one, many = report["runs"][0], report["runs"][-1]
    if len(report["runs"]) > 1 and one.get("tokens_per_s") and many.get("tokens_per_s"):
        report["speedup"] = round(many["tokens_per_s"] / one["tokens_per_s"], 2)
        report["target"] = {"speedup": 1.8, "met": report["speedup"] >= 1.8}
    save_report(report, opts.out, final=True)
    return 0 if all("error" not in r for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
