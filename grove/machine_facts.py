"""Machine facts: what changes a stage's output from one machine to another, written once.

A stage's cache key (grove/cache.py) is its settings key (name, code, settings, upstream
contents) combined with the facts of the machine that runs the stage:

- the versions of the libraries the stage's numerics depend on (`STAGE_LIBRARIES`; a library
  that is not installed is left out, so installing liger-kernel changes the train key);
- for the stages that compute on a device (`DEVICE_STAGES`): the resolved device (`auto` ->
  cuda or cpu) and the dtype models load in there;
- train with `grove.train.processes: auto`: the number of processes that auto means there;
- benchmark: the machine description (CPU model and usable cores, GPUs), as timings are the
  machine's.

Everything here is read on the machine that runs the stage, never where a config is parsed:
`this_machine()` is the profile of this process's machine (library versions from
importlib.metadata, CPUs this process may use, visible GPUs), and `stage_facts` turns a profile
into one stage's facts. A placed run (flows/placement.py) computes a pool's keys from the
profile that pool's last child run stored, so parent and child agree without either guessing.

Nothing here imports torch (a cached rerun must stay fast): the device comes from torch's
build (torch/version.py) and the GPUs nvidia-smi lists, limited by CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Any

from grove.machine import gpu_names

# Libraries whose versions change a stage's output. An entry with alternatives (a CPU and a
# CUDA build of one library) records whichever is installed, under its own name.
MODEL_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "liger-kernel")
ONNX_LIBRARIES = ("onnxruntime-genai", "onnxruntime-genai-cuda", "onnxruntime", "onnxruntime-gpu")
STAGE_LIBRARIES: dict[str, tuple[str, ...]] = {
    "load_data": ("datasets", "pyarrow"),
    "template_corpus": ("transformers", "tokenizers", "jinja2"),  # chat templates render with jinja2
    "train": MODEL_LIBRARIES,
    "evaluate": (*MODEL_LIBRARIES, "sacrebleu", "lm-eval"),  # chrF of free-text answers, lm_eval_tasks
    "merge_adapters": MODEL_LIBRARIES,
    "build_onnx": (*ONNX_LIBRARIES, "onnx", "onnx-ir", "transformers", "torch", "peft", "sacrebleu", "lm-eval"),
    "benchmark": (*ONNX_LIBRARIES, "torch", "transformers"),
}
# Stages that load models on the run's device (merge_adapters always merges on the CPU in float32;
# build_onnx's provider is a setting).
DEVICE_STAGES = ("train", "evaluate", "benchmark")


# ---- this machine ---------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_build() -> tuple[str, str | None]:
    """torch's version and the CUDA version it was built for (None: a CPU build), read from
    torch/version.py: importing torch costs seconds."""
    from grove.pysource import parse_python

    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return "none", None
    values: dict[str, Any] = {}
    for node in parse_python((Path(spec.origin).parent / "version.py").read_text()).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and isinstance(getattr(node, "value", None), ast.Constant):
            values[target.id] = node.value.value
    return values.get("__version__", "?"), values.get("cuda")


def visible_gpus() -> list[str]:
    """The GPUs a CUDA program here would see: nvidia-smi's list, limited by CUDA_VISIBLE_DEVICES."""
    gpus = list(gpu_names())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return gpus
    chosen = [item.strip() for item in visible.split(",") if item.strip()]
    if not chosen or chosen[0].startswith("-1"):
        return []
    names = []
    for item in chosen:
        if item.isdigit() and int(item) < len(gpus):
            names.append(gpus[int(item)])
        elif not item.isdigit() and gpus:  # a UUID or MIG name: one of the listed GPUs
            names.append(gpus[0])
    return names


