"""fit(): one LoRA/QLoRA training with peft and the transformers Trainer, in the stage's
process or in each process of a data-parallel job (tasks/train/ddp.py)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from grove.lm_head import labelled_logits
from grove.settings import ModelSettings, TrainSettings, cpu_training_args
from grove.stage import current_run
from grove.textdata import read_jsonl
# load_base_for_training, add_lora and disable_cpu_bf16_4bit_path are used from here by tests and benches
from tasks.train.base import add_lora, disable_cpu_bf16_4bit_path, dtype_problems, load_base_for_training, \
    training_dtypes  # noqa: F401

log = logging.getLogger("grove.train")
DEFAULT_ARGS = {"per_device_train_batch_size": 8, "learning_rate": 2e-4, "num_train_epochs": 1,
                "logging_steps": 5, "lr_scheduler_type": "linear"}


def quantization_of(model) -> dict | None:
    """What the 4-bit layers really hold (read back from bitsandbytes, not from the request)."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not layers:
        return None
    state = layers[0].weight.quant_state
    return {"layers_4bit": len(layers), "quant_type": state.quant_type,
            "double_quant": bool(getattr(state, "nested", False)),
            "compute_dtype": str(layers[0].compute_dtype).removeprefix("torch."),
            "device": layers[0].weight.device.type}


def apply_gpu_setup(base, settings: TrainSettings, device: str) -> dict:
    """Grove's CUDA training setup on the loaded base (before LoRA); returns what was applied."""
    setup = {"kernels": "none", "packing": False, "compile": False, "fp32_upcast": False}
    if device != "cuda":
        return setup
    from tasks.train.cuda_setup import apply_liger, liger_available

    base.config.use_cache = False  # no KV cache in training (a cache also hides packed sequences)
    if settings.kernels == "liger":
        if not liger_available():
            log.warning("grove.train.kernels=liger but liger-kernel is not installed "
                        "(pip install liger-kernel==0.8.5); training without it")
        elif apply_liger(base):
            setup["kernels"] = "liger"
    setup["packing"] = settings.packing
    setup["compile"] = settings.compile
    return setup


def param_dtypes(peft_model) -> dict[str, list[str]]:
    """The dtypes the trained model's weights really have: frozen (the base) and trainable."""
    found = {"frozen": set(), "trainable": set()}
    for param in peft_model.parameters():
        found["trainable" if param.requires_grad else "frozen"].add(str(param.dtype).removeprefix("torch."))
    return {kind: sorted(names) for kind, names in found.items()}


def training_arguments(settings: TrainSettings, device: str, workdir: str, has_eval: bool,
                       checkpoint_steps: int = 0):
    from transformers import TrainingArguments

    args = {**DEFAULT_ARGS, **settings.training_args}
    if device == "cpu":
        args, changed = cpu_training_args(args)
        for name, what in changed.items():
            log.warning("training_args.%s: %s", name, what)
    if training_dtypes(settings, device)["fp16_mixed"]:  # Olive's torch_dtype float16 (refused on a CPU)
        args["fp16"] = True
    if not has_eval:
        args["eval_strategy"] = "no"
    if settings.processes > 1 or settings.nodes > 1:
        # Every LoRA weight takes part in every step, so DDP's search for unused parameters
        # (the Trainer's default without gradient checkpointing) would walk the graph each step for nothing.
        args.setdefault("ddp_find_unused_parameters", False)
    if settings.nodes > 1:
        # The first process of each node saves, so the main node (the one that stores) holds the
        # adapter and checkpoints whatever global rank c10d's rendezvous gave it.
        args["save_on_each_node"] = True
    args.update(output_dir=workdir, report_to="none", save_strategy="no", disable_tqdm=True,
                use_cpu=device == "cpu", seed=settings.seed, data_seed=args.get("data_seed", settings.seed),
                remove_unused_columns=False)
    if checkpoint_steps:
        # The Trainer's full checkpoint (not save_only_model: resuming needs the optimizer,
        # scheduler and RNG), only the newest kept in the work folder.
        args.update(save_strategy="steps", save_steps=checkpoint_steps, save_total_limit=1, save_only_model=False)
    return TrainingArguments(**args)


