"""The Olive run-config schema, both dialects (0.6: params_config, lora_r; 0.13: flat passes,
strategy/max_seq_len), as users write it. Only the keys Grove honours are fields here: warned
and refused keys are taken out first by fates.sift, so an unknown key is always a typo."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from flows.config.errors import Strict

STRATEGIES = ("join", "line-by-line", "join-random")


class HfConfig(Strict):  # 0.6 input_model.config.hf_config
    model_name: str
    from_pretrained_args: dict[str, Any] | None = None
    model_loading_args: dict[str, Any] | None = None


class PyTorchModelConfig(Strict):  # 0.6 input_model.config
    hf_config: dict[str, Any] | None = None  # sifted and validated as HfConfig
    model_path: str | dict[str, Any] | None = None
    model_file_format: str | None = None
    adapter_path: str | None = None


class InputModel(Strict):
    type: str
    config: dict[str, Any] | None = None  # sifted and validated as PyTorchModelConfig
    model_path: str | dict[str, Any] | None = None
    load_kwargs: dict[str, Any] | None = None
    model_loading_args: dict[str, Any] | None = None
    adapter_path: str | None = None
    model_file_format: str | None = None


class Accelerator(Strict):
    device: str | None = None
    execution_providers: list[str] | None = None


class SystemConfig(Strict):
    accelerators: list[Any] | None = None  # each sifted and validated as Accelerator


class System(Strict):
    type: str
    config: dict[str, Any] | None = None  # sifted and validated as SystemConfig
    accelerators: list[Any] | None = None  # each sifted and validated as Accelerator


class PreProcessParams(Strict):
    type: str | None = None
    dataset_type: str = "corpus"
    text_cols: list[str] | str | None = None
    text_template: str | None = None
    corpus_strategy: str | None = None  # 0.6 name
    strategy: str | None = None  # 0.13 name
    source_max_len: int | None = Field(None, gt=0)  # 0.6 name
    max_seq_len: int | None = Field(None, gt=0)  # 0.13 name
    pad_to_max_len: bool = True
    max_samples: int | None = Field(None, gt=0)
    add_special_tokens: bool | None = None
    random_seed: int | None = None


class LoadParams(Strict):
    type: str | None = None
    data_name: str
    data_files: str | list[str] | dict[str, Any] | None = None
    data_dir: str | None = None
    split: str = "train"
    subset: str | None = None


class ParamsConfig06(Strict):
    """Olive 0.6: the load_dataset keys and the pre-processing under params_config."""

    data_name: str
    data_files: str | list[str] | dict[str, Any] | None = None
    data_dir: str | None = None
    split: str = "train"
    subset: str | None = None
    component_kwargs: dict[str, Any] | None = None  # {pre_process_data: {...}, load_dataset: {...}}


class DataConfig(Strict):
    name: str
    type: str = "HuggingfaceContainer"
    load_dataset_config: dict[str, Any] | None = None
    pre_process_data_config: dict[str, Any] | None = None
    params_config: dict[str, Any] | None = None


class LoraPass(Strict):
    target_modules: list[str] | None = None
    lora_r: int | None = Field(None, gt=0)
    r: int | None = Field(None, gt=0)
    lora_alpha: float | None = Field(None, gt=0)
    alpha: float | None = Field(None, gt=0)
    lora_dropout: float | None = Field(None, ge=0, lt=1)
    modules_to_save: list[str] | None = None
    torch_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    train_data_config: str | None = None
    eval_data_config: str | None = None
    eval_dataset_size: float | None = Field(None, gt=0)
    training_args: dict[str, Any] = Field(default_factory=dict)


class QLoraPass(LoraPass):
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    double_quant: bool | None = None
    quant_type: Literal["nf4", "fp4"] | None = None


class ModelBuilderPass(Strict):
    precision: Literal["int4", "int8", "fp16", "fp32", "bf16"] = "int4"
    int4_block_size: Literal[16, 32, 64, 128, 256] = 32
    int4_accuracy_level: Literal[0, 1, 2, 3, 4] | None = None
    int4_is_symmetric: bool | None = None
    int4_op_types_to_quantize: list[Literal["MatMul", "Gather"]] | None = None
    int4_nodes_to_exclude: list[str] | None = None
    int4_algo_config: str | None = None
    extra_options: dict[str, Any] = Field(default_factory=dict)  # checked by flows/config/build.py
    # builder options Olive 0.13 lifts to pass keys: they go to extra_options as the builder spells them
    enable_cuda_graph: bool | None = None
    use_cuda_bf16: bool | None = None
    use_qdq: bool | None = None
    include_hidden_states: bool | None = None
    use_8bits_moe: bool | None = None


class Engine(Strict):
    cache_dir: str | None = None
    output_dir: str | None = None
    output_name: str | None = None
    execution_providers: list[str] | None = None
    host: str | dict[str, Any] | None = None
    target: str | dict[str, Any] | None = None


class PassLevel(Strict):
    type: str
    config: dict[str, Any] | None = None


TOP_KEYS = {"input_model", "systems", "data_configs", "passes", "engine", "workflow_id", "grove",
            "$comment", "$schema"}

# fates section -> the schema holding its honoured keys (tests: the two agree)
SCHEMAS = {
    "engine": Engine, "input_model": InputModel, "input_model.config": PyTorchModelConfig,
    "input_model.config.hf_config": HfConfig, "systems.*": System, "systems.*.config": SystemConfig,
    "systems.*.accelerators[]": Accelerator,
    "data_configs[]": DataConfig, "load_dataset": LoadParams, "pre_process": PreProcessParams,
    "passes.*": PassLevel, "passes.LoRA": LoraPass, "passes.QLoRA": QLoraPass, "passes.ModelBuilder": ModelBuilderPass,
}
