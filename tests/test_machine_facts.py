"""Machine facts in cache keys (grove/machine_facts.py): an entry made on one machine is not reused
where the device or a library the stage's numerics depend on differs, and `grove stages` says so.

Another library version is real here: a shim distribution (`transformers-<version>+shim.dist-info`)
put ahead of the installed one on sys.path is what importlib.metadata reports, as a second
installation would be. The CUDA device is the one part this CPU machine cannot have: it is asked
for in a plan (grove.device cuda), which computes keys and runs nothing.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import tiny_config


def shim_distribution(folder: Path, dist: str, version: str) -> Path:
    """A folder holding only the metadata of `dist` at `version`: first on sys.path, it is the
    version importlib.metadata finds (the package's code still comes from the real install)."""
    info = folder / f"{dist}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    return folder


@pytest.fixture
def fresh_facts():
    from grove.machine_facts import this_machine

    this_machine.cache_clear()
    yield this_machine
    this_machine.cache_clear()


def manifest(store: Path, stage: str, key: str) -> dict:
    return json.loads((store / "entries" / stage / key / "MANIFEST.json").read_text())


def test_a_cpu_entry_is_not_reused_for_another_device_or_library_version(
        tiny_model, tone_copy, tmp_path, write_config, monkeypatch, fresh_facts):
    from flows.cli import app
    from flows.config import load_config
    from grove.cache import machine_key
    from grove.stage import STAGES, RunContext, stage_run
    from grove.store import ArtifactStore
    from tasks.evaluate import evaluate
    from tasks.load_data import load_data
    from tasks.template_corpus import template_corpus

    store_dir = tmp_path / "store"
    config = write_config(tiny_config(tiny_model, tone_copy, store_dir, tmp_path / "out"))
    cfg = load_config(config)
    store = ArtifactStore(cfg.artifact_root)

    def stages(device: str, dry_run: bool = False) -> RunContext:
        context = RunContext(store=store, device=device, dry_run=dry_run)
        with stage_run(context):
            data = load_data(cfg.data)
            corpus = template_corpus(cfg.corpus, data, cfg.model)
            evaluate(cfg.evaluate, data, corpus, cfg.model)
        return context

    first = {r.stage: r for r in stages("auto").records}
    assert {r.status for r in first.values()} == {"ran"}
    scores = manifest(store_dir, "evaluate", first["evaluate"].ref.key)["meta"]
    assert scores["machine"]["device"] == "cpu" and scores["machine"]["dtype"] == "float32"
    assert scores["machine"]["libraries"]["torch"] == importlib.metadata.version("torch")
    assert machine_key(scores["settings_key"], scores["machine"]) == first["evaluate"].ref.key

    # the same settings on a CUDA machine: evaluate's key differs, the CPU-made entry is no hit
    on_cuda = {r.stage: r for r in stages("cuda", dry_run=True).records}
    assert on_cuda["load_data"].status == on_cuda["template_corpus"].status == "hit"
    assert on_cuda["evaluate"].status == "miss"
    assert on_cuda["evaluate"].reason == "stored for on cpu in float32; this machine has on cuda in bfloat16"

    # another transformers: the stages whose numerics use it miss, load_data (datasets) still hits
    real = importlib.metadata.version("transformers")
    monkeypatch.syspath_prepend(str(shim_distribution(tmp_path / "shim", "transformers", f"{real}+shim")))
    fresh_facts.cache_clear()
    assert importlib.metadata.version("transformers") == f"{real}+shim"
    shown = CliRunner().invoke(app, ["stages", "--config", str(config)])  # plain rows: not a terminal
    assert shown.exit_code == 0, shown.output
    rows = {line.split()[0]: line for line in shown.output.splitlines() if line.split() and line.split()[0] in STAGES}
    assert " hit " in rows["load_data"] and " miss " in rows["template_corpus"]
    assert f"stored for transformers {real}; this machine has transformers {real}+shim" in rows["template_corpus"]

    again = {r.stage: r for r in stages("auto").records}
    assert again["load_data"].status == "cached"
    assert again["template_corpus"].status == again["evaluate"].status == "ran"
    assert again["template_corpus"].ref.key != first["template_corpus"].ref.key
    for stage in ("template_corpus", "evaluate"):  # same settings and upstream contents, other facts
        meta = manifest(store_dir, stage, again[stage].ref.key)["meta"]
        assert meta["machine"]["libraries"]["transformers"] == f"{real}+shim"
        assert meta["settings_key"] == manifest(store_dir, stage, first[stage].ref.key)["meta"]["settings_key"]


def test_a_cuda_config_placed_on_a_gpu_pool_validates_on_a_cpu_only_orchestrator(
        tiny_model, tone_copy, tmp_path, write_config):
    """The orchestrator only dispatches: the GPU pool's child checks device cuda on its machine."""
    from flows.config import ConfigError, load_config
    from grove.machine_facts import torch_build

    if torch_build()[1] is not None:
        pytest.skip("this machine has a CUDA build of torch")
    raw = tiny_config(tiny_model, tone_copy, tmp_path / "unused", tmp_path / "out")
    raw["grove"].update(device="cuda", artifact_root="s3://grove-tests/cuda-placed",
                        placement={"default": "cpu", "stages": {"train": "gpu", "evaluate": "gpu",
                                                                "merge_adapters": "gpu", "build_onnx": "gpu"}})
    config = write_config(raw)
    assert load_config(config).device == "cuda"  # the orchestrator: no stage runs here
    assert load_config(config, here=["load_data", "template_corpus"]).device == "cuda"  # cpu pool's group
    with pytest.raises(ConfigError) as error:  # the gpu pool's child, were it this machine
        load_config(config, here=["train", "evaluate", "merge_adapters", "build_onnx"])
    assert "grove.device: cuda, but torch" in str(error.value) and "(train, evaluate would run here)" in \
        str(error.value)
    del raw["grove"]["placement"]
    raw["grove"]["artifact_root"] = str(tmp_path / "store")
    with pytest.raises(ConfigError, match="grove.device: cuda, but torch"):  # one machine runs it all
        load_config(write_config(raw, "one-pool.json"))


CHECKS_ON_A_GPU_MACHINE = """
import sys
from flows.config.checks import cuda_onnx_problem
from grove.settings import TrainSettings
from tasks.train.base import dtype_problems

qlora = TrainSettings(method="qlora", compute_dtype="bfloat16", torch_dtype="bfloat16")
print(repr(cuda_onnx_problem()))
print(dtype_problems(qlora, "cuda"))
print(sorted(m for m in ("torch", "onnxruntime", "onnxruntime_genai") if m in sys.modules))
"""


def test_a_gpu_machines_config_checks_import_neither_torch_nor_the_cuda_onnx_builds(tmp_path):
    """The checks a cached rerun makes on a GPU machine (the CUDA onnxruntime builds are installed;
    the GPU takes bfloat16) ask nvidia-smi and the packages' files, not torch or onnxruntime: each
    import (and CUDA's initialization) cost seconds of every cached rerun there. What this CPU
    machine cannot have stands in: an nvidia-smi script listing a pre-Ampere GPU, and the two CUDA
    builds as package folders holding the CUDA libraries they ship (importing them would fail)."""
    import os
    import subprocess
    import sys

    bin_dir, site = tmp_path / "bin", tmp_path / "site"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\ncase "$1" in *compute_cap*) echo "Tesla T4, 7.5";; *) echo "Tesla T4";; esac\n')
    smi.chmod(0o755)
    for package, library in (("onnxruntime", "capi/libonnxruntime_providers_cuda.so"),
                             ("onnxruntime_genai", "libonnxruntime-genai-cuda.so")):
        (site / package / library).parent.mkdir(parents=True, exist_ok=True)
        (site / package / "__init__.py").write_text("raise ImportError('a stand-in: never imported')\n")
        (site / package / library).write_bytes(b"")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(root), str(site)])}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    done = subprocess.run([sys.executable, "-c", CHECKS_ON_A_GPU_MACHINE], env=env, capture_output=True,
                          text=True, cwd=root, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    problem, dtypes, imported = done.stdout.splitlines()[-3:]
    assert problem == "None"
    assert "compute_dtype: bfloat16 is not supported by this GPU (Tesla T4" in dtypes
    assert "torch_dtype: bfloat16" in dtypes
    assert imported == "[]"