def usable_cpus() -> int:
    """The cores this process may run on (its affinity: a container's or taskset's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")),
                        "unknown cpu")
    except OSError:
        return "unknown cpu"


@functools.lru_cache(maxsize=None)
def this_machine() -> dict[str, Any]:
    """The profile of the machine this process runs on: what every stage's facts are made of.
    JSON-ready: a placed child run stores it for its parent (flows/placement.py)."""
    wanted = sorted({dist for dists in STAGE_LIBRARIES.values() for dist in dists})
    gpus = visible_gpus()
    return {"libraries": {dist: version for dist in wanted if (version := _version(dist)) is not None},
            "torch_cuda": torch_build()[1] is not None, "gpus": gpus, "cpu": cpu_model(), "cpus": usable_cpus()}


# ---- one stage's facts ----------------------------------------------------------------------------
def resolve_device(requested: str, machine: dict[str, Any] | None = None) -> str:
    """grove.device on a machine: `auto` is cuda where a CUDA build of torch sees a GPU, else cpu."""
    if requested != "auto":
        return requested
    machine = machine or this_machine()
    return "cuda" if machine["torch_cuda"] and machine["gpus"] else "cpu"


def default_dtype(device: str) -> str:
    """The dtype models load in when the config names none (grove/models.py load_causal_lm's)."""
    return "bfloat16" if device == "cuda" else "float32"


def training_processes(requested: int | str, device: str, machine: dict[str, Any] | None = None) -> int:
    """grove.train.processes on a machine: `auto` is one per visible GPU when training on CUDA, else 1."""
    if requested != "auto":
        return int(requested)
    machine = machine or this_machine()
    return max(len(machine["gpus"]), 1) if device == "cuda" else 1


def machine_description(device: str, machine: dict[str, Any] | None = None) -> str:
    """The hardware a benchmark measures on: CPU model and usable cores, and the GPUs on CUDA."""
    machine = machine or this_machine()
    description = f"{machine['cpu']} x{machine['cpus']}"
    if device != "cpu" and machine["gpus"]:
        description += f"; {len(machine['gpus'])}x {machine['gpus'][0]}"
    return description


def stage_facts(stage: str, device: str, params: dict[str, Any], machine: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """What of `machine` (this one by default) changes `stage`'s output, for the requested
    grove.device and the stage's parameters: part of its cache key, recorded in its entry."""
    machine = machine or this_machine()
    libraries = machine["libraries"]
    facts: dict[str, Any] = {"libraries": {d: libraries[d] for d in STAGE_LIBRARIES[stage] if d in libraries}}
    if stage in DEVICE_STAGES:
        resolved = resolve_device(device, machine)
        facts.update(device=resolved, dtype=default_dtype(resolved))
        settings = params.get("settings")
        if stage == "train" and getattr(settings, "processes", None) == "auto":
            facts["processes"] = training_processes("auto", resolved, machine)
        if stage == "benchmark":
            facts["machine"] = machine_description(resolved, machine)
    return facts


def differences(stored: dict[str, Any], here: dict[str, Any], where: str = "this machine") -> str:
    """Why an entry of the same settings was not reused, e.g. "stored for transformers 5.16.0 on
    cuda; this machine has transformers 5.17.0 on cpu"."""
    old, new = stored.get("libraries", {}), here.get("libraries", {})
    changed = [d for d in sorted(set(old) | set(new)) if old.get(d) != new.get(d)]
    was = [", ".join(f"{d} {old.get(d, 'not installed')}" for d in changed)]
    now = [", ".join(f"{d} {new.get(d, 'not installed')}" for d in changed)]
    for fact, spelled in (("device", "on {}"), ("dtype", "in {}"), ("processes", "with {} processes"),
                          ("machine", "measured on {}")):
        if stored.get(fact) != here.get(fact):
            was.append(spelled.format(stored.get(fact, "?")))
            now.append(spelled.format(here.get(fact, "?")))
    if not any(was):
        return ""
    return f"stored for {' '.join(filter(None, was))}; {where} has {' '.join(filter(None, now))}"
