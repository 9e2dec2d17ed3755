"""input_model -> ModelSettings (with the adapter training starts from), and systems checked."""

from __future__ import annotations

from typing import Any

from flows.config.errors import ConfigError, validate
from flows.config.fates import known_keys, sift
from flows.config.olive import Accelerator, Engine, HfConfig, InputModel, PyTorchModelConfig, System, SystemConfig
from flows.config.sources import NOT_HERE, Sources
from grove.settings import ModelSettings


def model_settings(raw: Any, sources: Sources, warn) -> ModelSettings:
    if raw is None:
        raise ConfigError("input_model", "is required")
    if isinstance(raw, dict):
        raw = sift("input_model", raw, "input_model", warn)
    spec = validate(InputModel, raw, "input_model", known_keys("input_model"))
    if spec.type not in ("PyTorchModel", "HfModel"):
        raise ConfigError("input_model.type", f"unsupported model type {spec.type!r}; use HfModel or PyTorchModel")
    where, model_path, adapter = "input_model.model_path", spec.model_path, ("input_model.adapter_path", spec.adapter_path)
    load_args = spec.load_kwargs or spec.model_loading_args or {}
    formats = [("input_model.model_file_format", spec.model_file_format)]
    if spec.config is not None:
        config = validate(PyTorchModelConfig, sift("input_model.config", spec.config, "input_model.config", warn),
                          "input_model.config", known_keys("input_model.config"))
        if config.hf_config is not None:
            at = "input_model.config.hf_config"
            hf = validate(HfConfig, sift(at, config.hf_config, at, warn), at, known_keys(at))
            model_path, where = hf.model_name, f"{at}.model_name"
            load_args = hf.from_pretrained_args or hf.model_loading_args or {}
        elif config.model_path is not None:
            model_path, where = config.model_path, "input_model.config.model_path"
        if config.adapter_path is not None:
            adapter = ("input_model.config.adapter_path", config.adapter_path)
        formats.append(("input_model.config.model_file_format", config.model_file_format))
    for at, value in formats:
        if value == "PyTorch.MLflow":
            raise ConfigError(at, f"PyTorch.MLflow (Azure ML) models {NOT_HERE}")
    for key in set(spec.load_kwargs or {}) - {"trust_remote_code"}:
        warn(f"input_model.load_kwargs.{key}", "has no effect in Grove: the train stage picks dtype and "
                                               "placement (see passes.*.torch_dtype)")
    if isinstance(model_path, dict):
        kind = str(model_path.get("type", ""))
        if kind.startswith("azureml"):
            raise ConfigError(where, f"{kind} models {NOT_HERE}")
        raise ConfigError(where, f"unsupported model reference type {kind!r}; use a local folder path")
    if not model_path:
        raise ConfigError(where, "is required")
    model = sources.model(str(model_path), where, bool(load_args.get("trust_remote_code", False)))
    if adapter[1] is not None:
        path, digest = sources.adapter(adapter[1], adapter[0])
        model = model.model_copy(update={"adapter_path": path, "adapter_sha256": digest})
    return model


def check_systems(systems: Any, engine: Engine, warn) -> dict[str, dict]:
    """The systems, checked; returned with their warned keys taken out (for the execution provider)."""
    if not isinstance(systems, dict):
        raise ConfigError("systems", "must be a mapping of system name to system config")
    kept = {}
    for name, system in systems.items():
        where = f"systems.{name}"
        system = sift("systems.*", system, where, warn) if isinstance(system, dict) else system
        spec = validate(System, system, where, known_keys("systems.*"))
        if spec.accelerators is not None:
            system = {**system, "accelerators": accelerators(spec.accelerators, f"{where}.accelerators", warn)}
        if spec.type.lower() in ("azureml", "azureml_system", "aml"):
            raise ConfigError(f"{where}.type", "Azure ML systems are not supported: Grove runs locally or on "
                                               "Prefect workers; use a LocalSystem")
        if spec.type not in ("LocalSystem", "PythonEnvironment"):
            raise ConfigError(f"{where}.type", f"unknown system type {spec.type!r}; Grove supports LocalSystem")
        if spec.config is not None:
            at = f"{where}.config"
            config = sift("systems.*.config", spec.config, at, warn)
            nested = validate(SystemConfig, config, at, known_keys("systems.*.config"))
            if nested.accelerators is not None:
                config = {**config, "accelerators": accelerators(nested.accelerators, f"{at}.accelerators", warn)}
            system = {**system, "config": config}
        kept[name] = system
    for key in ("host", "target"):
        ref = getattr(engine, key)
        if isinstance(ref, str) and ref not in systems:
            raise ConfigError(f"engine.{key}", f"refers to system {ref!r}, which is not in systems "
                                               f"(have: {', '.join(systems) or 'none'})")
    return kept


def accelerator_providers(accelerator: dict) -> list:
    """The execution providers an accelerator names, or the one Olive picks for a gpu that names none."""
    inferred = ["CUDAExecutionProvider"] if str(accelerator.get("device")).lower() == "gpu" else []
    return accelerator.get("execution_providers") or inferred


def accelerators(items: list, where: str, warn) -> list[dict]:
    """A system's accelerators, each sifted and checked; what Olive accepts and Grove can build for."""
    kept = []
    for index, item in enumerate(items):
        at = f"{where}[{index}]"
        if isinstance(item, dict):
            item = sift("systems.*.accelerators[]", item, at, warn)
        spec = validate(Accelerator, item, at, known_keys("systems.*.accelerators[]"))
        if spec.device is None and not spec.execution_providers:
            raise ConfigError(at, "names neither a device nor execution_providers; give one (e.g. device: cpu)")
        if spec.device is not None and spec.device.lower() not in ("cpu", "gpu"):
            raise ConfigError(f"{at}.device", f"{spec.device!r}: Grove builds for CPU or CUDA; use cpu or gpu")
        kept.append(item)
    return kept
