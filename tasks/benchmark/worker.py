"""The benchmark stage's worker: times one engine in a process of its own.

Run as `python -m tasks.benchmark.worker` with the request as JSON on stdin; prints one
JSON line. A process per engine makes max RSS that engine's own peak memory. It imports
no Prefect and no stage code, so it starts fast.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
from pathlib import Path


WARMUP_TOKENS = 8


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: on Linux that keeps the
    high-water mark of the parent image that forked this process, across exec."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def measure(request: dict) -> dict:
    from grove.engines import OnnxEngine

    if request["engine"] == "pytorch":
        # torch and transformers are imported only here: the ONNX engine's process needs neither
        # (its eos ids come with the request), so its start costs no torch import
        from grove.engines import HfEngine, eos_ids_of
        from grove.models import load_causal_lm, load_tokenizer

        tokenizer = load_tokenizer(Path(request["tokenizer"]))
        model = load_causal_lm(Path(request["folder"]), request["device"]).eval()
        engine = HfEngine(model, tokenizer.pad_token_id, eos_ids_of(tokenizer, model.config))
        parameter = next(model.parameters())
        device, dtype = parameter.device.type, str(parameter.dtype).removeprefix("torch.")
    else:
        adapter = request.get("adapter")
        engine = OnnxEngine(Path(request["folder"]), set(request["eos_ids"]), adapter=Path(adapter) if adapter else None)
        device, dtype = engine.device_type, None
    prompts, new = request["prompts"], request["max_new_tokens"]
    for _ in range(request["warmup"]):  # first-call set-up (allocations, kernels): a few tokens show it
        engine.generate_timed(prompts[0], min(new, WARMUP_TOKENS))
    latency, first, decode = [], [], []
    for _ in range(request["repeats"]):
        for prompt in prompts:
            run = engine.generate_timed(prompt, new)
            latency.append(run.total_seconds)
            first.append(run.first_token_seconds)
            if len(run.token_times) > 1:
                decode.append((len(run.token_times) - 1) / (run.token_times[-1] - run.token_times[0]))
    report = {
        "device": device,
        "dtype": dtype,
        "prompt_tokens": round(statistics.mean(len(p) for p in prompts), 1),
        "new_tokens": new,
        "latency_ms": round(statistics.median(latency) * 1000, 2),
        "time_to_first_token_ms": round(statistics.median(first) * 1000, 2),
        "decode_tokens_per_s": round(statistics.median(decode), 2) if decode else None,
        "peak_rss_mb": peak_rss_mb(),
        "runs": len(latency),
    }
    if device == "cuda":
        import torch

        report["gpu"] = torch.cuda.get_device_name(0)
        if request["engine"] == "pytorch":
            report["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return report


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.stdin.read()))))
