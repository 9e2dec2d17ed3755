"""The run config: Olive run configs (both dialects) plus Grove's own `grove` section.

Validated once, at the door, before any work starts. Everything downstream receives the
typed `RunConfig` built here, never the raw dict. Every problem is a one-line
`ConfigError` naming the key path (e.g. `passes.lora.config.lora_r`) and, for a typo,
the closest valid key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from grove.settings import (
    BenchmarkSettings,
    BuildSettings,
    Candidate,
    CorpusSettings,
    DataSettings,
    EvalSettings,
    PROMOTION_METRICS,
    ModelSettings,
    PromotionSettings,
    RetrySettings,
    RunConfig,
    SearchSettings,
    TrainSettings,
)
from grove.machine import gpu_count, machine_description
from grove.stage import STAGES

SUPPORTED_PASSES = ("LoRA", "QLoRA", "MergeAdapterWeights", "ModelBuilder")
DATA_FORMATS = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet"}
NOT_HERE = "is not supported here, use a local path or s3:// URL"


class ConfigError(ValueError):
    """A config problem, with the key path (and file) it concerns."""

    def __init__(self, path: str, message: str, source: str | None = None):
        self.path, self.message, self.source = path, message, source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{path}: {message}" if path else f"{where}{message}")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# ---- the Olive schema, as users write it -----------------------------------------------------
class HfConfig(Strict):
    model_name: str
    task: str = "text-generation"
    model_class: str | None = None
    model_loading_args: dict[str, Any] | None = None
    from_pretrained_args: dict[str, Any] | None = None


class PyTorchModelConfig(Strict):
    hf_config: HfConfig | None = None
    model_path: str | dict[str, Any] | None = None
    model_file_format: str | None = None
    adapter_path: str | None = None


class InputModel(Strict):
    type: str
    config: PyTorchModelConfig | None = None
    model_path: str | dict[str, Any] | None = None
    task: str | None = None
    load_kwargs: dict[str, Any] | None = None
    model_attributes: dict[str, Any] | None = None
    adapter_path: str | None = None
    model_file_format: str | None = None


class Accelerator(Strict):
    device: str = "cpu"
    execution_providers: list[str] | None = None


class SystemConfig(Strict):
    accelerators: list[Accelerator] | None = None
    olive_managed_env: bool | None = None


class System(Strict):
    type: str
    config: SystemConfig | dict[str, Any] | None = None
    accelerators: list[Accelerator] | None = None


class PreProcessParams(Strict):
    dataset_type: str = "corpus"
    text_cols: list[str] | str | None = None
    text_template: str | None = None
    corpus_strategy: Literal["join", "line-by-line", "join-random", "join-sliding-window"] = "join"
    source_max_len: int = Field(1024, gt=0)
    pad_to_max_len: bool = True
    use_attention_mask: bool = True
    max_samples: int | None = Field(None, gt=0)
    add_special_tokens: bool | None = None
    random_seed: int | None = None
    stride: int | None = None
    joiner: str | None = None


class LoadParams(Strict):
    data_name: str
    data_files: str | list[str] | dict[str, Any] | None = None
    data_dir: str | None = None
    split: str = "train"
    subset: str | None = None
    trust_remote_code: bool | None = None


class ComponentKwargs(Strict):
    pre_process_data: PreProcessParams | None = None
    load_dataset: dict[str, Any] | None = None


class ParamsConfig06(LoadParams):
    """Olive 0.6: everything under params_config."""

    component_kwargs: ComponentKwargs | None = None


class DataConfig(Strict):
    name: str
    type: str = "HuggingfaceContainer"
    user_script: str | None = None
    load_dataset_config: dict[str, Any] | None = None
    pre_process_data_config: dict[str, Any] | None = None
    post_process_data_config: dict[str, Any] | None = None
    dataloader_config: dict[str, Any] | None = None
    params_config: ParamsConfig06 | None = None


class LoraPass(Strict):
    target_modules: list[str] | None = None
    lora_r: int | None = Field(None, gt=0)
    r: int | None = Field(None, gt=0)
    lora_alpha: float | None = Field(None, gt=0)
    alpha: float | None = Field(None, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    double_quant: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    compute_dtype: str | None = None
    torch_dtype: str | None = None
    modules_to_save: list[str] | None = None
    train_data_config: str | None = None
    eval_data_config: str | None = None
    eval_dataset_size: float | None = Field(None, gt=0)
    training_args: dict[str, Any] = Field(default_factory=dict)


class ModelBuilderPass(Strict):
    precision: Literal["int4", "int8", "fp16", "fp32", "bf16"] = "int4"
    int4_block_size: Literal[16, 32, 64, 128, 256] = 32
    int4_accuracy_level: Literal[0, 1, 2, 3, 4] | None = None
    int4_is_symmetric: bool | None = None
    int4_op_types_to_quantize: list[Literal["MatMul", "Gather"]] | None = None
    extra_options: dict[str, Any] = Field(default_factory=dict)  # checked by tasks/quantization.py
    metadata_only: bool = False


class GroveCandidate(Strict):
    """One variant of a quantization search: the ModelBuilder keys it sets (the rest: defaults)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    precision: Literal["int4", "int8", "fp16", "fp32", "bf16"] = "int4"
    int4_block_size: Literal[16, 32, 64, 128, 256] = 32
    int4_accuracy_level: Literal[0, 1, 2, 3, 4] | None = None
    int4_is_symmetric: bool | None = None
    int4_op_types_to_quantize: list[Literal["MatMul", "Gather"]] | None = None
    extra_options: dict[str, Any] = Field(default_factory=dict)


