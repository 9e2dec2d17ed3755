"""What a GPU machine could add to a cached rerun, each timed once in a fresh process.

    PYTHONPATH=$PWD:$SITE HF_HUB_OFFLINE=1 python3 bench/gpu_rerun_suspects.py > cached_rerun_suspects.json

(run on the H100 of bench/results/h100/ right after `bash bench/gpu_device.sh install`, before
the first `grove run`: its last probe includes converting the bundled model there, 12.4 s).
The profile of a cached rerun itself: `python3 -X importtime -m cProfile -o rerun.prof -m
flows.cli run --config CONFIG` on the bench's store (bench/results/h100/rerun_profile.txt).
"""
import json
import subprocess
import sys
import time

PROBES = {
    "python_start": "pass",
    "nvidia_smi": "import subprocess; subprocess.run(['nvidia-smi','--query-gpu=name,compute_cap',"
                  "'--format=csv,noheader'],capture_output=True)",
    "import_torch": "import torch",
    "import_torch_cuda_init_bf16": "import torch; torch.cuda.is_available(); torch.cuda.is_bf16_supported()",
    "import_onnxruntime_gpu": "import onnxruntime; onnxruntime.get_available_providers()",
    "import_genai_cuda_is_cuda_available": "import onnxruntime_genai as og; og.is_cuda_available()",
    "import_prefect": "import prefect",
    "grove_config_checks_new": "from flows.config import load_config; load_config('configs/smollm2-tone-cuda.json')",
}
out = {}
for name, code in PROBES.items():
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    out[name] = {"seconds": [round(time.monotonic() - started, 2)], "rc": done.returncode,
                 "err": done.stderr[-300:] if done.returncode else ""}
print(json.dumps(out, indent=1))
