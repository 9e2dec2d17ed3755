"""This machine's GPUs (cheap: no torch import), Grove's per-machine folder, a worker's environment.
What of the machine enters cache keys is grove/machine_facts.py."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path


@functools.lru_cache(maxsize=None)
def gpus() -> tuple[tuple[str, float | None], ...]:
    """(name, compute capability) of each NVIDIA GPU nvidia-smi lists (none without it), in one
    nvidia-smi call and without importing torch: importing it and initializing CUDA to ask the
    same cost a cached rerun seconds on a GPU machine."""
    listed = _nvidia_smi("name,compute_cap") or _nvidia_smi("name")  # compute_cap: drivers from 510 on
    found = []
    for line in filter(None, (line.strip() for line in listed.splitlines())):
        name, _, capability = line.rpartition(",")
        try:
            found.append((name.strip(), float(capability)))
        except ValueError:  # listed by name alone
            found.append((line, None))
    return tuple(found)


def _nvidia_smi(fields: str) -> str:
    if not shutil.which("nvidia-smi"):
        return ""
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout if done.returncode == 0 else ""


def gpu_names() -> tuple[str, ...]:
    """The NVIDIA GPUs nvidia-smi lists (none without it), without importing torch."""
    return tuple(name for name, _ in gpus())


def gpus_without_bf16() -> list[str]:
    """The listed GPUs with no bfloat16 arithmetic (compute capability below 8.0, before Ampere)."""
    return [name for name, capability in gpus() if capability is not None and capability < 8.0]


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
