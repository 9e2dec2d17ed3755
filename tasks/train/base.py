"""What training starts from: the base model in the dtypes asked for, and a fresh LoRA or an
existing peft adapter (Olive's input_model adapter_path) trained further.

dtype_problems and adapter_conflicts are for the config checks too: they import nothing heavy
at module level and name the Olive key each problem is about.
"""

from __future__ import annotations

import json
from pathlib import Path

from grove.machine import gpus_without_bf16
from grove.machine_facts import default_dtype as machine_default_dtype
from grove.machine_facts import visible_gpus
from grove.models import load_causal_lm, model_folder
from grove.settings import ModelSettings, TrainSettings


# ---- dtypes -------------------------------------------------------------------------------------
def default_dtype(device: str) -> str:
    """Grove's per-device dtype when the config names none (a fact of the train key)."""
    return machine_default_dtype(device)


def training_dtypes(settings: TrainSettings, device: str) -> dict:
    """The dtypes one training uses, by name: `load` for the base's (non-quantized) weights,
    `compute` for bitsandbytes (QLoRA only), `fp16_mixed` when training in fp16 autocast.

    As in Olive, torch_dtype float16 means fp16 mixed precision: the weights are loaded in
    float32 (pure fp16 training is unstable) and the Trainer runs with fp16. QLoRA's compute
    dtype is compute_dtype, else torch_dtype, else the device's default.
    """
    fp16_mixed = settings.torch_dtype == "float16"
    load = "float32" if fp16_mixed else settings.torch_dtype
    if settings.method == "lora":
        return {"load": load or default_dtype(device), "compute": None, "fp16_mixed": fp16_mixed}
    compute = settings.compute_dtype or settings.torch_dtype or default_dtype(device)
    return {"load": load or compute, "compute": compute, "fp16_mixed": fp16_mixed}


def dtype_problems(settings: TrainSettings, device: str) -> list[str]:
    """Why the dtypes asked for cannot train on `device` ("cpu", "cuda" or "auto"); empty if they can.

    A CPU has no fp16 autocast for training (the Trainer refuses fp16 there), so torch_dtype
    float16 is refused on a CPU. bfloat16 runs on CPUs (slowly where they lack bf16 instructions);
    on a GPU it needs one that supports it (checked only where a GPU is visible).
    """
    from grove.models import resolve_device

    device = resolve_device(device)
    problems = []
    if settings.torch_dtype == "float16" and device == "cpu":
        problems.append("torch_dtype: float16 means fp16 mixed-precision training, which needs a CUDA GPU; "
                        "on a CPU use bfloat16 or float32")
    if settings.torch_dtype == "float16" and settings.training_args.get("bf16"):
        problems.append("torch_dtype: float16 (fp16 mixed precision) contradicts training_args.bf16")
    if device == "cuda":
        # asked of nvidia-smi, not torch: a config check must not cost a torch import and a CUDA
        # initialization (seconds of every cached rerun on a GPU machine)
        lacking = [name for name in visible_gpus() if name in gpus_without_bf16()]
        for key in ("torch_dtype", "compute_dtype"):
            if lacking and getattr(settings, key) == "bfloat16":
                problems.append(f"{key}: bfloat16 is not supported by this GPU ({lacking[0]}: compute "
                                f"capability below 8.0); use float16 or float32")
    if settings.method == "lora" and settings.compute_dtype is not None:
        problems.append("compute_dtype: only QLoRA quantizes the base (LoRA loads it in torch_dtype)")
    return problems


def load_base_for_training(model: ModelSettings, settings: TrainSettings, device: str):
    import torch

    folder = model_folder(model)
    dtypes = training_dtypes(settings, device)
    if settings.method == "lora":
        if settings.torch_dtype is None:  # Grove's per-device default, exactly as every other stage loads it
            return load_causal_lm(folder, device, model.trust_remote_code)
        return load_causal_lm(folder, device, model.trust_remote_code, dtype=getattr(torch, dtypes["load"]))
    from transformers import BitsAndBytesConfig

    compute = getattr(torch, dtypes["compute"])
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=settings.quant_type,
                               bnb_4bit_use_double_quant=settings.double_quant, bnb_4bit_compute_dtype=compute)
    base = load_causal_lm(folder, device, model.trust_remote_code, quantization_config=quant,
                          dtype=getattr(torch, dtypes["load"]), device_map={"": device})
    disable_cpu_bf16_4bit_path(base)
    return base


