"""Resumable training: checkpoints in the artifact store, and a SIGKILLed run that resumes.

Store level: a checkpoint counts only with its manifest, a damaged newest one falls back to
the one before it, only the newest K are kept, and dropping them deletes the blobs nothing
else lists. End to end: `grove run` killed mid-training resumes from its last checkpoint
and ends with the adapter of an uninterrupted run; so does a data-parallel run (torchrun,
two gloo processes), whose job never hands over a checkpoint of its last step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, tiny_config
from grove.store import ArtifactStore


def blob(root: Path, sha: str) -> Path:
    return root / "blobs" / sha[:2] / sha


def has_blob(store: ArtifactStore, sha: str) -> bool:
    return store.fs.exists(store._blob_path(sha))


def checkpoint_dir(tmp_path: Path, step: int) -> Path:
    """What a Trainer checkpoint looks like to the store: per-step weights and optimizer
    state, plus a file that is the same at every step (the adapter config)."""
    folder = tmp_path / f"checkpoint-{step}"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(2000))
    (folder / "optimizer.pt").write_bytes(os.urandom(4000))
    (folder / "adapter_config.json").write_text('{"r": 4}')
    (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    return folder


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "root"))


def test_latest_checkpoint_is_the_newest_and_only_the_newest_two_are_kept(store_root, tmp_path):
    """On a local folder and on the S3 server."""
    store = ArtifactStore(store_root)
    assert store.latest_checkpoint("train", "k1") is None
    first = store.put_checkpoint("train", "k1", 2, checkpoint_dir(tmp_path, 2))
    store.put_checkpoint("train", "k1", 4, checkpoint_dir(tmp_path, 4))
    assert store.checkpoint_steps("train", "k1") == [2, 4]
    latest = store.latest_checkpoint("train", "k1")
    assert latest.step == 4 and (store.materialize(latest) / "trainer_state.json").read_text() == '{"global_step": 4}'

    store.put_checkpoint("train", "k1", 6, checkpoint_dir(tmp_path, 6))
    assert store.checkpoint_steps("train", "k1") == [4, 6]
    assert not has_blob(store, first.files["optimizer.pt"]["sha256"]), "a pruned checkpoint's blobs go"
    assert has_blob(store, first.files["adapter_config.json"]["sha256"]), "a blob still listed stays"
    assert store.lookup("train", "k1") is None and store.entries() == [], "checkpoints are not entries"


def test_checkpoint_without_manifest_never_counts(store, tmp_path):
    store.put_checkpoint("train", "k1", 2, checkpoint_dir(tmp_path, 2))
    store.put_checkpoint("train", "k1", 4, checkpoint_dir(tmp_path, 4))
    os.remove(tmp_path / "root" / "checkpoints" / "train" / "k1" / "00000004" / "MANIFEST.json")
    assert store.latest_checkpoint("train", "k1").step == 2


def test_damaged_newest_checkpoint_falls_back_to_the_one_before(store, tmp_path, caplog):
    store.put_checkpoint("train", "k1", 2, checkpoint_dir(tmp_path, 2))
    newest = store.put_checkpoint("train", "k1", 4, checkpoint_dir(tmp_path, 4))
    path = blob(tmp_path / "root", newest.files["optimizer.pt"]["sha256"])
    os.chmod(path, 0o644)
    path.write_bytes(path.read_bytes()[:100])  # a truncated upload
    assert store.latest_checkpoint("train", "k1").step == 2
    assert "optimizer.pt" in caplog.text and "falling back to step 2" in caplog.text


def test_dropping_checkpoints_keeps_what_the_entry_shares(store_root, tmp_path):
    """On a local folder and on the S3 server."""
    store = ArtifactStore(store_root)
    checkpoint = store.put_checkpoint("train", "k1", 2, checkpoint_dir(tmp_path, 2))
    view = store.materialize(store.latest_checkpoint("train", "k1"))
    output = tmp_path / "output"
    output.mkdir()
    (output / "adapter_config.json").write_text('{"r": 4}')  # the same file as in the checkpoint
    entry = store.put_dir("train", "k1", output, {})
    assert store.drop_checkpoints("train", "k1") == 1
    assert store.latest_checkpoint("train", "k1") is None and store.checkpoint_steps("train", "k1") == []
    assert not has_blob(store, checkpoint.files["optimizer.pt"]["sha256"])
    assert has_blob(store, checkpoint.files["adapter_config.json"]["sha256"])
    assert not view.exists(), "the local view of a dropped checkpoint goes too"
    assert store.lookup("train", "k1").digest == entry.digest
    assert store.drop_checkpoints("train", "k1") == 0


# ---- config: grove.checkpoint_steps ----------------------------------------------------------------
@pytest.mark.parametrize("value", [-1, "2", True, 2.5, None])
def test_checkpoint_steps_must_be_a_non_negative_whole_number(tiny_model, tmp_path, value):
    from flows.config import ConfigError, parse_config

    raw = tiny_config(tiny_model, tmp_path / "data.jsonl", tmp_path / "store", tmp_path / "out")
    raw["grove"]["checkpoint_steps"] = value
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, base_dir=ROOT)
    assert caught.value.path == "grove.checkpoint_steps"


def test_checkpoint_steps_is_no_part_of_the_train_settings(tiny_model, tmp_path, caplog):
    from conftest import TONE_DATA
    from flows.config import parse_config

    raw = tiny_config(tiny_model, TONE_DATA, tmp_path / "store", tmp_path / "out")
    default = parse_config(raw, base_dir=tmp_path)
    raw["grove"]["checkpoint_steps"] = 0
    raw["passes"]["lora"]["config"]["training_args"]["save_steps"] = 7  # Grove's to set
    off = parse_config(raw, base_dir=tmp_path)
    assert (default.checkpoint_steps, off.checkpoint_steps) == (25, 0)
    assert off.train == default.train, "the adapter does not depend on the checkpoint interval"
    assert "training_args.save_steps" in caplog.text and "grove.checkpoint_steps" in caplog.text


# ---- end to end: SIGKILL mid-training, run again, same adapter ------------------------------------
def adapter_of(root: Path) -> dict:
    from safetensors.torch import load_file

    store = ArtifactStore(str(root))
    [entry] = store.entries("train")
    return load_file(store.materialize(entry) / "adapter" / "adapter_model.safetensors")


def uninterrupted_adapter(config: Path) -> dict:
    """The pipeline's first three stages in this process (evaluate and benchmark add nothing here)."""
    from flows.config import load_config
    from tasks.load_data import load_data
    from grove.stage import RunContext, stage_run
    from tasks.template_corpus import template_corpus
    from tasks.train import train

    cfg = load_config(config)
    with stage_run(RunContext(store=ArtifactStore(cfg.artifact_root), checkpoint_steps=cfg.checkpoint_steps)):
        train(cfg.train, template_corpus(cfg.corpus, load_data(cfg.data), cfg.model), cfg.model)
    return adapter_of(Path(cfg.artifact_root))


