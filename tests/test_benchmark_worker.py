"""The benchmark stage's ONNX worker: a fresh process per engine, so its start is part of every
benchmark. It measures the ONNX model without importing torch or transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

PROBE = """
import runpy, sys
try:
    runpy.run_module("tasks.benchmark.worker", run_name="__main__")
finally:
    print(sorted(m for m in ("torch", "transformers") if m in sys.modules), file=sys.stderr)
"""


def test_the_onnx_worker_measures_the_model_without_torch_or_transformers(trained_store):
    model = trained_store.parent / "out" / "tiny" / "model"
    request = {"engine": "onnx", "folder": str(model), "tokenizer": str(model), "eos_ids": [2],
               "adapter": None, "prompts": [[1, 5, 9, 14]], "max_new_tokens": 4, "warmup": 0, "repeats": 1,
               "device": "cpu"}
    done = subprocess.run([sys.executable, "-c", PROBE], input=json.dumps(request), capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["device"] == "cpu" and report["runs"] == 1 and report["latency_ms"] > 0
    assert done.stderr.strip().splitlines()[-1] == "[]", done.stderr[-500:]
