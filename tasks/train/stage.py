"""Stage 3, train: LoRA or QLoRA (bitsandbytes nf4) with peft and the transformers Trainer.

Stores the adapter (peft format) and the training log. Olive's training_args map onto
transformers TrainingArguments (flows/config checks the names); Grove adjusts what
cannot apply on the device (half precision and paged optimizers on a CPU) with a warning.

Resumable: every `grove.checkpoint_steps` steps the Trainer writes its own checkpoint
(adapter, optimizer, scheduler, RNG states, trainer state with the step) to a local work
folder and Grove copies it to the artifact store under this stage's cache key. A run of
the same key that finds a checkpoint there resumes from it: the Trainer reloads all of
that, skips the batches already seen (the sampler is seeded by data_seed and the epoch)
and restores the RNG, so the adapter is the one an uninterrupted run gives.

On CUDA, Grove's training setup (tasks/train/cuda_setup.py, `grove.train` in the config) adds
Liger kernels, padding-free packing of line-by-line corpora and optionally torch.compile;
the 4-bit base is never upcast to fp32. A CPU trains as before.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from grove.machine_facts import training_processes
from grove.models import resolve_device
from grove.settings import ModelSettings, TrainSettings
from grove.stage import ArtifactRef, current_run, current_stage_key, grove_stage, open_artifact, output_dir
from tasks.train import ddp  # run by torchrun below: imported so the cache key covers it
from tasks.train.fit import _checkpoint_callback, _progress_callback, fit
from tasks.train.nodes import Rendezvous, torchrun_command

log = logging.getLogger("grove.train")


def _fit_distributed(settings: TrainSettings, model: ModelSettings, corpus: ArtifactRef, corpus_folder: Path,
                     device: str, out: Path, workdir: Path, checkpoint_steps: int, resume: str | None,
                     resume_step: int | None, key: str) -> dict:
    """`settings.processes` data-parallel processes on each of `settings.nodes` nodes through torchrun
    (DDP: NCCL on GPUs, gloo on CPUs), each running fit(); checkpoints this node's first process
    writes are stored here as they appear. Other nodes follow the job published in the store
    (tasks/train/nodes.py)."""
    request = {"settings": settings.model_dump(mode="json"), "model": model.model_dump(mode="json"),
               "corpus": str(corpus_folder), "device": device, "out": str(out), "workdir": str(workdir),
               "checkpoint_steps": checkpoint_steps, "resume": resume}
    (workdir / "request.json").write_text(json.dumps(request))
    store = current_run().store
    rendezvous = None
    if settings.nodes > 1:
        rendezvous = Rendezvous.from_env()
        store.put_json(rendezvous.job_path, {"request": request, "corpus_digest": corpus.digest, "key": key,
                                             "resume_step": resume_step, "endpoint": rendezvous.endpoint})
    command = torchrun_command(settings.processes, "-m", ddp.__name__, str(workdir / "request.json"),
                               nodes=settings.nodes, rendezvous=rendezvous)
    log.info("train: %s", " ".join(command))
    try:
        _watch(command, workdir, store, key)
    finally:
        if rendezvous is not None:
            store.remove(rendezvous.job_path)  # a follower started later waits for the next job
    return json.loads((workdir / "summary.json").read_text())


def _watch(command: list[str], workdir: Path, store, key: str) -> None:
    """Run the job; store the newest checkpoint it snapshots (tasks/train/ddp.py checkpoint_marker)
    as it appears, dropping older snapshots a slower store skipped."""
    import shutil
    import subprocess

    from grove.machine import worker_environment

    with open(workdir / "torchrun.log", "w") as output:
        job = subprocess.Popen(command, env=worker_environment(), stdout=output, stderr=subprocess.STDOUT)
        while job.poll() is None:
            time.sleep(1)
            snapshots = sorted(workdir.glob("saved-*"), key=lambda path: int(path.name.split("-")[1]))
            if not snapshots:
                continue
            for older in snapshots[:-1]:
                shutil.rmtree(older, ignore_errors=True)
            newest, step = snapshots[-1], int(snapshots[-1].name.split("-")[1])
            try:
                store.put_checkpoint("train", key, step, newest)
                log.info("checkpoint step %d stored", step)
            except OSError as exc:  # the store failed: the next checkpoint will do
                log.warning("checkpoint step %d not stored: %s", step, exc)
            shutil.rmtree(newest, ignore_errors=True)
    if job.returncode != 0:
        tail = (workdir / "torchrun.log").read_text()[-3000:]
        raise RuntimeError(f"the data-parallel training job failed (exit {job.returncode}):\n{tail}")


@grove_stage("train", tags=("gpu",))
def train(settings: TrainSettings, corpus: ArtifactRef, model: ModelSettings) -> dict:
    """Fine-tune LoRA/QLoRA adapters on the templated corpus; stores adapter/ and train_log.json."""
    run = current_run()
    device = resolve_device(run.device)
    # `auto` processes: one per GPU of this machine (the count is a fact of this stage's key)
    settings = settings.model_copy(update={"processes": training_processes(settings.processes, device)})
    folder = open_artifact(corpus)
    out = output_dir()
    key = current_stage_key()
    checkpoint = run.store.latest_checkpoint("train", key)  # left by an interrupted run of this key
    workdir = Path(tempfile.mkdtemp(prefix="grove-train-work-"))
    try:
        resume = None
        if checkpoint is not None:
            resume = str(run.store.materialize(checkpoint))
            log.warning("train: resuming from step %d (checkpoint stored %s)", checkpoint.step,
                        checkpoint.manifest["meta"].get("created"))
        if settings.processes > 1 or settings.nodes > 1:
            summary = _fit_distributed(settings, model, corpus, folder, device, out, workdir, run.checkpoint_steps,
                                       resume, checkpoint.step if checkpoint is not None else None, key)
        else:
            callbacks = [_progress_callback()] + ([_checkpoint_callback(key)] if run.checkpoint_steps else [])
            summary = fit(settings, model, folder, device, out, workdir, run.checkpoint_steps, resume, callbacks)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary["resumed_from_step"] = checkpoint.step if checkpoint is not None else 0
    return summary
