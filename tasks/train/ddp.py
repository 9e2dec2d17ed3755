"""One process of a data-parallel training job: `torchrun --nproc_per_node N -m tasks.train.ddp REQUEST`
(on each node of a multi-node job: tasks/train/nodes.py).

Started by the train stage (tasks/train/stage.py `_fit_distributed`) when `grove.train.processes` is
above 1. Every process runs the same fit() on its share of each batch (the Trainer wraps the
model in DistributedDataParallel: NCCL on GPUs, gloo on CPUs); the main process (each node's first,
in a multi-node job) saves the adapter, the log and the summary, and marks each checkpoint it saved for the stage to store.
No Prefect run here: the stage's process owns the artifact store.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(request_file: str) -> int:
    request = json.loads(Path(request_file).read_text())
    from grove.settings import ModelSettings, TrainSettings
    from tasks.train.fit import fit

    device = request["device"]
    if device == "cuda":
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    workdir = Path(request["workdir"])
    summary = fit(TrainSettings.model_validate(request["settings"]), ModelSettings.model_validate(request["model"]),
                  Path(request["corpus"]), device, Path(request["out"]), workdir, request["checkpoint_steps"],
                  request["resume"], [checkpoint_marker(workdir)])
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # each node's first process (the main node's is read)
        (workdir / "summary.json").write_text(json.dumps(summary))
    leave_the_group()
    return 0


def checkpoint_marker(workdir: Path):
    """A callback that leaves `saved-<step>` in the work folder for each checkpoint the stage
    should store: a snapshot of the checkpoint folder in hard links (instant, no copy), which
    outlives the trainer's rotation (save_total_limit 1 deletes a checkpoint at the next save:
    on a fast job before the stage's watcher had copied it, so none was stored). Every save but
    the one at the last step, as in the single-process stage: transformers, resumed from a
    checkpoint at its last step, runs an extra step (measured: 5 steps for max_steps 4), so a job
    that died after its last save would come back with one step too many."""
    import os
    import shutil

    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class MarkSaved(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if not state.is_local_process_zero or state.global_step >= state.max_steps:
                return
            source = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            partial = workdir / f".saving-{state.global_step}"
            for path in sorted(source.rglob("*")):
                target = partial / path.relative_to(source)
                if path.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(path, target)
                    except OSError:  # another file system: a copy, as slow as the store's own
                        shutil.copy2(path, target)
            partial.rename(workdir / f"saved-{state.global_step}")  # whole, or not there

    return MarkSaved()


def leave_the_group() -> None:
    """Tear the process group down before exiting: left to the interpreter's exit, gloo's
    threads can abort a process ("terminate called without an active exception", SIGABRT;
    seen in CI), which fails the whole job after its training finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