def disable_cpu_bf16_4bit_path(model) -> int:
    """Keep QLoRA gradients correct on CPUs with AVX512-BF16.

    After any forward pass under no_grad, bitsandbytes repacks 4-bit weights for its
    AVX512-BF16 CPU kernel, and training then runs through gemv_4bit, which has no
    backward: the loss still falls but LoRA gradients are wrong. Turning the fast path
    off on every Linear4bit keeps the differentiable path. Returns how many were changed.
    """
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


# ---- the adapter ----------------------------------------------------------------------------------
def adapter_lora_config(adapter_folder: str | Path) -> dict:
    """The LoRA shape an existing peft adapter was trained with, in TrainSettings' terms
    (r, alpha, target_modules, modules_to_save, layers); raises ValueError if it is none."""
    config_file = Path(adapter_folder) / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"adapter_path: {adapter_folder} is not a peft adapter folder (no adapter_config.json)")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise ValueError(f"adapter_path: {config_file} is not valid JSON: {exc}") from exc
    if config.get("peft_type") != "LORA":
        raise ValueError(f"adapter_path: {config_file} holds a {config.get('peft_type')} adapter; "
                         f"only LoRA adapters can be trained further")
    targets = config.get("target_modules")
    return {"r": config.get("r"), "alpha": config.get("lora_alpha"),
            "target_modules": sorted(targets) if isinstance(targets, list) else targets,
            "modules_to_save": sorted(config["modules_to_save"]) if config.get("modules_to_save") else None,
            "layers": config.get("layers_to_transform")}


def adapter_conflicts(train_settings: TrainSettings, adapter_folder: str | Path) -> list[str]:
    """Where the LoRA pass's settings disagree with the adapter it would train further; empty if none.

    The adapter fixes the LoRA's shape (r, alpha, target modules, modules to save, layers);
    a LoRA pass asking for another shape is a config error, not something to pick a winner for.
    Settings left unset (target_modules / modules_to_save None) take the adapter's.
    """
    try:
        adapter = adapter_lora_config(adapter_folder)
    except ValueError as exc:
        return [str(exc)]
    where = f"the adapter at {adapter_folder} (adapter_config.json)"
    problems = []
    if train_settings.r != adapter["r"]:
        problems.append(f"lora_r: {train_settings.r}, but {where} has r={adapter['r']}")
    if adapter["alpha"] is None or float(train_settings.alpha) != float(adapter["alpha"]):
        problems.append(f"lora_alpha: {train_settings.alpha}, but {where} has lora_alpha={adapter['alpha']}")
    if train_settings.target_modules is not None and \
            sorted(train_settings.target_modules) != adapter["target_modules"]:
        problems.append(f"target_modules: {sorted(train_settings.target_modules)}, but {where} targets "
                        f"{adapter['target_modules']}")
    if train_settings.modules_to_save is not None and \
            sorted(train_settings.modules_to_save) != (adapter["modules_to_save"] or []):
        problems.append(f"modules_to_save: {sorted(train_settings.modules_to_save)}, but {where} saves "
                        f"{adapter['modules_to_save'] or []}")
    if train_settings.top_layers is not None and \
            (adapter["layers"] is None or len(adapter["layers"]) != train_settings.top_layers):
        problems.append(f"top_layers: {train_settings.top_layers}, but {where} adapts layers "
                        f"{adapter['layers'] if adapter['layers'] is not None else 'all'}")
    return problems


def add_lora(base, settings: TrainSettings, adapter_folder: str | Path | None = None):
    """A fresh LoRA on the base, or the adapter at adapter_folder made trainable again."""
    from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model

    if settings.method == "qlora":
        base.enable_input_require_grads()
    if adapter_folder is not None:
        problems = adapter_conflicts(settings, adapter_folder)
        if problems:
            raise ValueError("; ".join(problems))
        config = PeftConfig.from_pretrained(str(adapter_folder))
        # The adapter fixes the shape; dropout only shapes training, so the LoRA pass's applies.
        config.lora_dropout = settings.dropout
        return PeftModel.from_pretrained(base, str(adapter_folder), config=config, is_trainable=True)
    layers = None
    if settings.top_layers:
        # Backward stops at the lowest layer with LoRA: adapting only the top layers cuts
        # the cost of a step roughly in half on a CPU (measured on SmolLM2: 2.6 s -> 1.5 s).
        total = base.config.num_hidden_layers
        layers = list(range(max(total - settings.top_layers, 0), total))
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_modules or "all-linear", bias="none",
                        task_type="CAUSAL_LM", layers_to_transform=layers,
                        modules_to_save=settings.modules_to_save)
    return get_peft_model(base, config)