class GroveSearch(Strict):
    enabled: bool = Field(True, description="false: no search, not even the default one (the build as written)")
    candidates: Literal["builtin", "ladder"] | list[GroveCandidate] = Field(
        "builtin", description="the variants to build, or 'builtin' for Grove's list, or 'ladder' for the "
                               "default search's short list")
    early_stop: bool | None = Field(None, description="stop at the first candidate within tolerance "
                                                      "(default: true for 'ladder', else false)")
    tolerance_points: float = Field(2.0, ge=0, le=100, description="accuracy points below the merged PyTorch model")


class Engine(Strict):
    cache_dir: str | None = None
    output_dir: str | None = None
    output_name: str | None = None
    execution_providers: list[str] | None = None
    log_severity_level: int | None = None
    host: str | dict[str, Any] | None = None
    target: str | dict[str, Any] | None = None
    search_strategy: Any = None
    clean_cache: bool | None = None
    clean_evaluation_cache: bool | None = None
    evaluator: Any = None
    evaluate_input_model: bool | None = None
    packaging_config: Any = None
    plot_pareto_frontier: bool | None = None


class GroveEval(Strict):
    max_new_tokens: int = Field(8, gt=0, description="tokens generated after each prompt")
    batch_size: int = Field(16, gt=0)
    max_rows: int | None = Field(None, gt=0, description="evaluate at most this many eval rows")


