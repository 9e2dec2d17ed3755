"""Everything knowable before compute, checked before compute.

parse_config turns the Olive schema into the typed RunConfig and refuses what one key alone
can tell. These checks need more: values taken together (training arguments), this machine
(folders, installed runtimes, a GPU), the data files read through, and the model's module names
(for LoRA's target_modules). Each failure is one line naming the key path or `file:line`.

Ordered by cost: values and names first, then folders and data files, then runtimes, and the
model's module names last (a torch import, remembered per model in GROVE_HOME). A config
checked once in a process is not checked again (`grove run` loads it in the CLI and in the flow).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

from flows.config.answer_checks import warn_about_answers
from flows.config.errors import ConfigError, did_you_mean
from flows.config.input_model import accelerator_providers
from flows.config.training import RENAMED_TRAINING_ARGS
from grove.data_check import check_data
from grove.machine_facts import DEVICE_STAGES, torch_build
from grove.settings import RunConfig
from grove.stage import STAGES

# Execution providers Grove builds for (tasks/build_onnx): the Olive name -> BuildSettings' name.
BUILD_PROVIDERS = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda"}
# Modules peft's LoRA can adapt (peft.tuners.lora.model: dispatchers for these types).
LORA_TYPES = {"Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "MultiheadAttention"}
_checked: set[str] = set()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# TrainingArguments' numeric settings: (test, what the value must be). Transformers would refuse
# some only when the Trainer starts, others never (a negative learning rate trains backwards).
TRAINING_VALUES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "learning_rate": (lambda v: v > 0, "a number above 0"),
    "num_train_epochs": (lambda v: v > 0, "a number above 0"),
    "max_steps": (lambda v: v == -1 or (v >= 1 and v == int(v)), "a whole number of at least 1, or -1 "
                                                                   "(train num_train_epochs)"),
    "per_device_train_batch_size": (lambda v: v >= 1 and v == int(v), "a whole number of at least 1"),
    "per_device_eval_batch_size": (lambda v: v >= 1 and v == int(v), "a whole number of at least 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1 and v == int(v), "a whole number of at least 1"),
    "warmup_steps": (lambda v: v >= 0, "0 or more (below 1: a fraction of the steps)"),
    "weight_decay": (lambda v: v >= 0, "0 or more"),
    "max_grad_norm": (lambda v: v >= 0, "0 or more"),
    "logging_steps": (lambda v: v > 0, "above 0"),
    "eval_steps": (lambda v: v > 0, "above 0"),
    "adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "adam_epsilon": (lambda v: v > 0, "above 0"),
    "label_smoothing_factor": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "dataloader_num_workers": (lambda v: v >= 0 and v == int(v), "a whole number, 0 or more"),
    "seed": (lambda v: 0 <= v < 2**32 and v == int(v), "a whole number in [0, 2**32)"),
    "data_seed": (lambda v: 0 <= v < 2**32 and v == int(v), "a whole number in [0, 2**32)"),
}


def check_run_config(config: RunConfig, raw: dict, source: str, on_this_machine: bool = True,
                     here: frozenset[str] = frozenset(STAGES),
                     warn: Callable[[str, str], None] | None = None) -> RunConfig:
    """Raise ConfigError (a key path) or UserError (file:line) at the first problem.

    on_this_machine=False (deploy-time checks): only what does not depend on the machine that
    runs the flow; its folders, data and runtimes are the worker's. `here`: the stages that run
    on this machine; the hardware and runtimes of the others are their machines' to check (a
    placed run's orchestrator only dispatches, each child checks its own group)."""
    memo = hashlib.sha256(f"{on_this_machine}{sorted(here)}{config.model_dump_json()}".encode()).hexdigest()
    if memo in _checked:
        return config
    where = _Where(raw)
    try:
        _check_data_config_names(raw)
        _check_training_values(config, where)
        _check_providers(config, where)
        _check_generation_lengths(config)
        if on_this_machine:
            _check_folders(config, where)
            _check_data_files(config, warn)
            _check_runtimes(config, where, here)
            _check_modules(config, where)
    except ConfigError as exc:
        if exc.source is None:
            raise ConfigError(exc.path, exc.message, source) from None
        raise
    _checked.add(memo)
    return config