def grove_process(config: Path, log: Path) -> subprocess.Popen:
    """`grove run` in its own process group (so the kill takes everything it started)."""
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--config", str(config)], cwd=ROOT,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def newest_checkpoint_manifests(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "store" / "checkpoints" / "train").glob("*/*/MANIFEST.json"),
                  key=lambda manifest: int(manifest.parent.name))


def kill_once_a_checkpoint_is_stored(config: Path, tmp_path: Path, min_step: int) -> dict:
    """`grove run` killed (SIGKILL, its whole process group) once the store holds a train
    checkpoint of at least `min_step`; the run must not have finished by then. Returns the
    newest stored checkpoint's manifest."""
    proc = grove_process(config, tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            stored = newest_checkpoint_manifests(tmp_path)
            if stored and int(stored[-1].parent.name) >= min_step:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert not list((tmp_path / "store" / "entries").glob("train/*/MANIFEST.json")), "killed before the end"
    return json.loads(newest_checkpoint_manifests(tmp_path)[-1].read_text())


def test_killed_training_resumes_from_its_last_checkpoint_with_the_same_adapter(tiny_model, tone_copy, tmp_path,
                                                                                write_config):
    import torch

    raw = tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out")
    del raw["passes"]["merge"], raw["passes"]["builder"]  # train is what this is about
    # 6 steps per epoch, killed in the second: resuming must replay the dropout RNG and that
    # epoch's data order, here the length-grouped one (a random order comes from accelerate's
    # sampler seeded by data_seed and the epoch)
    raw["passes"]["lora"]["config"]["training_args"].update(max_steps=16, logging_steps=4, group_by_length=True)
    raw["passes"]["lora"]["config"]["lora_dropout"] = 0.1
    raw["grove"]["checkpoint_steps"] = 2
    config = write_config(raw, "killed.json")
    checkpoints = tmp_path / "store" / "checkpoints" / "train"

    # 1. kill -9 once a checkpoint in the second epoch is stored
    last = kill_once_a_checkpoint_is_stored(config, tmp_path, min_step=8)
    optimizer_blob = tmp_path / "store" / "blobs" / last["files"]["optimizer.pt"]["sha256"][:2] / \
        last["files"]["optimizer.pt"]["sha256"]
    assert optimizer_blob.exists() and {"rng_state.pth", "scheduler.pt", "trainer_state.json",
                                        "adapter_model.safetensors"} <= set(last["files"])

    # 2. the same command again: resumes, finishes, drops the checkpoints
    proc = grove_process(config, tmp_path / "resumed.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    output = " ".join((tmp_path / "resumed.log").read_text().split())
    resumed = json.loads((tmp_path / "out" / "tiny" / "report.json").read_text())
    summary = next(s["summary"] for s in resumed["stages"] if s["stage"] == "train")
    assert summary["resumed_from_step"] == last["meta"]["step"] >= 8 and summary["steps"] == 16
    assert f"resuming from step {last['meta']['step']}" in output
    assert not list(checkpoints.glob("*/*/MANIFEST.json")) and not optimizer_blob.exists()

    # 3. the adapter of an uninterrupted run of the same config (checkpoints off) in another root
    raw["engine"] = {"cache_dir": str(tmp_path / "store2"), "output_dir": str(tmp_path / "out2")}
    raw["grove"]["checkpoint_steps"] = 0
    expected = uninterrupted_adapter(write_config(raw, "uninterrupted.json"))
    assert not (tmp_path / "store2" / "checkpoints").exists()
    got = adapter_of(tmp_path / "store")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], rtol=0, atol=1e-6), name