class _Collator:
    """Pads a batch to its longest example; padded labels are ignored by the loss."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch):
        import torch

        width = max(len(e["input_ids"]) for e in batch)
        def pad(seq, value):
            return seq + [value] * (width - len(seq))
        return {
            "input_ids": torch.tensor([pad(e["input_ids"], self.pad_id) for e in batch]),
            "labels": torch.tensor([pad(e["labels"], -100) for e in batch]),
            "attention_mask": torch.tensor([pad(e.get("attention_mask", [1] * len(e["input_ids"])), 0)
                                            for e in batch]),
        }


def _progress_callback():
    from transformers import TrainerCallback

    run = current_run()

    class Progress(TrainerCallback):
        """Shows steps and loss: in the CLI's progress bar (run.on_progress) and as Prefect
        artifacts (run.publisher), both set by the flow: no display code in train's key."""

        def __init__(self):
            self.loss = None
            self.waiting = None  # a step whose progress waits for its loss to be logged
            self.started = time.monotonic()

        def on_train_begin(self, args, state, control, **kwargs):
            if run.publisher is not None:
                run.publisher.training_started()

        def on_train_end(self, args, state, control, **kwargs):
            if run.publisher is not None:
                run.publisher.training_ended(state.log_history)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = logs["loss"]
                log.info("step %d/%d loss %.4f", state.global_step, state.max_steps, self.loss)
            if self.waiting == state.global_step:
                self._show(state)

        def on_step_end(self, args, state, control, **kwargs):
            if run.publisher is not None:
                run.publisher.training_step(state.global_step, state.max_steps)
            # The Trainer logs a step's loss after its on_step_end (control.should_log is set by then):
            # a step that logs is shown from on_log, with its own loss, not the one logged before.
            self.waiting = state.global_step if control.should_log else None
            if not control.should_log:
                self._show(state)

        def _show(self, state):
            self.waiting = None
            if run.on_progress:
                run.on_progress("train", state.global_step, state.max_steps, {"loss": self.loss})

    return Progress()


def _trainer_class():
    """The Trainer, with a group_by_length data order that a resumed run can replay.

    transformers' LengthGroupedSampler draws each epoch's order from the global RNG at the
    start of the epoch, a state a run resumed mid-epoch never had (measured: a resumed
    adapter off by 2.6e-3). This one draws it from (data_seed, epoch), as accelerate's
    seedable sampler does for the default random order.
    """
    import torch
    from transformers import Trainer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
        def __init__(self, batch_size: int, lengths: list[int], seed: int):
            super().__init__(batch_size, lengths=lengths)
            self.seed, self.epoch = seed, 0

        def set_epoch(self, epoch: int) -> None:  # called by the Trainer (through accelerate) every epoch
            self.epoch = epoch

        def __iter__(self):
            self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
            return super().__iter__()

    class GroveTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """The LM head only where a label is: with a completion-only loss a batch labels a few
            answer tokens, yet the stock loss computes a vocabulary-wide logit row for every
            position (measured on the bundled SmolLM2: 3-7% of a CPU training step). Same loss,
            same gradients (tests/test_train_loss.py); the stock path everywhere else."""
            labels = inputs.get("labels")
            wrapped = self.accelerator.unwrap_model(model) is not model  # DDP & co: forward through the wrapper
            if (return_outputs or labels is None or wrapped or self.label_smoother is not None
                    or self.compute_loss_func is not None):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            shifted = labels[:, 1:]  # position t predicts token t + 1
            keep = shifted != -100
            logits = labelled_logits(model, inputs, keep) if int(keep.sum()) * 2 <= keep.numel() else None
            if logits is None:  # mostly labelled (a join corpus: nothing to save), or a model that cannot split
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            targets = shifted[keep]
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                return torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / num_items_in_batch
            return torch.nn.functional.cross_entropy(logits, targets)

        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if type(sampler) is LengthGroupedSampler:
                seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
                return EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
            return sampler

    return GroveTrainer


