"""A LoRA/QLoRA pass -> TrainSettings; its training_args checked against the installed transformers."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from flows.config.errors import ConfigError, did_you_mean, validate
from flows.config.fates import FATES, known_keys, sift
from flows.config.grove_section import GroveSection
from flows.config.olive import LoraPass, ModelBuilderPass, QLoraPass
from grove.settings import TrainSettings

# TrainingArguments names that older transformers/Olive used and transformers 5 renamed.
RENAMED_TRAINING_ARGS = {
    "evaluation_strategy": "eval_strategy",
    "no_cuda": "use_cpu",
    "per_gpu_train_batch_size": "per_device_train_batch_size",
    "per_gpu_eval_batch_size": "per_device_eval_batch_size",
    "warmup_ratio": "warmup_steps",
}


def lora_pass(kind: str, cfg: dict, where: str, warn) -> LoraPass:
    section = f"passes.{kind}"
    spec = validate(QLoraPass if kind == "QLoRA" else LoraPass, sift(section, cfg, where, warn), where,
                    known_keys(section), elsewhere={"ModelBuilder pass": ModelBuilderPass})
    for olive06, olive013 in (("lora_r", "r"), ("lora_alpha", "alpha")):
        a, b = getattr(spec, olive06), getattr(spec, olive013)
        if a is not None and b is not None and a != b:
            raise ConfigError(f"{where}.{olive013}", f"conflicts with {olive06} ({a} vs {b}); give one of them")
    if spec.target_modules is not None and not spec.target_modules:
        raise ConfigError(f"{where}.target_modules", "is empty: it would train no module; name the modules "
                                                     "(e.g. [\"q_proj\", \"v_proj\"]) or leave it out for every linear layer")
    return spec


def train_settings(kind: str, spec: LoraPass, where: str, grove: GroveSection, warn,
                   adapter_path: str | None = None) -> TrainSettings:
    """The pass's settings; training from an existing adapter (input_model adapter_path), the LoRA
    shape the pass leaves unset is the adapter's, and a shape it does set must match it."""
    training_args = training_args_of(spec.training_args, f"{where}.training_args", warn)
    given = {
        "r": spec.lora_r or spec.r, "alpha": spec.lora_alpha or spec.alpha, "dropout": spec.lora_dropout,
        "target_modules": spec.target_modules, "modules_to_save": spec.modules_to_save,
        "torch_dtype": spec.torch_dtype,
        "compute_dtype": getattr(spec, "compute_dtype", None), "double_quant": getattr(spec, "double_quant", None),
        "quant_type": getattr(spec, "quant_type", None),
    }
    if adapter_path is not None:
        from tasks.train.base import adapter_lora_config

        try:
            shape = adapter_lora_config(adapter_path)
        except ValueError as exc:
            raise ConfigError("input_model.adapter_path", str(exc).removeprefix("adapter_path: ")) from None
        for key in ("r", "alpha", "target_modules", "modules_to_save"):
            if given[key] is None and shape[key] is not None:
                given[key] = shape[key]
    settings = TrainSettings(
        method=kind.lower(),
        **{k: v for k, v in given.items() if v is not None},  # unset: TrainSettings' defaults
        training_args=training_args,
        seed=int(training_args.get("seed", grove.seed)),
        top_layers=grove.lora_top_layers,
        kernels=grove.train.kernels,
        packing=grove.train.packing,
        compile=grove.train.compile,
        processes=training_processes(grove, "grove.train.processes"),
        nodes=grove.train.nodes,
    )
    _check_training(settings, where, grove.device, adapter_path, spec.model_fields_set)
    return settings


def _check_training(settings: TrainSettings, where: str, device: str, adapter_path: str | None,
                    written: set[str]) -> None:
    """What the train stage would refuse after loading the model, refused here instead."""
    from tasks.train.base import adapter_conflicts, dtype_problems

    # only a dtype the config names can be refused; `auto` is the training machine's to resolve
    # (flows/config/checks.py checks it there), an explicit device is checked here
    named = settings.torch_dtype or settings.compute_dtype
    problems = dtype_problems(settings, device) if named and device != "auto" else []
    if adapter_path is not None:
        problems += adapter_conflicts(settings, adapter_path)
    if problems:
        key, _, message = problems[0].partition(": ")
        spelled = {"lora_r": "r", "lora_alpha": "alpha"}.get(key)  # name the key as the config wrote it
        raise ConfigError(f"{where}.{spelled if spelled in written else key}", message)


def training_processes(grove: GroveSection, where: str) -> int | str:
    """grove.train.processes checked; `auto` stays auto: it is resolved on the machine that trains
    (grove/machine_facts.py), and the count it resolved to is a fact of the train key."""
    value = grove.train.processes
    if value == "auto":
        return value
    if isinstance(value, bool) or value < 1:
        raise ConfigError(where, f"must be 'auto' or a whole number of at least 1, got {value!r}")
    return value


def training_args_of(args: dict[str, Any], where: str, warn) -> dict[str, Any]:
    valid = training_argument_names()
    result: dict[str, Any] = {}
    for key, value in sift("training_args", args, where, warn).items():
        if key == "group_by_length":
            if value:
                result["train_sampling_strategy"] = "group_by_length"
            continue
        name = RENAMED_TRAINING_ARGS.get(key, key)
        if name not in valid:
            hint = did_you_mean(key, valid | set(RENAMED_TRAINING_ARGS) | set(FATES["training_args"]))
            raise ConfigError(f"{where}.{key}", f"unknown training argument{hint}")
        result[name] = value
    for key in ("learning_rate", "num_train_epochs"):
        if key in result and not isinstance(result[key], (int, float)):
            raise ConfigError(f"{where}.{key}", f"must be a number, got {result[key]!r}")
    for key in ("max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "logging_steps", "eval_steps", "save_steps", "seed"):
        if key in result and (not isinstance(result[key], int) or isinstance(result[key], bool)):
            raise ConfigError(f"{where}.{key}", f"must be a whole number, got {result[key]!r}")
    return result


@functools.cache
def training_argument_names() -> frozenset[str]:
    """Field names of the installed transformers' TrainingArguments.

    Read from its source with `ast`: importing transformers (and torch) would add ~8 s to
    every validation, and a cached rerun must stay fast.
    """
    import ast
    import importlib.util

    from grove.pysource import parse_python

    spec = importlib.util.find_spec("transformers")
    source = Path(spec.submodule_search_locations[0]) / "training_args.py"
    tree = parse_python(source.read_text(), str(source))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "TrainingArguments":
            return frozenset(item.target.id for item in node.body
                             if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name))
    raise RuntimeError(f"TrainingArguments not found in {source}")
