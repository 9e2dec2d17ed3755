"""The default run as a newcomer meets it: per-stage seconds, peak memory, then cached reruns.

    python bench/default_run.py [--config configs/smollm2-tone.json] [--ship adapter] [--out FILE]

Prints one JSON object (and writes it to --out when given). The cold run is `grove run` in a
process of its own, timed from start to exit, with a fresh GROVE_HOME and artifact store and
no Prefect server: it starts grove's local server (flows/server.py) and converts the bundled
model once, as `make demo` does on a fresh machine. Peak memory is sampled over that process
and its children (the benchmark workers). Then two cached reruns, each its own `grove run`
process (Python start-up, imports, the Prefect client; the server already up). The bench
stops the local server it started. Targets (issue: the model Grove ships is as good as the
model it trained): cold run under 240 s, cached rerun under 5 s. `--ship adapter`: the same
config shipping its adapter on a base (grove.ship: adapter), what such a user meets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


class PeakMemory:
    """Samples the RSS of a process and its children (the benchmark workers) every 200 ms; the
    local Prefect server is in a session of its own and is not counted."""

    def __init__(self):
        self.peak, self._stop, self._pid = 0, threading.Event(), None
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def watch(self, pid: int) -> None:
        self._pid = pid

    def _sample(self):
        while not self._stop.is_set():
            try:
                me = psutil.Process(self._pid) if self._pid else None
                rss = me.memory_info().rss + sum(c.memory_info().rss for c in me.children(recursive=True)
                                                 if os.getsid(c.pid) == os.getsid(self._pid)) if me else 0
            except psutil.Error:
                rss = 0
            self.peak = max(self.peak, rss)
            time.sleep(0.2)

    def reset(self) -> int:
        peak, self.peak = self.peak, 0
        return peak


def child_env(environ: Mapping[str, str], work: Path) -> dict[str, str]:
    """The child `grove run`'s environment: this project first on PYTHONPATH, then whatever the caller put
    there (on the GPU machine the carried packages: prefect, pydantic, the CUDA onnxruntime builds), a
    fresh GROVE_HOME, and a fresh PREFECT_HOME unless a Prefect server is named."""
    carried = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**environ, "GROVE_HOME": str(work / "grove-home"), "PYTHONPATH": os.pathsep.join([str(ROOT), *carried])}
    if "PREFECT_API_URL" not in environ:  # a fresh machine's Prefect: no profile, no server
        env["PREFECT_HOME"] = str(work / "prefect-home")
    return env


def grove_run(config: Path, env: dict) -> tuple[float, int, str]:
    """(seconds, peak RSS of the process tree, stdout) of one `grove run` process."""
    memory = PeakMemory()
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--config", str(config)], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory.watch(process.pid)
    out, err = process.communicate()
    seconds = time.monotonic() - started
    if process.returncode != 0:
        raise SystemExit(f"grove run failed ({process.returncode}):\n{out[-3000:]}\n{err[-3000:]}")
    return seconds, memory.reset(), out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2-tone.json"))
    parser.add_argument("--ship", choices=("merged", "adapter"), help="override the config's grove.ship")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    raw = json.loads(Path(args.config).read_text())
    if args.ship:
        raw.setdefault("grove", {})["ship"] = args.ship
    work = Path(tempfile.mkdtemp(prefix="grove-bench-"))
    raw.setdefault("grove", {})["artifact_root"] = str(work / "store")
    raw.setdefault("engine", {})["output_dir"] = str(work / "out")
    for data in raw.get("data_configs", []):
        params = data["load_dataset_config"]["params"]
        params["data_files"] = str((ROOT / params["data_files"]).resolve())
    config = work / "bench-config.json"
    config.write_text(json.dumps(raw))
    env = child_env(os.environ, work)

    try:
        cold_s, cold_peak, cold_out = grove_run(config, env)
        report = json.loads((work / "out" / raw["grove"]["name"] / "report.json").read_text())
        reruns = [round(grove_run(config, env)[0], 1) for _ in range(2)]
    finally:
        subprocess.run([sys.executable, "-m", "flows.cli", "server", "stop"], cwd=ROOT, env=env,
                       capture_output=True)
    rerun = json.loads((work / "out" / raw["grove"]["name"] / "report.json").read_text())
    stages: dict[str, dict] = {}
    for stage in report["stages"]:  # a search reports one build_onnx line per candidate built
        name = stage.get("task_run") or stage["stage"]
        stages[name] = {"status": stage["status"], "seconds": stage["seconds"]}
    print(json.dumps(result := {
        "command": "python bench/default_run.py --config " + os.path.relpath(args.config, ROOT)
                   + (f" --ship {args.ship}" if args.ship else ""),
        "ship": raw["grove"].get("ship", "merged"),
        "machine": machine(),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
        "prefect_api": os.environ.get("PREFECT_API_URL", "grove's local server, started by the cold run"),
        "cold_run_s": round(cold_s, 1),
        "cold_run_peak_rss_mb": round(cold_peak / 2**20),
        "bundled_model_converted": "converting the bundled model" in cold_out,
        "stages": stages,
        "cached_rerun_s": reruns[-1],
        "cached_reruns_s": reruns,
        "cached_rerun_all_cached": all(s["status"] == "cached" for s in rerun["stages"]),
        "targets": {"cold_run_s": 240, "cached_rerun_s": 5},
        "results": key_results(report),
    }, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def machine() -> dict:
    found = {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30)}
    import torch

    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(0)
        found["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30)
    return found


def key_results(report: dict) -> dict:
    """What the run produced: training, accuracy (base, fine-tuned, ONNX), the benchmark."""
    s = {stage["stage"]: stage["summary"] for stage in report["stages"]}
    train, evaluate, onnx, bench = (s.get(k) or {} for k in ("train", "evaluate", "build_onnx", "benchmark"))
    onnx = report.get("onnx") or onnx  # the kept model when a search built several
    keep = ("device", "dtype", "latency_ms", "time_to_first_token_ms", "decode_tokens_per_s", "peak_rss_mb",
            "peak_gpu_mb", "size_mb", "adapter_size_mb")
    return {
        "train": {k: train.get(k) for k in ("method", "device", "base_dtype", "quantization", "steps",
                                            "first_loss", "final_loss", "seconds", "peak_gpu_mb")},
        "accuracy": {"base": (evaluate.get("base") or {}).get("accuracy"),
                     "fine_tuned": (evaluate.get("fine_tuned") or {}).get("accuracy"),
                     "onnx": onnx.get("accuracy")},
        "eval_loss": {"base": (evaluate.get("base") or {}).get("eval_loss"),
                      "fine_tuned": (evaluate.get("fine_tuned") or {}).get("eval_loss")},
        "onnx": {k: onnx.get(k) for k in ("candidate", "precision", "algo", "mixed_precision", "execution_provider",
                                          "device_type", "build_seconds", "size_bytes", "prompts_unlike_training")},
        "search": {k: (report.get("quantization_search") or {}).get(k) for k in ("chosen", "within_tolerance",
                                                                                "not_built", "scored")}
                  | {"accuracy": {r["name"]: r.get("accuracy")
                                  for r in (report.get("quantization_search") or {}).get("candidates", [])}},
        "promotion": {k: (report.get("promotion") or {}).get(k) for k in ("decision", "rule", "reason")},
        "benchmark": {engine: {k: v for k, v in (bench.get(engine) or {}).items() if k in keep}
                      for engine in ("pytorch", "onnx")} | {"onnx_speedup": bench.get("onnx_speedup")},
    }


if __name__ == "__main__":
    main()