class _Where:
    """Key paths as the user wrote them (either dialect: options under `config` or not)."""

    def __init__(self, raw: dict):
        self.raw = raw
        passes = raw.get("passes") if isinstance(raw.get("passes"), dict) else {}
        self.passes = {name: item for name, item in passes.items() if isinstance(item, dict)}

    def pass_of(self, *kinds: str) -> tuple[str, dict]:
        for name, item in self.passes.items():
            if item.get("type") in kinds:
                body = item["config"] if isinstance(item.get("config"), dict) else item
                return f"passes.{name}" + (".config" if "config" in item else ""), body
        return "passes", {}

    def engine(self, key: str) -> str:
        return f"engine.{key}" if key in (self.raw.get("engine") or {}) else key

    def artifact_root(self) -> str:
        if "artifact_root" in (self.raw.get("grove") or {}):
            return "grove.artifact_root"
        return self.engine("cache_dir")

    def providers(self) -> list[tuple[str, Any]]:
        """(key path, name) of every execution provider the config names."""
        found = [(f"{self.engine('execution_providers')}[{i}]", ep)
                 for i, ep in enumerate((self.raw.get("engine") or {}).get("execution_providers")
                                        or self.raw.get("execution_providers") or [])]
        for name, system in (self.raw.get("systems") or {}).items():
            for level, body in (("", system), (".config", system.get("config") or {})):
                for a, acc in enumerate(body.get("accelerators") or []):
                    at = f"systems.{name}{level}.accelerators[{a}]"
                    named = bool(acc.get("execution_providers"))  # else the device's, as Olive picks it
                    for e, ep in enumerate(accelerator_providers(acc)):
                        found.append((f"{at}.execution_providers[{e}]" if named else f"{at}.device", ep))
        return found


def _check_data_config_names(raw: dict) -> None:
    first: dict[str, int] = {}
    for index, item in enumerate(raw.get("data_configs") or []):
        name = item.get("name") if isinstance(item, dict) else None
        if name in first:
            raise ConfigError(f"data_configs[{index}].name", f"{name!r} is already the name of "
                                                              f"data_configs[{first[name]}]; names must be unique")
        first[name] = index


def _check_training_values(config: RunConfig, where: _Where) -> None:
    for key, value in (("grove.seed", config.seed),):
        if not 0 <= value < 2**32:
            raise ConfigError(key, f"must be a whole number in [0, 2**32), got {value}")
    if config.train is None:
        return
    at, body = where.pass_of("LoRA", "QLoRA")
    written = body.get("training_args") or {}
    args = config.train.training_args
    for key, (valid, requirement) in TRAINING_VALUES.items():
        if key not in args:
            continue
        original = next((k for k in written if RENAMED_TRAINING_ARGS.get(k, k) == key), key)
        value = args[key]
        if not _number(value) or not valid(value):
            raise ConfigError(f"{at}.training_args.{original}", f"must be {requirement}, got {value!r}")
    if args.get("max_steps", -1) == -1 and "num_train_epochs" in args and args["num_train_epochs"] <= 0:
        raise ConfigError(f"{at}.training_args.num_train_epochs", "must be above 0 when max_steps is not set")


def _check_generation_lengths(config: RunConfig) -> None:
    """New tokens fit the model's context after a prompt: onnxruntime-genai refuses a max_length
    above it ('cannot be greater than model context_length'), which failed build_onnx after training."""
    from grove.models import model_config

    context = (model_config(config.model) or {}).get("max_position_embeddings")
    if not isinstance(context, int):
        return
    for key, value in (("grove.evaluate.max_new_tokens", config.evaluate.max_new_tokens),
                       ("grove.benchmark.max_new_tokens", config.benchmark.max_new_tokens)):
        if value is not None and value >= context:
            raise ConfigError(key, f"{value} new tokens do not fit the model's context of {context} tokens "
                                   f"(max_position_embeddings in its config.json) after a prompt; give fewer")


def _check_providers(config: RunConfig, where: _Where) -> None:
    named = [(at, ep) for at, ep in where.providers()]
    unknown = [(at, ep) for at, ep in named if ep not in BUILD_PROVIDERS]
    if not unknown:
        return
    import onnxruntime

    known = onnxruntime.get_all_providers()
    for at, ep in unknown:
        if ep not in known:
            # onnxruntime's whole list (19 names) would bury the two a Grove build can use
            raise ConfigError(at, f"unknown execution provider {ep!r}{did_you_mean(str(ep), known)}; "
                                  f"Grove builds for {' or '.join(BUILD_PROVIDERS)}")
        if config.build is not None:
            raise ConfigError(at, f"{ep} is not built for here: Grove builds for "
                                  f"{' or '.join(BUILD_PROVIDERS)}")


