"""Values that pass the schema but cannot mean what they say: a learning rate no fine-tuning
uses, a warmup as long as the training, mixed precision on a training that runs on the CPU, LoRA on more top layers than the model
has. Each is a one-line error or warning at its key path, before any work (README: Checks before any work)."""

from __future__ import annotations

from typing import Any

from flows.config.errors import ConfigError
from grove.settings import ModelSettings, TrainSettings, cpu_training_args

# LoRA and full fine-tuning with AdamW use 1e-6..1e-2 (the recipe 1e-4, Grove's default 5e-4).
# Each AdamW step moves a weight by about the learning rate: from 1 up the model is overwritten in
# a few steps, whatever the data; below 1e-7 a few hundred steps leave the adapter where it started.
LEARNING_RATE_ERROR_FROM = 1.0
LEARNING_RATE_USUAL = (1e-7, 1e-2)
USUAL = "1e-7..1e-2"


def check_learning_rate(train: TrainSettings, at: str, warn) -> None:
    """`at`: the training_args key path."""
    value = train.training_args.get("learning_rate")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        return  # not a positive number: flows/config/checks.py refuses it by its own rule
    low, high = LEARNING_RATE_USUAL
    if value >= LEARNING_RATE_ERROR_FROM:
        raise ConfigError(f"{at}.learning_rate", f"{value:g} is not a fine-tuning learning rate: each step would "
                                                 f"move every trained weight by about {value:g}, wiping out what "
                                                 f"the model knows; fine-tuning uses {USUAL} (LoRA "
                                                 f"typically 1e-4..1e-3)")
    if value > high:
        warn(f"{at}.learning_rate", f"{value:g} is above the usual fine-tuning range {USUAL}: training "
                                    f"is likely to diverge (loss rising or nan); LoRA typically uses 1e-4..1e-3")
    elif value < low:
        warn(f"{at}.learning_rate", f"{value:g} is below the usual fine-tuning range {USUAL}: the "
                                    f"adapter will barely move from where it starts")


def check_warmup(train: TrainSettings, at: str, warn) -> None:
    """warmup_steps (a whole number; below 1 transformers reads it as a ratio) at or past max_steps:
    the learning rate rises the whole run and never reaches learning_rate."""
    args = train.training_args
    warmup, steps = args.get("warmup_steps"), args.get("max_steps")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (warmup, steps)) or steps <= 0:
        return
    if warmup >= steps:
        warn(f"{at}.warmup_steps", f"{warmup}, but max_steps is {steps}: the learning rate only warms up and "
                                   f"never reaches learning_rate; give fewer warmup steps (often 5-10% of "
                                   f"max_steps)")


def cpu_training(device: str, placed: bool, on_this_machine: bool) -> str | None:
    """Why training runs on this machine's CPU (None: it does not, or this machine cannot tell).
    A placed train stage or a deploy-time check runs on another machine: left to the train stage."""
    if placed or not on_this_machine or device == "cuda":
        return None
    if device == "cpu":
        return "grove.device is cpu"
    from flows.config.checks import torch_build
    from grove.machine import gpu_count

    version, cuda = torch_build()
    if cuda is None:
        return f"torch {version} here is a CPU build"
    return None if gpu_count() else "this machine has no NVIDIA GPU (nvidia-smi finds none)"


def drop_cpu_flags(train: TrainSettings, at: str, why: str | None, warn) -> TrainSettings:
    """train without the training_args a CPU training cannot honour, each warned about at its key
    path: the resolved settings (and the train key) say what will run."""
    if why is None:
        return train
    args, changed = cpu_training_args(train.training_args)
    for name, what in changed.items():
        warn(f"{at}.{name}", f"{what} ({why})")
    return train.model_copy(update={"training_args": args}) if args != train.training_args else train


def check_top_layers(train: TrainSettings, model: ModelSettings) -> None:
    """grove.lora_top_layers against the model's decoder layers (its config.json, no weights read)."""
    if train.top_layers is None:
        return
    from grove.models import model_config

    config = model_config(model) or {}
    layers = next((config[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(config.get(k), int)),
                  None)
    if layers is not None and train.top_layers > layers:
        raise ConfigError("grove.lora_top_layers", f"{train.top_layers}, but {model.name} has {layers} decoder "
                                                   f"layers; give at most {layers}, or leave it out to adapt "
                                                   f"every layer")


def check_training(train: TrainSettings, at: str, model: ModelSettings, device: str, placed: bool,
                   on_this_machine: bool, warn) -> TrainSettings:
    """The training checks above, in order; `at`: the pass's training_args key path."""
    check_learning_rate(train, at, warn)
    check_warmup(train, at, warn)
    check_top_layers(train, model)
    return drop_cpu_flags(train, at, cpu_training(device, placed, on_this_machine), warn)