class GroveBenchmark(Strict):
    prompts: int = Field(3, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    warmup: int = Field(1, ge=0)
    repeats: int = Field(2, gt=0)


class GroveTrain(Strict):
    """Grove's QLoRA/LoRA training setup on CUDA (a CPU trains as before): measured on one H200,
    bench/gpu_train_throughput.py. Each is part of the train stage's cache key."""

    kernels: Literal["liger", "none"] = Field(
        "liger", description="liger: Liger kernels (fused RMSNorm/SwiGLU/RoPE, chunked linear+cross-entropy)")
    packing: bool = Field(True, description="line-by-line corpora: pack each batch's examples into rows "
                                            "without cross-example attention instead of padding")
    compile: bool = Field(False, description="torch.compile each decoder layer")
    processes: int | Literal["auto"] = Field(
        "auto", description="data-parallel training processes (torchrun + DDP); auto: one per GPU when "
                            "training on CUDA, else 1. Each process takes per_device_train_batch_size examples")


class GroveBuild(Strict):
    cuda_graph: bool = Field(True, description="CUDA builds: enable_cuda_graph in genai_config.json "
                                               "(unless the ModelBuilder's extra_options set it)")
    cuda_block_size: Literal[16, 32, 64, 128, 256] = Field(
        128, description="CUDA int4 builds whose ModelBuilder pass sets no block size, for models whose hidden "
                         "and intermediate sizes it divides (else the builder's 32)")


class GroveRetry(Strict):
    retries: int = Field(ge=0, le=20)
    delay_seconds: float = Field(10, ge=0)


class GrovePromotion(Strict):
    enabled: bool = Field(True, description="after benchmark, make the new model current if it passes the gate")
    model_name: str | None = Field(None, description="the name models are promoted under (default: grove.name)")
    metric: str = Field("onnx_accuracy", description="gate metric (PROMOTION_METRICS); without a "
                                                     "ModelBuilder pass the default is fine_tuned_accuracy")
    min: float = Field(0.0, description="the new model's metric must be at least this")
    max_drop: float = Field(0.02, ge=0, description="and not more than this below the current model's")
    max_drop_from_fine_tuned: float = Field(
        PromotionSettings.model_fields["max_drop_from_fine_tuned"].default, ge=0,
        description="the shipped model's accuracy at most this below the model it was built from")
    min_gain_over_base: float = Field(
        PromotionSettings.model_fields["min_gain_over_base"].default,
        description="the shipped model's accuracy at least this above the base model's (with a fine-tune)")


class GroveSection(Strict):
    name: str | None = None
    artifact_root: str | None = None
    aws_credentials_block: str | None = None
    retries: dict[str, GroveRetry] = {}
    device: Literal["auto", "cpu", "cuda"] = "auto"
    completion_only_loss: bool = False
    lora_top_layers: int | None = Field(None, gt=0)
    seed: int = 42
    checkpoint_steps: int = Field(25, ge=0, strict=True, description="training checkpoints every N steps; 0: none")
    evaluate: GroveEval = Field(default_factory=GroveEval)
    benchmark: GroveBenchmark = Field(default_factory=GroveBenchmark)
    train: GroveTrain = Field(default_factory=GroveTrain)
    build: GroveBuild = Field(default_factory=GroveBuild)
    promotion: GrovePromotion = Field(default_factory=GrovePromotion)
    # None: the ladder search when the ModelBuilder pass is a plain CPU int4 build
    quantization_search: GroveSearch | None = None


ENGINE_KEYS = set(Engine.model_fields)
TOP_KEYS = {"input_model", "systems", "data_configs", "passes", "engine", "evaluators", "$comment",
            "workflow_id", "$schema", "grove", "auto_optimizer_config", "pass_flows"}

# TrainingArguments names that older transformers/Olive used and transformers 5 renamed.
RENAMED_TRAINING_ARGS = {
    "evaluation_strategy": "eval_strategy",
    "no_cuda": "use_cpu",
    "per_gpu_train_batch_size": "per_device_train_batch_size",
    "per_gpu_eval_batch_size": "per_device_eval_batch_size",
    "warmup_ratio": "warmup_steps",
}
# Managed by Grove (storage, checkpoints, logging): accepted and ignored with a warning.
GROVE_MANAGED_TRAINING_ARGS = {"output_dir", "overwrite_output_dir", "logging_dir", "report_to",
                               "push_to_hub", "hub_model_id", "hub_token", "resume_from_checkpoint"}
# Checkpoints go to the artifact store every grove.checkpoint_steps steps (not part of the cache key).
GROVE_CHECKPOINT_TRAINING_ARGS = {"save_strategy", "save_steps", "save_total_limit", "save_only_model"}


# ---- loading and validation --------------------------------------------------------------------
def load_config(path: str | Path, base_dir: Path | None = None, list_remote_data: bool = True) -> RunConfig:
    """Read a JSON or YAML run config and validate all of it.

    Data locations are listed and their files hashed here, at the start of every run.
    `list_remote_data=False` (deploy-time checks) leaves s3:// locations to the run: the
    machine deploying may not hold the keys the worker has."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError("", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                          str(path)) from exc
    except yaml.YAMLError as exc:
        raise ConfigError("", f"invalid YAML: {exc}", str(path)) from exc
    try:
        return parse_config(raw, base_dir=base_dir or Path.cwd(), config_dir=path.parent.resolve(),
                            list_remote_data=list_remote_data)
    except ConfigError as exc:
        if exc.source is None:
            raise ConfigError(exc.path, exc.message, str(path)) from None
        raise


def parse_config(raw: Any, base_dir: Path, config_dir: Path | None = None, list_remote_data: bool = True) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError("", "the config must be a JSON object")
    raw = dict(raw)
    _check_keys(raw, TOP_KEYS | ENGINE_KEYS, "")
    # Older Olive configs put engine keys at the top level.
    engine_raw = dict(raw.get("engine") or {})
    for key in ENGINE_KEYS & set(raw):
        engine_raw.setdefault(key, raw.pop(key))
    engine = _validate(Engine, engine_raw, "engine")
    grove = _validate(GroveSection, raw.get("grove") or {}, "grove")
    paths = _Paths(base_dir, config_dir or base_dir, grove.aws_credentials_block, list_remote_data)

    _check_systems(raw.get("systems") or {}, engine)
    model = _model_settings(raw.get("input_model"), paths)
    data_configs = _data_configs(raw.get("data_configs"), paths)
    passes = _passes(raw.get("passes"))

    lora = [(n, p) for n, p in passes if p[0] in ("LoRA", "QLoRA")]
    builders = [(n, p) for n, p in passes if p[0] == "ModelBuilder"]
    merges = [(n, p) for n, p in passes if p[0] == "MergeAdapterWeights"]
    for kind, found in (("LoRA/QLoRA", lora), ("ModelBuilder", builders), ("MergeAdapterWeights", merges)):
        if len(found) > 1:
            raise ConfigError(f"passes.{found[1][0]}", f"only one {kind} pass is supported per run")
    if merges and not lora:
        raise ConfigError(f"passes.{merges[0][0]}", "MergeAdapterWeights needs a LoRA or QLoRA pass before it")
    order = [n for n, _ in passes]
    if lora and builders and order.index(builders[0][0]) < order.index(lora[0][0]):
        raise ConfigError(f"passes.{builders[0][0]}", "ModelBuilder must come after the LoRA/QLoRA pass")
    if lora and builders and not merges:
        raise ConfigError("passes", "a ModelBuilder after LoRA/QLoRA needs a MergeAdapterWeights pass between them")

    name = grove.name or raw.get("workflow_id") or engine.output_name or "grove-model"
    promotion = _promotion_settings(grove.promotion, name, bool(builders), bool(merges))

    train = None
    train_data, eval_data, eval_size = _first_data(data_configs), None, 0.3
    if lora:
        _, (kind, cfg, where) = lora[0]
        train, train_data, eval_data, eval_size = _train_settings(kind, cfg, where, data_configs, grove)
    elif not data_configs:
        raise ConfigError("data_configs", "at least one data config is needed (Grove evaluates on its eval split)")

    data = _data_settings(train_data, eval_data, eval_size, grove.seed, paths)
    corpus = CorpusSettings(
        text_template=data.text_template, text_cols=data.text_cols,
        corpus_strategy=train_data.pre.corpus_strategy, source_max_len=train_data.pre.source_max_len,
        pad_to_max_len=train_data.pre.pad_to_max_len, completion_only_loss=grove.completion_only_loss,
        label_col=data.label_col,
    )
    build = _build_settings(builders[0][1], engine, raw, model, grove) if builders else None
    search_section = _default_search(grove.quantization_search, builders, build, data)
    search = _search_settings(search_section, build, builders, model, data) if search_section else None

    artifact_root = grove.artifact_root or engine.cache_dir or ".grove-cache"
    output_dir = engine.output_dir or "grove-output"
    unknown_stage = next((s for s in grove.retries if s not in STAGES), None)
    if unknown_stage:
        close = difflib.get_close_matches(unknown_stage, STAGES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"grove.retries.{unknown_stage}", f"unknown stage{hint}; stages are: {', '.join(STAGES)}")
    return RunConfig(
        name=name,
        artifact_root=paths.storage(artifact_root),
        aws_credentials_block=grove.aws_credentials_block,
        output_dir=paths.storage(output_dir),
        retries={stage: RetrySettings(**r.model_dump()) for stage, r in grove.retries.items()},
        device=grove.device,
        seed=grove.seed,
        checkpoint_steps=grove.checkpoint_steps,
        model=model,
        data=data,
        corpus=corpus,
        train=train,
        evaluate=EvalSettings(**grove.evaluate.model_dump(), text_template=data.text_template,
                              label_col=data.label_col),
        merge=bool(merges),
        build=build,
        search=search,
        benchmark=BenchmarkSettings(**grove.benchmark.model_dump(), machine=machine_description(grove.device)),
        promotion=promotion,
    )


def _promotion_settings(section: GrovePromotion, name: str, has_builder: bool,
                        has_merge: bool) -> PromotionSettings | None:
    where = "grove.promotion"
    if not section.enabled:
        return None
    if not section.model_fields_set:  # defaults only: fit them to the passes instead of refusing
        if not (has_builder or has_merge):
            return None
        if not has_builder:
            section = section.model_copy(update={"metric": "fine_tuned_accuracy"})
    if section.metric not in PROMOTION_METRICS:
        close = difflib.get_close_matches(section.metric, list(PROMOTION_METRICS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}.metric", f"unknown gate metric {section.metric!r}{hint}; "
                                             f"metrics are: {', '.join(PROMOTION_METRICS)}")
    stage = PROMOTION_METRICS[section.metric][0]
    if stage in ("build_onnx", "benchmark") and section.metric.startswith("onnx") and not has_builder:
        raise ConfigError(f"{where}.metric", f"{section.metric} needs a ModelBuilder pass; use "
                                             f"fine_tuned_accuracy or add one")
    if not (has_builder or has_merge):
        raise ConfigError(where, "promotion needs a model to promote (a MergeAdapterWeights or ModelBuilder "
                                 "pass); set grove.promotion.enabled to false")
    model_name = section.model_name or name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", model_name):
        at = f"{where}.model_name" if section.model_name else "grove.name"
        raise ConfigError(at, f"{model_name!r} cannot name a model in the store: use letters, digits, '.', '_' "
                              f"and '-' (set grove.promotion.model_name)")
    return PromotionSettings(model_name=model_name, metric=section.metric, min=section.min,
                             max_drop=section.max_drop, max_drop_from_fine_tuned=section.max_drop_from_fine_tuned,
                             min_gain_over_base=section.min_gain_over_base)


# ---- sections -----------------------------------------------------------------------------------
class _Paths:
    """Relative paths resolve against the working directory (as Olive does), then the config's folder."""

    def __init__(self, base_dir: Path, config_dir: Path, credentials_block: str | None = None,
                 list_remote_data: bool = True):
        self.base_dir, self.config_dir = base_dir, config_dir
        self.credentials_block, self.list_remote_data = credentials_block, list_remote_data
        self._remote_access = None
        self._remote_fs: dict[str, object] = {}

    def remote_fs(self, url: str):
        """One fresh filesystem per protocol for this parse (one run start), not one per file."""
        from grove.data_files import remote_fs

        protocol = url.split("://", 1)[0]
        if protocol not in self._remote_fs:
            options = self.remote_access().options if protocol == "s3" else {}
            self._remote_fs[protocol] = remote_fs(url, options)[0]
        return self._remote_fs[protocol]

    def remote_access(self):
        """Keys for s3:// data: the same source as the artifact root's (env or the named block)."""
        if self._remote_access is None:
            from grove.credentials import s3_access

            self._remote_access = s3_access(self.credentials_block)
        return self._remote_access

    def existing(self, value: str) -> Path | None:
        for root in (self.base_dir, self.config_dir):
            candidate = (root / value).expanduser()
            if candidate.exists():
                return candidate.resolve()
        return None

    def storage(self, value: str) -> str:
        if "://" in value:
            return value.rstrip("/")
        return str((self.base_dir / value).expanduser().resolve())


def _check_systems(systems: Any, engine: Engine) -> None:
    if not isinstance(systems, dict):
        raise ConfigError("systems", "must be a mapping of system name to system config")
    for name, system in systems.items():
        where = f"systems.{name}"
        spec = _validate(System, system, where)
        if spec.type.lower() in ("azureml", "azureml_system", "aml"):
            raise ConfigError(f"{where}.type", f"Azure ML systems are not supported: Grove runs locally or on "
                                               f"Prefect workers; use a LocalSystem")
        if spec.type not in ("LocalSystem", "PythonEnvironment"):
            raise ConfigError(f"{where}.type", f"unknown system type {spec.type!r}; Grove supports LocalSystem")
    for key in ("host", "target"):
        ref = getattr(engine, key)
        if isinstance(ref, str) and ref not in systems:
            raise ConfigError(f"engine.{key}", f"refers to system {ref!r}, which is not in systems "
                                               f"(have: {', '.join(systems) or 'none'})")


def _model_settings(raw: Any, paths: _Paths) -> ModelSettings:
    if raw is None:
        raise ConfigError("input_model", "is required")
    spec = _validate(InputModel, raw, "input_model")
    if spec.type not in ("PyTorchModel", "HfModel"):
        raise ConfigError("input_model.type", f"unsupported model type {spec.type!r}; use HfModel or PyTorchModel")
    where, trust = "input_model.model_path", None
    model_path: Any = spec.model_path
    load_args = spec.load_kwargs or {}
    if spec.config is not None:
        if spec.config.hf_config is not None:
            model_path, where = spec.config.hf_config.model_name, "input_model.config.hf_config.model_name"
            load_args = spec.config.hf_config.from_pretrained_args or spec.config.hf_config.model_loading_args or {}
        elif spec.config.model_path is not None:
            model_path, where = spec.config.model_path, "input_model.config.model_path"
        if spec.config.model_file_format == "PyTorch.MLflow":
            raise ConfigError("input_model.config.model_file_format", f"PyTorch.MLflow (Azure ML) models {NOT_HERE}")
    if spec.model_file_format == "PyTorch.MLflow":
        raise ConfigError("input_model.model_file_format", f"PyTorch.MLflow (Azure ML) models {NOT_HERE}")
    if isinstance(model_path, dict):
        kind = str(model_path.get("type", ""))
        if kind.startswith("azureml"):
            raise ConfigError(where, f"{kind} models {NOT_HERE}")
        raise ConfigError(where, f"unsupported model reference type {kind!r}; use a local folder path")
    if not model_path:
        raise ConfigError(where, "is required")
    trust = bool(load_args.get("trust_remote_code", False))
    from grove.models import locate_model

    try:
        located = locate_model(str(model_path), paths.existing, trust_remote_code=trust)
    except ValueError as exc:
        raise ConfigError(where, str(exc)) from None
    return located


def _data_configs(raw: Any, paths: _Paths) -> dict[str, "_Data"]:
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise ConfigError("data_configs", "must be a list of data configs")
    found: dict[str, _Data] = {}
    for index, item in enumerate(raw):
        where = f"data_configs[{index}]"
        spec = _validate(DataConfig, item, where)
        where = f"data_configs.{spec.name}"
        if spec.type != "HuggingfaceContainer":
            raise ConfigError(f"{where}.type", f"unsupported data container {spec.type!r}; use HuggingfaceContainer")
        if spec.user_script:
            raise ConfigError(f"{where}.user_script", "user scripts are not run by Grove; use the built-in "
                                                      "load/pre-process options")
        if spec.params_config is not None:
            load = spec.params_config
            pre_raw = load.component_kwargs.pre_process_data if load.component_kwargs else None
            pre = pre_raw or PreProcessParams()
            load_where = f"{where}.params_config"
            pre_where = f"{where}.params_config.component_kwargs.pre_process_data"
        else:
            load_where, load_raw = _params_level(spec.load_dataset_config, f"{where}.load_dataset_config")
            pre_where, pre_raw = _params_level(spec.pre_process_data_config, f"{where}.pre_process_data_config")
            if load_raw is None:
                raise ConfigError(f"{where}.load_dataset_config", "is required")
            load = _validate(LoadParams, load_raw, load_where)
            pre = _validate(PreProcessParams, pre_raw or {}, pre_where)
        files = _data_files(load, load_where, paths)
        found[spec.name] = _Data(spec.name, where, files, load.split, pre, pre_where, DATA_FORMATS[load.data_name])
    return found


def _params_level(raw: dict | None, where: str) -> tuple[str, dict | None]:
    """Olive accepts options under `params` or directly in the section."""
    if raw is None:
        return where, None
    raw = {k: v for k, v in raw.items() if k != "type"}
    if "params" in raw:
        extra = set(raw) - {"params"}
        if extra:
            raise ConfigError(f"{where}.{sorted(extra)[0]}", "unexpected next to `params`; put it inside `params`")
        return f"{where}.params", raw["params"]
    return where, raw


def _data_files(load: LoadParams, where: str, paths: _Paths) -> list[str]:
    if load.data_name not in DATA_FORMATS:
        raise ConfigError(f"{where}.data_name", f"unsupported data_name {load.data_name!r}: Grove reads local or "
                                                f"fsspec files with data_name json, csv or parquet (hub datasets "
                                                f"cannot be fetched here)")
    files = load.data_files
    if isinstance(files, dict):
        kind = str(files.get("type", ""))
        if kind.startswith("azureml"):
            raise ConfigError(f"{where}.data_files", f"{kind} data {NOT_HERE}")
        raise ConfigError(f"{where}.data_files", "must be a path, URL or list of them")
    if not files:
        raise ConfigError(f"{where}.data_files", "is required")
    resolved: list[str] = []
    for index, location in enumerate([files] if isinstance(files, str) else files):
        at = f"{where}.data_files" + ("" if isinstance(files, str) else f"[{index}]")
        resolved += _list_location(location, at, paths)
    return list(dict.fromkeys(resolved))


def _list_location(location: str, at: str, paths: _Paths) -> list[str]:
    """A data file, glob or folder/prefix, listed now (each run lists it again)."""
    from grove.data_files import DataLocationError, is_remote, list_data_files

    if is_remote(location) and not paths.list_remote_data:
        return [location]
    try:
        options = paths.remote_access().options if location.startswith("s3://") else {}
        return list_data_files(location, [paths.base_dir, paths.config_dir], options)
    except DataLocationError as exc:
        raise ConfigError(at, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a store we cannot read: say which and why
        scrub = paths.remote_access().scrub if location.startswith("s3://") else str
        raise ConfigError(at, scrub(f"cannot list {location}: {type(exc).__name__}: {exc}")) from None


class _Data:
    def __init__(self, name, where, files, split, pre: PreProcessParams, pre_where, data_format: str):
        self.name, self.where, self.files, self.split, self.pre, self.pre_where = name, where, files, split, pre, pre_where
        self.format = data_format  # from data_name; each listed file's suffix must agree


def _first_data(configs: dict[str, _Data]) -> _Data | None:
    return next(iter(configs.values()), None)


def _passes(raw: Any) -> list[tuple[str, tuple[str, dict, str]]]:
    if not raw:
        raise ConfigError("passes", "at least one pass is needed")
    if not isinstance(raw, dict):
        raise ConfigError("passes", "must be a mapping of pass name to pass config")
    result = []
    for name, item in raw.items():
        where = f"passes.{name}"
        if not isinstance(item, dict) or "type" not in item:
            raise ConfigError(where, "each pass needs a `type`")
        kind = item["type"]
        if kind not in SUPPORTED_PASSES:
            close = difflib.get_close_matches(str(kind), SUPPORTED_PASSES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}.type", f"unsupported pass type {kind!r}{hint}; Grove runs "
                                               f"{', '.join(SUPPORTED_PASSES)}")
        body = {k: v for k, v in item.items() if k not in ("type", "config", "disable_search", "host",
                                                              "evaluator", "clean_run_cache", "output_name")}
        if "config" in item:  # older dialect: options under `config`
            if body:
                raise ConfigError(f"{where}.{sorted(body)[0]}", "unexpected next to `config`; put it inside `config`")
            body, where = dict(item["config"] or {}), f"{where}.config"
        result.append((name, (kind, body, where)))
    return result


def _train_settings(kind, cfg, where, data_configs, grove: GroveSection):
    spec = _validate(LoraPass, cfg, where)
    if spec.lora_r and spec.r and spec.lora_r != spec.r:
        raise ConfigError(f"{where}.r", f"conflicts with lora_r ({spec.lora_r} vs {spec.r}); give one of them")
    if spec.lora_alpha and spec.alpha and spec.lora_alpha != spec.alpha:
        raise ConfigError(f"{where}.alpha", f"conflicts with lora_alpha; give one of them")
    train_name = spec.train_data_config
    if train_name is None:
        if not data_configs:
            raise ConfigError(f"{where}.train_data_config", "is required (no data_configs defined)")
        train_name = next(iter(data_configs))
    for key, ref in (("train_data_config", train_name), ("eval_data_config", spec.eval_data_config)):
        if ref is not None and ref not in data_configs:
            close = difflib.get_close_matches(ref, list(data_configs), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}.{key}", f"refers to data config {ref!r}, which does not exist{hint}; "
                                                f"have: {', '.join(data_configs) or 'none'}")
    eval_data = data_configs[spec.eval_data_config] if spec.eval_data_config else None
    if eval_data is not None and eval_data.name == train_name:
        eval_data = None
    eval_size = spec.eval_dataset_size if spec.eval_dataset_size is not None else 0.3
    if eval_size >= 1 and eval_size != int(eval_size):
        raise ConfigError(f"{where}.eval_dataset_size", "must be a fraction below 1 or a whole number of rows")
    training_args = _training_args(spec.training_args, f"{where}.training_args", kind)
    train = TrainSettings(
        method=kind.lower(),
        r=spec.lora_r or spec.r or 64,
        alpha=spec.lora_alpha or spec.alpha or 16,
        dropout=spec.lora_dropout,
        target_modules=spec.target_modules,
        double_quant=spec.double_quant,
        quant_type=spec.quant_type,
        training_args=training_args,
        seed=int(training_args.get("seed", grove.seed)),
        top_layers=grove.lora_top_layers,
        kernels=grove.train.kernels,
        packing=grove.train.packing,
        compile=grove.train.compile,
        processes=_training_processes(grove, "grove.train.processes"),
    )
    return train, data_configs[train_name], eval_data, eval_size


