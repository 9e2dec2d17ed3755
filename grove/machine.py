"""This machine's GPUs (cheap: no torch import), Grove's per-machine folder, a worker's environment.
What of the machine enters cache keys is grove/machine_facts.py."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path


@functools.lru_cache(maxsize=None)
def gpu_names() -> tuple[str, ...]:
    """The NVIDIA GPUs nvidia-smi lists (none without it), without importing torch."""
    if not shutil.which("nvidia-smi"):
        return ()
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(line.strip() for line in listed.splitlines() if line.strip())


def gpu_count() -> int:
    return len(gpu_names())


def grove_home() -> Path:
    """Grove's per-machine folder: converted bundled models, digest memo, materialized entries."""
    return Path(os.environ.get("GROVE_HOME", Path.home() / ".cache" / "grove"))


def worker_environment() -> dict[str, str]:
    """This process's environment (CUDA settings, library paths) with Grove's own source first
    on the path, so a worker process runs the same packages whatever the working directory."""
    root = str(Path(__file__).resolve().parents[1])
    path = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