def _check_folders(config: RunConfig, where: _Where) -> None:
    _usable_folder(config.output_dir, where.engine("output_dir"))
    _usable_folder(config.artifact_root, where.artifact_root())


def refuse_keys_in_url(url: str, at: str) -> None:
    """A store URL with user:password@ (never echoed: the message would print them)."""
    from urllib.parse import urlsplit

    if urlsplit(url).username or urlsplit(url).password:
        raise ConfigError(at, "holds keys in the URL (user:password@); s3fs does not read them there and Grove "
                              "would print and record them: give them as AWS_ACCESS_KEY_ID / "
                              "AWS_SECRET_ACCESS_KEY or grove.aws_credentials_block")


def _usable_folder(path: str, at: str) -> None:
    """A local folder that exists and is writable, or can be made: checked without making it."""
    if "://" in path:
        refuse_keys_in_url(path, at)
        return  # the store says itself (check_writable) before anything is written
    folder = Path(path)
    if folder.exists():
        if not folder.is_dir():
            raise ConfigError(at, f"{path} is a file; a folder is needed")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(at, f"folder {path} is not writable here")
        return
    parent = folder.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(at, f"cannot make folder {path}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(at, f"cannot make folder {path}: {parent} is not writable here")


def _check_data_files(config: RunConfig, warn: Callable[[str, str], None] | None) -> None:
    """Local data read through now; remote data is read the same way first thing in load_data."""
    data = config.data
    files = data.files + (data.eval_files or [])
    if any("://" in f for f in files):
        return
    answers: list[str] = []
    blank: list[str] = []
    check_data(data.files, data.format, data.text_cols, data.eval_size, data.eval_files, data.max_samples,
               answers=answers, blank_answers=blank)
    if warn:
        warn_about_answers(config, answers, blank, warn)


def _check_runtimes(config: RunConfig, where: _Where, here: frozenset[str]) -> None:
    if config.device == "cuda" and here & set(DEVICE_STAGES):
        from grove.machine_facts import visible_gpus

        version, cuda = torch_build()
        why = "is a CPU build" if cuda is None else None if visible_gpus() else "finds no NVIDIA GPU (nvidia-smi)"
        if why:
            stages = ", ".join(s for s in STAGES if s in here and s in DEVICE_STAGES)
            raise ConfigError("grove.device", f"cuda, but torch {version} here {why} ({stages} would run here); "
                                              f"set device auto or cpu (LoRA and QLoRA train on a CPU too)")
    if config.train is not None and "train" in here:
        _check_dtypes(config, where)
    if config.train is not None and config.train.method == "qlora" and "train" in here:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(where.pass_of("QLoRA")[0].removesuffix(".config") + ".type",
                              f"QLoRA needs bitsandbytes: pip install {pinned('bitsandbytes')}")
    builds = [config.build] if config.build else []
    builds += [c.build for c in config.search.candidates] if config.search else []
    if any(b.execution_provider == "cuda" for b in builds) and here & {"build_onnx", "benchmark"}:
        problem = cuda_onnx_problem()
        if problem:
            at = next((a for a, ep in where.providers() if ep == "CUDAExecutionProvider"), "engine.execution_providers")
            raise ConfigError(at, problem)


def _check_dtypes(config: RunConfig, where: _Where) -> None:
    """The dtypes the config names, on the device training resolves to here (`auto` included)."""
    from tasks.train.base import dtype_problems

    if not (config.train.torch_dtype or config.train.compute_dtype):
        return
    problems = dtype_problems(config.train, config.device)
    if problems:
        key, _, message = problems[0].partition(": ")
        raise ConfigError(f"{where.pass_of('LoRA', 'QLoRA')[0]}.{key}", message)


def cuda_onnx_problem() -> str | None:
    """Why CUDA ONNX builds cannot run here (None: they can), with the command that fixes it."""
    import importlib.metadata

    if cuda_onnx_builds_installed():
        return None
    import onnxruntime
    import onnxruntime_genai

    from grove.machine import gpu_count

    ort_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    genai_cuda = onnxruntime_genai.is_cuda_available()
    if ort_cuda and genai_cuda:
        return None
    installed = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    cpu_builds = [name for name in ("onnxruntime", "onnxruntime-genai") if name in installed]
    fix = f"pip uninstall -y {' '.join(cpu_builds)} && " if cpu_builds else ""
    fix += f"pip install {pinned('onnxruntime-gpu')} {pinned('onnxruntime-genai-cuda')}"
    have = [f"onnxruntime {onnxruntime.__version__} ({'with' if ort_cuda else 'no'} CUDAExecutionProvider)",
            f"onnxruntime-genai {onnxruntime_genai.__version__} ({'CUDA' if genai_cuda else 'CPU'} build)"]
    gpu = "" if gpu_count() else "; and this machine has no NVIDIA GPU (nvidia-smi finds none)"
    return (f"CUDAExecutionProvider builds need the CUDA builds of onnxruntime and onnxruntime-genai; "
            f"here: {', '.join(have)}. Fix: {fix}{gpu}")


def cuda_onnx_builds_installed() -> bool:
    """Whether the installed onnxruntime and onnxruntime-genai are their CUDA builds, read from the
    libraries each ships (what get_available_providers and is_cuda_available report) without
    importing them: onnxruntime-gpu and onnxruntime-genai-cuda load hundreds of MB of CUDA code,
    seconds of every cached rerun on a GPU machine."""
    import importlib.util

    def package_folder(name: str) -> Path | None:
        spec = importlib.util.find_spec(name)
        return Path(spec.origin).parent if spec is not None and spec.origin else None

    runtime, genai = package_folder("onnxruntime"), package_folder("onnxruntime_genai")
    if runtime is None or genai is None:
        return False
    ort_cuda = any((runtime / "capi").glob("*onnxruntime_providers_cuda.*"))
    genai_cuda = any(genai.glob("*onnxruntime-genai-cuda.*"))
    return ort_cuda and genai_cuda


def pinned(package: str) -> str:
    """`name==version` as pyproject.toml pins it (the [cuda] extra included): defined once there."""
    import re

    requirements: list[str] = []
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        project = tomllib.loads(pyproject.read_text())["project"]
        requirements = project["dependencies"] + [r for extra in project.get("optional-dependencies", {}).values()
                                                  for r in extra]
    else:
        import importlib.metadata

        requirements = importlib.metadata.requires("grove") or []
    for requirement in requirements:
        match = re.match(r"([A-Za-z0-9_.-]+)\s*==\s*([^;\s]+)", requirement)
        if match and match.group(1).lower() == package:
            return f"{package}=={match.group(2)}"
    return package


def _check_modules(config: RunConfig, where: _Where) -> None:
    """target_modules and modules_to_save name modules the model has (peft's suffix match)."""
    if config.train is None:
        return
    at, body = where.pass_of("LoRA", "QLoRA")
    wanted = {"target_modules": [t for t in (config.train.target_modules or []) if t != "all-linear"],
              "modules_to_save": list(config.train.modules_to_save or body.get("modules_to_save") or [])}
    if not any(wanted.values()):
        return
    from grove.models import module_types

    try:
        types = module_types(config.model)
    except Exception as exc:  # noqa: BLE001 - cannot tell here; training will say
        import logging

        logging.getLogger("grove.config").warning("could not list %s's modules to check target_modules: %s: %s",
                                                  config.model.name, type(exc).__name__, exc)
        return
    adaptable = sorted({n.rsplit(".", 1)[-1] for n, kind in types.items() if kind in LORA_TYPES})
    for key, targets in wanted.items():
        for index, target in enumerate(targets):
            matched = [n for n in types if n == target or n.endswith("." + target)]
            path = f"{at}.{key}[{index}]"
            if not matched:
                leaves = sorted({n.rsplit(".", 1)[-1] for n in types})
                hint = did_you_mean(target.rsplit(".", 1)[-1], leaves)
                raise ConfigError(path, f"{target!r} is not a module of {config.model.name}{hint}; "
                                        f"its layers LoRA can adapt: {', '.join(adaptable)}")
            if key == "target_modules" and not any(types[n] in LORA_TYPES for n in matched):
                raise ConfigError(path, f"{target!r} is a {types[matched[0]]}, which LoRA cannot adapt; "
                                        f"name its layers instead: {', '.join(adaptable)}")