def _training_processes(grove: GroveSection, where: str) -> int:
    """grove.train.processes resolved here, so the train key says how many processes trained."""
    value = grove.train.processes
    if value == "auto":
        return max(gpu_count(), 1) if grove.device != "cpu" else 1
    if isinstance(value, bool) or value < 1:
        raise ConfigError(where, f"must be 'auto' or a whole number of at least 1, got {value!r}")
    return value


def _training_args(args: dict[str, Any], where: str, kind: str) -> dict[str, Any]:
    valid = training_argument_names()
    result: dict[str, Any] = {}
    for key, value in args.items():
        if key in GROVE_MANAGED_TRAINING_ARGS:
            _warn(f"{where}.{key}: managed by Grove (artifact store, checkpoints); ignored")
            continue
        if key in GROVE_CHECKPOINT_TRAINING_ARGS:
            _warn(f"{where}.{key}: checkpoints are managed by Grove (set grove.checkpoint_steps); ignored")
            continue
        if key == "group_by_length":
            if value:
                result["train_sampling_strategy"] = "group_by_length"
            continue
        name = RENAMED_TRAINING_ARGS.get(key, key)
        if name not in valid:
            close = difflib.get_close_matches(key, sorted(valid | set(RENAMED_TRAINING_ARGS)), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
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


def training_argument_names() -> set[str]:
    """Field names of the installed transformers' TrainingArguments.

    Read from its source with `ast`: importing transformers (and torch) would add ~8 s to
    every validation, and a cached rerun must stay fast.
    """
    import ast
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    source = Path(spec.submodule_search_locations[0]) / "training_args.py"
    tree = ast.parse(source.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "TrainingArguments":
            return {item.target.id for item in node.body
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
    raise RuntimeError(f"TrainingArguments not found in {source}")


def _data_settings(train: _Data, eval_data: _Data | None, eval_size: float, seed: int, paths: _Paths) -> DataSettings:
    pre, where = train.pre, train.pre_where
    if pre.dataset_type != "corpus":
        raise ConfigError(f"{where}.dataset_type", f"unsupported dataset_type {pre.dataset_type!r}; Grove "
                                                   f"builds a training corpus (dataset_type: corpus)")
    cols = [pre.text_cols] if isinstance(pre.text_cols, str) else list(pre.text_cols or [])
    template = pre.text_template
    if template is None:
        if len(cols) != 1:
            raise ConfigError(f"{where}.text_template", "is required unless exactly one text column is given")
        template = "{" + cols[0] + "}"
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"{where}.text_template", f"is not a valid template: {exc}") from None
    for field in fields:
        if not re.fullmatch(r"\w+", field):
            raise ConfigError(f"{where}.text_template", f"placeholder {{{field}}} must be a plain column name")
    if not cols:
        cols = list(dict.fromkeys(fields))
    for field in fields:
        if field not in cols:
            raise ConfigError(f"{where}.text_template", f"uses {{{field}}} but text_cols lists only {cols}")
    columns = _file_columns(train.files[0])
    if columns is not None:
        for col in cols:
            if col not in columns:
                close = difflib.get_close_matches(col, columns, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{where}.text_cols", f"column {col!r} is not in {train.files[0]}{hint}; "
                                                        f"it has {columns}")
    label_col = None
    match = re.search(r"\{(\w+)\}\s*$", template)
    if match and template[: match.start()].strip():
        label_col = match.group(1)
    # a remote location not listed yet (deploy-time checks) has no suffix to check: data_name says
    listed = [f for f in train.files + (eval_data.files if eval_data else []) if paths.list_remote_data or "://" not in f]
    formats = {_format_of(f, train.where) for f in listed} or {train.format}
    if len(formats) > 1:
        raise ConfigError(f"{train.where}.load_dataset_config", f"the data files mix formats {sorted(formats)}; "
                                                                f"one location must hold one format")
    digests = [_file_digest(f, paths) for f in train.files + (eval_data.files if eval_data else [])]
    return DataSettings(
        name=train.name,
        files=train.files,
        format=formats.pop(),
        split=train.split,
        eval_files=eval_data.files if eval_data else None,
        eval_size=eval_size,
        seed=seed,
        text_cols=cols,
        text_template=template,
        label_col=label_col,
        max_samples=pre.max_samples,
        content_sha256=hashlib.sha256("".join(digests).encode()).hexdigest(),
    )


def _format_of(path: str, where: str) -> str:
    suffix = path.rsplit(".", 1)[-1].lower()
    if suffix not in DATA_FORMATS:
        raise ConfigError(f"{where}", f"cannot tell the format of {path}; use .json, .jsonl, .csv or .parquet")
    return DATA_FORMATS[suffix]


def _file_columns(path: str) -> list[str] | None:
    """Column names from the first record of a local json/jsonl/csv file (None: not checked here)."""
    if "://" in path:
        return None
    suffix = path.rsplit(".", 1)[-1].lower()
    with open(path, encoding="utf-8") as handle:
        if suffix == "csv":
            import csv

            return next(csv.reader(handle), [])
        if suffix in ("json", "jsonl"):
            head = handle.read(1)
            handle.seek(0)
            if head == "[":
                records = json.load(handle)
                return sorted(records[0]) if records else []
            for lineno, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        return sorted(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ConfigError("", f"{path}, line {lineno}: not valid JSON ({exc.msg})") from None
            return []
    return None


def _file_digest(path: str, paths: _Paths) -> str:
    from grove.data_files import content_digest, is_remote

    if is_remote(path) and not paths.list_remote_data:
        return "listed-at-run-start"
    try:
        return content_digest(path, fs=paths.remote_fs(path) if is_remote(path) else None)
    except Exception as exc:  # noqa: BLE001 - name the file, never the keys
        scrub = paths.remote_access().scrub if path.startswith("s3://") else str
        raise ConfigError("data_files", scrub(f"cannot read {path}: {type(exc).__name__}: {exc}")) from None


def _build_settings(entry, engine: Engine, raw: dict, model: ModelSettings, grove: GroveSection) -> BuildSettings:
    kind, cfg, where = entry
    spec = _validate(ModelBuilderPass, cfg, where)
    provider = "cpu"
    eps = engine.execution_providers or []
    for system in (raw.get("systems") or {}).values():
        for acc in (system.get("accelerators") or (system.get("config") or {}).get("accelerators") or []):
            eps = eps or acc.get("execution_providers") or []
    if any("CUDA" in str(ep) for ep in eps):
        provider = "cuda"
    inherited = {}
    if provider == "cuda" and "enable_cuda_graph" not in spec.extra_options:
        # measured on an H200 (Phi-3-mini shape, int4): CUDA graphs lift batch-1 decode ~30%
        inherited["enable_cuda_graph"] = "true" if grove.build.cuda_graph else "false"
    if provider == "cuda" and _block_size_unset(spec) and _divides_model(grove.build.cuda_block_size, model):
        # measured on an H200 (Phi-3-mini shape): block 128 decodes ~8% faster than 32 in a 8% smaller
        # model; on the bundled SmolLM2 it scored 0.758 against 32's 0.733 (README: Running on a GPU)
        spec = spec.model_copy(update={"int4_block_size": grove.build.cuda_block_size})
    return _parse_build(spec, provider, model, where, inherited)


def _block_size_unset(spec: ModelBuilderPass) -> bool:
    return (spec.precision == "int4" and "int4_block_size" not in spec.model_fields_set
            and "block_size" not in spec.extra_options)


def _divides_model(block_size: int, model: ModelSettings) -> bool:
    """Whether the block size divides the model's hidden and intermediate sizes: k_quant fails
    to build on a partial block (seen: SmolLM2's 960 with block 128)."""
    from grove.models import model_config

    config = model_config(model) or {}
    sizes = [config.get(key) for key in ("hidden_size", "intermediate_size")]
    return all(isinstance(size, int) and size % block_size == 0 for size in sizes)


def _parse_build(spec: ModelBuilderPass | GroveCandidate, provider: str, model: ModelSettings, where: str,
                 inherited: dict[str, str] | None = None) -> BuildSettings:
    """The quantization keys, checked against the installed builder (tasks/quantization.py)."""
    from grove.models import model_config
    from tasks.build_onnx.quantization import QuantOptionError, parse_build

    raw = spec.model_dump()
    raw["extra_options"] = {**(inherited or {}), **spec.extra_options}
    try:
        return parse_build(raw, set(spec.model_fields_set), provider, model_config(model))
    except QuantOptionError as exc:
        raise ConfigError(f"{where}.{exc.path}", exc.message) from None


def _default_search(section: GroveSearch | None, builders, build: BuildSettings | None,
                    data: DataSettings) -> GroveSearch | None:
    """The search a config asks for; without one, the ladder (early stop) for a plain CPU int4 build
    with a label to score: the builder's default int4 lost 16 points on the bundled model."""
    if section is not None:
        return section if section.enabled else None
    if build is None or not data.label_col or build.precision != "int4" or build.execution_provider != "cpu":
        return None
    spec_keys = set((builders[0][1][1] or {}).keys()) - {"precision", "type"}
    return GroveSearch(candidates="ladder") if not spec_keys else None


def _search_settings(search: GroveSearch, build: BuildSettings | None, builders, model: ModelSettings,
                     data: DataSettings) -> SearchSettings:
    """grove.quantization_search: the candidates, each checked like a ModelBuilder pass."""
    where = "grove.quantization_search"
    if build is None:
        raise ConfigError(where, "needs a ModelBuilder pass (the candidates are its variants)")
    if not data.label_col:
        raise ConfigError(where, "needs task accuracy: the data's text_template must end with the label column "
                                 "(e.g. '...{tone}') so each candidate can be scored on the eval split")
    if search.candidates in ("builtin", "ladder"):
        from grove.models import model_config
        from flows.config.candidates import builtin_candidates, ladder_candidates

        pairs = (builtin_candidates if search.candidates == "builtin" else ladder_candidates)(
            build, model_config(model))
    else:
        pairs, seen = [], set()
        for index, candidate in enumerate(search.candidates):
            at = f"{where}.candidates[{index}]"
            if candidate.name in seen:
                raise ConfigError(f"{at}.name", f"duplicate candidate name {candidate.name!r}")
            seen.add(candidate.name)
            pairs.append((candidate.name, _parse_build(candidate, build.execution_provider, model, at,
                                                       inherited=build.extra_options)))
        if not pairs:
            raise ConfigError(f"{where}.candidates", "lists no candidates; give some or write \"builtin\"")
    early_stop = search.candidates == "ladder" if search.early_stop is None else search.early_stop
    return SearchSettings(candidates=[Candidate(name=n, build=b) for n, b in pairs],
                          tolerance_points=search.tolerance_points, early_stop=early_stop)


# ---- helpers --------------------------------------------------------------------------------------
def _validate(model: type[BaseModel], raw: Any, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(where, f"must be an object, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = [str(p) for p in error["loc"] if not str(p).startswith(("function-", "union["))]
        # pydantic reports each union member; keep the key path only
        loc = [p for p in loc if p not in ("str", "list[str]", "dict[str,any]", "int", "float", "bool")]
        path = ".".join([where, *loc]) if where else ".".join(loc)
        if error["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            close = difflib.get_close_matches(loc[-1], list(parent.model_fields), n=1) if parent else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(path, f"unknown key{hint}") from None
        if error["type"] == "missing":
            raise ConfigError(path, "is required") from None
        got = error.get("input")
        shown = json.dumps(got) if isinstance(got, (str, int, float, bool)) else type(got).__name__
        raise ConfigError(path, f"{error['msg'].lower()} (got {shown})") from None


def _model_at(model: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    import typing

    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        candidates = [a for a in typing.get_args(annotation) or [annotation]
                      if isinstance(a, type) and issubclass(a, BaseModel)]
        current = candidates[0] if candidates else None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _check_keys(raw: dict, valid: set[str], where: str) -> None:
    for key in raw:
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}{key}", f"unknown key{hint}")


def _warn(message: str) -> None:
    import logging

    logging.getLogger("grove.config").warning(message)
