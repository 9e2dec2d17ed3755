"""A short description of the hardware a run measures on, cheap enough for every config load
(no torch import): the CPU model and core count, and the GPUs when CUDA may be used."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path


@functools.lru_cache(maxsize=None)
def gpu_count() -> int:
    """NVIDIA GPUs nvidia-smi lists (0 without it), without importing torch."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listed.splitlines() if line.strip())


@functools.lru_cache(maxsize=None)
def machine_description(device: str) -> str:
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    description = f"{cpu} x{os.cpu_count()}"
    if device != "cpu" and shutil.which("nvidia-smi"):
        try:
            gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=10).stdout.split("\n")
            gpus = [g.strip() for g in gpus if g.strip()]
            if gpus:
                description += f"; {len(gpus)}x {gpus[0]}"
        except (OSError, subprocess.SubprocessError):
            pass
    return description


def grove_home() -> Path:
    """Grove's per-machine folder: converted bundled models, digest memo, materialized entries."""
    return Path(os.environ.get("GROVE_HOME", Path.home() / ".cache" / "grove"))


def worker_environment() -> dict[str, str]:
    """This process's environment (CUDA settings, library paths) with Grove's own source first
    on the path, so a worker process runs the same packages whatever the working directory."""
    root = str(Path(__file__).resolve().parents[1])
    path = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