# ---- data-parallel training (torchrun, 2 gloo processes on the CPU) ----------------------------------------
def test_a_data_parallel_job_marks_every_checkpoint_but_the_last_steps(tmp_path):
    """Resumed from a checkpoint at its last step, transformers runs one step more: such a
    checkpoint is never stored, by the data-parallel job as by the single-process stage. Each
    snapshot is whole and outlives the trainer's rotation of its checkpoint folder."""
    import shutil
    from types import SimpleNamespace

    from tasks.train.ddp import checkpoint_marker

    output, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    marker = checkpoint_marker(work)
    for step, main in ((2, True), (4, False), (6, True), (8, True)):
        (output / f"checkpoint-{step}" / "sub").mkdir(parents=True)
        (output / f"checkpoint-{step}" / "trainer_state.json").write_text(f'{{"step": {step}}}')
        (output / f"checkpoint-{step}" / "sub" / "optimizer.pt").write_bytes(bytes([step]) * 64)
        marker.on_save(SimpleNamespace(output_dir=str(output)),
                       SimpleNamespace(global_step=step, max_steps=8, is_local_process_zero=main), None)
        shutil.rmtree(output / f"checkpoint-{step}")  # save_total_limit 1: rotated at the next save
    assert sorted(p.name for p in work.iterdir()) == ["saved-2", "saved-6"]
    assert (work / "saved-6" / "trainer_state.json").read_text() == '{"step": 6}'
    assert (work / "saved-6" / "sub" / "optimizer.pt").read_bytes() == bytes([6]) * 64


def test_a_killed_data_parallel_training_resumes_with_the_same_adapter(tiny_model, tone_copy, tmp_path,
                                                                       write_config):
    """grove.train.processes 2 on a CPU: torchrun runs DDP over gloo, the stage stores the job's
    checkpoints; killed, the same command resumes the job and ends with an uninterrupted job's
    adapter and step count."""
    import torch

    raw = tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out")
    raw["passes"] = {"lora": raw["passes"]["lora"]}  # train, evaluate, benchmark: no ONNX needed here
    raw["passes"]["lora"]["config"]["training_args"].update(max_steps=40, per_device_train_batch_size=4,
                                                            logging_steps=4)
    raw["passes"]["lora"]["config"]["lora_dropout"] = 0.1
    raw["grove"].update(device="cpu", checkpoint_steps=2, train={"processes": 2}, promotion={"enabled": False})
    config = write_config(raw, "ddp.json")

    last = kill_once_a_checkpoint_is_stored(config, tmp_path, min_step=2)
    proc = grove_process(config, tmp_path / "resumed.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    report = json.loads((tmp_path / "out" / "tiny" / "report.json").read_text())
    summary = next(s["summary"] for s in report["stages"] if s["stage"] == "train")
    assert summary["processes"] == 2 and summary["device"] == "cpu"
    assert summary["resumed_from_step"] == last["meta"]["step"] >= 2 and summary["steps"] == 40
    assert summary["final_loss"] is not None
    assert not newest_checkpoint_manifests(tmp_path), "the finished stage drops its checkpoints"

    raw["engine"] = {"cache_dir": str(tmp_path / "store2"), "output_dir": str(tmp_path / "out2")}
    raw["grove"]["checkpoint_steps"] = 0
    expected = uninterrupted_adapter(write_config(raw, "uninterrupted.json"))
    got = adapter_of(tmp_path / "store")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], rtol=0, atol=1e-6), name