def _checkpoint_callback(key: str):
    """Copies each checkpoint the Trainer writes to the artifact store (newest 2 kept there)."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    store = current_run().store

    class StoreCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                # the end of training: the stage's own entry is stored next (and a resume from a
                # last-step checkpoint would run one step too many: tasks/train/ddp.py)
                return
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            started = time.monotonic()
            entry = store.put_checkpoint("train", key, state.global_step, folder)
            log.info("checkpoint step %d stored (%.1f MB in %.1f s)", state.global_step,
                     entry.size_bytes / 2**20, time.monotonic() - started)

    return StoreCheckpoints()


def fit(settings: TrainSettings, model: ModelSettings, corpus_folder: Path, device: str, out: Path,
        workdir: Path, checkpoint_steps: int, resume: str | None, callbacks: list) -> dict:
    """Load, adapt and train; the main process saves adapter/ and train_log.json into `out`.
    Runs in the stage's process, or in each process of a data-parallel job (tasks/train/ddp.py)."""
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback

    problems = dtype_problems(settings, device)
    if problems:
        raise ValueError("; ".join(problems))
    torch.manual_seed(settings.seed)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_rows = read_jsonl(corpus_folder, "train")
    eval_rows = read_jsonl(corpus_folder, "eval")
    base = load_base_for_training(model, settings, device)
    setup = apply_gpu_setup(base, settings, device)
    peft_model = add_lora(base, settings, model.adapter_path)
    if setup["compile"]:
        from tasks.train.cuda_setup import compile_layers

        compile_layers(peft_model)
    args = training_arguments(settings, device, str(workdir),
                              has_eval=settings.training_args.get("eval_strategy", "no") != "no",
                              checkpoint_steps=checkpoint_steps)
    pad_id = base.config.pad_token_id if base.config.pad_token_id is not None else 0
    collator = _Collator(pad_id)
    if setup["packing"]:
        from tasks.train.cuda_setup import PackingCollator

        collator = PackingCollator(pad_id, max(len(row["input_ids"]) for row in train_rows))
    trainer_class = _trainer_class()
    trainer = trainer_class(model=peft_model, args=args, train_dataset=Dataset.from_list(train_rows),
                            eval_dataset=Dataset.from_list(eval_rows) if args.eval_strategy != "no" else None,
                            data_collator=collator, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # progress goes through Grove's callback, not print()
    started = time.monotonic()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.monotonic() - started
    history = trainer.state.log_history
    if trainer.is_local_process_zero():  # one node: the main process; several: each node's first
        peft_model.save_pretrained(out / "adapter")
        (out / "train_log.json").write_text(json.dumps(history, indent=1))
    losses = [h["loss"] for h in history if "loss" in h]
    summary = {
        "method": settings.method,
        "device": device,
        "base_dtype": str(base.dtype).removeprefix("torch."),
        "steps": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else result.training_loss,
        "train_loss": result.training_loss,  # after a resume, transformers averages the resumed steps only
        "seconds": round(seconds, 2),  # of this run (after a resume: the resumed part)
        "trainable_params": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        "started_from": "adapter" if model.adapter_path else "fresh LoRA",
        "param_dtypes": param_dtypes(peft_model),
        "fp16_mixed": bool(args.fp16),
        "setup": setup,
        "processes": settings.processes,
        "nodes": settings.nodes,
    }
    if settings.method == "qlora":
        summary["quantization"] = quantization_of(peft_model)
    if device == "cuda":
        summary["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return summary
