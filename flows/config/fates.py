"""Every key an Olive fine-tuning recipe may write, and what Grove does with it: honoured (and
where it lands), accepted with a warning that it has no effect here, or refused with what to do
instead. One table: the parser applies it (`sift`) and the README's key table is generated from it
(`python -m flows.config.fates`); tests check it covers Olive's own schema (tests/data/).

A pass's key that Olive defines only for a sibling pass type of the same family (QLoRA's
double_quant in a LoRA pass, OnnxMatMul4Quantizer's block_size in a ModelBuilder pass) is what
Olive ignores with a warning: Grove warns too, with its meaning and the pass type it belongs to.
Those fates are derived from every key of every pass type in the family (flows/config/olive_passes.py,
generated from Olive's wheels), never listed by hand; a key no pass type has stays a typo."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from flows.config.errors import ConfigError
from flows.config.olive_passes import PASSES

HONOURED, WARNED, REFUSED = "honoured", "warned", "refused"


@dataclass(frozen=True)
class Fate:
    fate: str
    note: str  # honoured: where it lands; warned/refused: why, and what to do instead
    dialect: str = "both"  # "0.6" (params_config, lora_r, ...), "0.13" (current Olive) or "both"
    same: tuple = ()  # values that mean what Grove does anyway: accepted without a word


def H(note: str, dialect: str = "both") -> Fate:
    return Fate(HONOURED, note, dialect)


def W(note: str, dialect: str = "both", same: tuple = ()) -> Fate:
    return Fate(WARNED, f"has no effect in Grove: {note}", dialect, same)


def R(note: str, dialect: str = "both", same: tuple = ()) -> Fate:
    return Fate(REFUSED, f"not supported: {note}", dialect, same)


NO_CODE = "Grove runs no user code; use text_template/text_cols (or prepare the data files beforehand)"
LOGS = "Grove logs through Prefect (PREFECT_LOGGING_LEVEL)"
EVALUATION = ("Olive's evaluators and metrics (accuracy, perplexity, latency, custom) are not run: Grove's "
              "evaluate and build_onnx stages score eval loss and perplexity, and task accuracy (a label) or "
              "exact match and chrF (grove.evaluate.answer: text), on base, fine-tuned and shipped models "
              "(grove.evaluate)")

_LORA = {
    "r": H("train.r (LoRA rank; default 64)", "0.13"),
    "lora_r": H("train.r (LoRA rank; default 64)", "0.6"),
    "alpha": H("train.alpha (default 16)", "0.13"),
    "lora_alpha": H("train.alpha (default 16)", "0.6"),
    "lora_dropout": H("train.dropout"),
    "target_modules": H("train.target_modules (checked against the model by the environment checks)"),
    "modules_to_save": H("train.modules_to_save: trained in full and saved with the adapter"),
    "torch_dtype": H("train.torch_dtype: dtype the base model is loaded in (None: Grove's per-device default)"),
    "train_data_config": H("data / corpus: the data config trained on (default: the first)"),
    "eval_data_config": H("data.eval_files and, with its own pre-processing, corpus/evaluate eval template"),
    "eval_dataset_size": H("data.eval_size: held-out fraction (or row count) when no eval_data_config"),
    "training_args": H("train.training_args: transformers TrainingArguments (see training_args below)"),
    "allow_tf32": W("TF32 matmuls follow torch's default"),
    "device_map": W("Grove places the model itself (one device per training process)", "0.13", same=("auto",)),
    "ephemeral_gpu_offload": W("Grove never offloads adapter weights", "0.13", same=(False,)),
    "bias": R("Grove trains the LoRA matrices only; remove it or set \"none\"", "0.6", same=("none",)),
    "use_ort_trainer": R("ONNX Runtime training; Grove trains with PyTorch", "0.6", same=(False,)),
    "ortmodule_onnx_opset_version": W("only used by the ONNX Runtime trainer", "0.6"),
}
_QLORA = {
    **_LORA,
    "compute_dtype": H("train.compute_dtype: bitsandbytes compute dtype"),
    "double_quant": H("train.double_quant"),
    "quant_type": H("train.quant_type (nf4/fp4)"),
    "save_quant_config": W("the adapter is saved without a quantization config; the merge loads the "
                           "full-precision base", "0.13"),
}

FATES: dict[str, dict[str, Fate]] = {
    "top": {
        "input_model": H("model (see input_model)"),
        "systems": H("build.execution_provider (a CUDA execution provider builds for CUDA)"),
        "data_configs": H("data, corpus (see data_configs)"),
        "passes": H("which stages run: LoRA/QLoRA -> train, MergeAdapterWeights -> merge, ModelBuilder -> "
                    "build_onnx"),
        "engine": H("see engine"),
        "workflow_id": H("name (unless grove.name)"),
        "grove": H("Grove's own section (see below)"),
        "$comment": H("a comment: read by people only"),
        "$schema": H("a comment: read by editors only"),
        "evaluators": W(EVALUATION),
        "pass_flows": W("the passes run in the recipe's order: LoRA/QLoRA, MergeAdapterWeights, ModelBuilder", "0.6"),
        "auto_optimizer_config": W("Grove runs the passes the config lists", "0.6"),
        "azureml_client": R("Azure ML; Grove runs locally or on Prefect workers", "0.6"),
        "data_root": R("give data_files (or load_dataset data_dir) relative to the working directory or the "
                       "config's folder", "0.6"),
    },
    "engine": {
        "cache_dir": H("artifact_root (unless grove.artifact_root): the artifact store, a folder or s3:// URL"),
        "output_dir": H("output_dir: where the finished model is exported"),
        "output_name": H("name (unless grove.name or workflow_id)", "0.6"),
        "host": H("checked: must name a system in systems"),
        "target": H("checked: must name a system in systems; its execution providers pick the build"),
        "execution_providers": H("build.execution_provider (CUDAExecutionProvider -> cuda, else cpu)", "0.6"),
        "log_severity_level": W(LOGS),
        "ort_log_severity_level": W(LOGS),
        "ort_py_log_severity_level": W(LOGS),
        "log_to_file": W(LOGS),
        "search_strategy": W("Grove does not search pass options (see grove.quantization_search)",
                             same=(False, None)),
        "clean_cache": W("Grove's cache is keyed by content; use `grove run --from-stage` to redo stages",
                         same=(False,)),
        "clean_evaluation_cache": W("evaluation results are cached by content", same=(False,)),
        "evaluator": W(EVALUATION),
        "evaluate_input_model": W("the evaluate stage always scores the base and the fine-tuned model"),
        "packaging_config": W("the model is stored in the artifact store and exported to output_dir"),
        "plot_pareto_frontier": W("no search, no frontier", same=(False,)),
        "cache_config": W("the artifact store is engine.cache_dir or grove.artifact_root", "0.13"),
        "enable_shared_cache": W("the artifact store is shared by whoever reads its root", "0.13", same=(False,)),
        "no_artifacts": W("Grove always stores every stage's artifacts", "0.13", same=(False,)),
    },
    "input_model": {
        "type": H("HfModel or PyTorchModel (others refused)"),
        "config": H("the 0.6 PyTorchModel options (see input_model.config)", "0.6"),
        "model_path": H("model: a local HF folder, a cached hub name, or grove:<bundled>"),
        "task": R("Grove fine-tunes causal language models", same=("text-generation",)),
        "load_kwargs": H("trust_remote_code -> model.trust_remote_code (its other keys are warned)", "0.13"),
        "model_loading_args": H("trust_remote_code -> model.trust_remote_code", "0.6"),
        "adapter_path": H("model.adapter_path: training starts from this peft adapter (digested)"),
        "model_file_format": H("checked: PyTorch.MLflow (Azure ML) refused"),
        "model_attributes": W("Grove reads the model's config.json"),
        "io_config": W("the ONNX inputs/outputs come from onnxruntime-genai's builder"),
        "test_model_path": W("an Olive test option", "0.13"),
        "test_model_config": W("an Olive test option", "0.13"),
    },
    "input_model.config": {
        "hf_config": H("see input_model.config.hf_config", "0.6"),
        "model_path": H("model", "0.6"),
        "adapter_path": H("model.adapter_path", "0.6"),
        "model_file_format": H("checked: PyTorch.MLflow (Azure ML) refused", "0.6"),
        "model_attributes": W("Grove reads the model's config.json", "0.6"),
        "io_config": W("the ONNX inputs/outputs come from onnxruntime-genai's builder", "0.6"),
        "dummy_inputs_func": W("the builder makes its own inputs", "0.6"),
        "model_loader": R(NO_CODE, "0.6"),
        "model_script": R(NO_CODE, "0.6"),
        "script_dir": R(NO_CODE, "0.6"),
        "mlflow_transformer_model_cache_dir": R("MLflow models; use a local HF folder", "0.6"),
    },
    "input_model.config.hf_config": {
        "model_name": H("model", "0.6"),
        "task": R("Grove fine-tunes causal language models", "0.6", same=("text-generation",)),
        "from_pretrained_args": H("trust_remote_code -> model.trust_remote_code", "0.6"),
        "model_loading_args": H("trust_remote_code -> model.trust_remote_code", "0.6"),
        "model_class": W("Grove loads AutoModelForCausalLM", "0.6", same=(None, "AutoModelForCausalLM")),
        "feature": W("an ONNX export option of Olive 0.6", "0.6"),
        "components": R("multi-component models", "0.6"),
    },
    "systems.*": {
        "type": H("LocalSystem or PythonEnvironment (AzureML, Docker: refused)"),
        "config": H("accelerators (see systems.*.config)"),
        "accelerators": H("see systems.*.accelerators[]"),
    },
    "systems.*.config": {
        "accelerators": H("see systems.*.accelerators[]"),
        "olive_managed_env": W("Grove runs in its own environment", same=(False, None)),
        "hf_token": W("Grove never reaches for a model hub", same=(False, None)),
        "python_environment_path": W("Grove runs in its own environment"),
        "environment_variables": W("set them where the worker runs"),
        "prepend_to_path": W("set PATH where the worker runs"),
    },
    "systems.*.accelerators[]": {
        "device": H("cpu or gpu (others refused); gpu with no execution_providers builds for CUDA, as Olive "
                    "picks CUDAExecutionProvider for it"),
        "execution_providers": H("build.execution_provider: cuda when one is CUDAExecutionProvider, else cpu"),
        "memory": W("Grove sizes no work by accelerator memory", "0.13"),
    },
    "data_configs[]": {
        "name": H("referred to by train_data_config / eval_data_config"),
        "type": H("HuggingfaceContainer only (others refused)"),
        "load_dataset_config": H("see load_dataset"),
        "pre_process_data_config": H("see pre_process"),
        "params_config": H("0.6: load_dataset keys plus component_kwargs.pre_process_data", "0.6"),
        "post_process_data_config": W("Grove's corpus needs no post-processing"),
        "dataloader_config": W("batch sizes come from training_args and grove.evaluate.batch_size"),
        "user_script": R(NO_CODE),
        "script_dir": R(NO_CODE),
    },
    "load_dataset": {
        "type": H("huggingface_dataset only (others refused)"),
        "data_name": H("data.format: json, csv or parquet (hub datasets refused: nothing is downloaded)"),
        "data_files": H("data.files: files, globs, folders or s3:// prefixes; listed and hashed at each run start"),
        "data_dir": H("data.files: relative data_files (default: every data file) are found under this folder"),
        "subset": H("data.files: a sub-folder of data_dir (a hub config name has no meaning for local files)"),
        "split": H("data.split"),
        "trust_remote_code": W("local data files run no code"),
        "col_filters": R("filter the data files beforehand", "0.13"),
    },
    "pre_process": {
        "type": H("text-generation pre-processing only (others refused)"),
        "dataset_type": H("checked: corpus only", "0.6"),
        "text_cols": H("corpus.text_cols / data.text_cols"),
        "text_template": H("corpus.text_template; a trailing {column} is the answer evaluation asks for: a label, "
                           "or free text with grove.evaluate.answer: text"),
        "corpus_strategy": H("corpus.corpus_strategy: join, join-random or line-by-line", "0.6"),
        "strategy": H("corpus.corpus_strategy: join, join-random or line-by-line", "0.13"),
        "source_max_len": H("corpus.source_max_len", "0.6"),
        "max_seq_len": H("corpus.source_max_len", "0.13"),
        "pad_to_max_len": H("corpus.pad_to_max_len"),
        "max_samples": H("data.max_samples"),
        "add_special_tokens": H("corpus.add_special_tokens: bos/eos around each row"),
        "random_seed": H("corpus.random_seed: join-random's shuffle"),
        "use_attention_mask": W("Grove always passes the attention mask", same=(True,)),
        "stride": R("join-sliding-window is not supported; use join or line-by-line", same=(None,)),
        "joiner": W("Grove joins rows with the tokenizer's special tokens", same=(None,)),
        "drop_short_sequences": W("Grove keeps every row", same=(False,)),
        "padding_side": W("Grove pads on the right", "0.13", same=("right",)),
        "processing_batch_size": W("a speed option of Olive's tokenization"),
        "random_retries": W("join-random never resamples here"),
        "chat_template": R("chat templates are not applied; write the prompt format in text_template", "0.13",
                           same=(None, False)),
        "message_col": W("only read with chat_template", "0.13", same=("messages",)),
        "text_formatting_func": R(NO_CODE),
        "user_script": R(NO_CODE),
        "script_dir": R(NO_CODE),
    },
    "passes.*": {
        "type": H("LoRA, QLoRA, MergeAdapterWeights or ModelBuilder (others refused)"),
        "config": H("the pass's options (0.6 nesting; 0.13 writes them next to type)"),
        "host": W("every stage runs where the flow runs"),
        "evaluator": W(EVALUATION),
        "disable_search": W("Grove does not search pass options", "0.6", same=(True, False)),
        "clean_run_cache": W("use `grove run --from-stage` to redo stages", "0.6", same=(False,)),
        "output_name": W("stage outputs are named by the store", "0.6"),
    },
    "passes.LoRA": _LORA,
    "passes.QLoRA": _QLORA,
    "passes.MergeAdapterWeights": {},
    "passes.ModelBuilder": {
        "precision": H("build.precision"),
        "int4_block_size": H("build.block_size"),
        "int4_accuracy_level": H("build.accuracy_level"),
        "int4_is_symmetric": H("build.is_symmetric"),
        "int4_op_types_to_quantize": H("build.op_types_to_quantize"),
        "int4_nodes_to_exclude": H("build.nodes_to_exclude", "0.13"),
        "int4_algo_config": H("build.algo", "0.13"),
        "extra_options": H("build (typed fields) or build.extra_options, checked against the installed builder"),
        "enable_cuda_graph": H("build.extra_options.enable_cuda_graph (CUDA builds)"),
        "use_cuda_bf16": H("build.extra_options.use_cuda_bf16 (CUDA builds)", "0.13"),
        "use_qdq": H("build.extra_options.use_qdq", "0.13"),
        "include_hidden_states": H("build.extra_options.include_hidden_states", "0.13"),
        "use_8bits_moe": H("build.extra_options.use_8bits_moe", "0.13"),
        "metadata_only": R("Grove builds the whole model", same=(False,)),
        "exclude_embeds": R("the model would take embeddings instead of token ids", same=(False,)),
        "exclude_lm_head": R("the model would return hidden states instead of logits", same=(False,)),
        "use_webgpu_fp32": R("WebGPU; Grove builds for CPU or CUDA", "0.13", same=(False,)),
        "search": W("genai_config.json keeps the builder's search defaults; evaluate/benchmark use "
                    "grove.evaluate / grove.benchmark"),
    },
    "training_args": {
        **{key: W("managed by Grove (artifact store, logging)") for key in (
            "output_dir", "overwrite_output_dir", "logging_dir", "report_to", "push_to_hub", "hub_model_id",
            "hub_token", "resume_from_checkpoint")},
        **{key: W("checkpoints go to the artifact store every grove.checkpoint_steps steps") for key in (
            "save_strategy", "save_steps", "save_total_limit", "save_only_model")},
        "group_by_length": H("train.training_args.train_sampling_strategy: group_by_length"),
    },
}
# training_args: every other key is a transformers TrainingArguments field (checked against the
# installed transformers; old names renamed: flows/config/training.py).

# What switching to a pass type Grove runs would give (the advice of a sibling key's warning).
USE_INSTEAD = {"QLoRA": "use type QLoRA to train on a 4-bit base", "LoRA": "use type LoRA to train a full-precision base"}


def _sibling_fates(kind: str) -> dict[str, Fate]:
    """The keys of the other pass types of `kind`'s family that `kind` itself does not have."""
    own, family = FATES[f"passes.{kind}"], PASSES[kind]["family"]
    owners: dict[str, list[tuple[str, str, str]]] = {}
    for other, entry in PASSES.items():
        if other != kind and entry["family"] == family:
            for key, (meaning, dialect) in entry["keys"].items():
                if key not in own:
                    owners.setdefault(key, []).append((other, meaning, dialect))
    fates = {}
    for key, found in sorted(owners.items()):
        found.sort(key=lambda o: (o[0] not in USE_INSTEAD, o[0]))  # the types Grove runs first
        dialects = {dialect for _, _, dialect in found}
        fates[key] = Fate(WARNED, _sibling_note(kind, key, found), "both" if len(dialects) > 1 else dialects.pop())
    return fates


def _sibling_note(kind: str, key: str, owners: list[tuple[str, str, str]]) -> str:
    types = [name for name, _, _ in owners]
    named = ", ".join(types[:3]) + (f" and {len(types) - 3} more" if len(types) > 3 else "")
    meaning = next((m for _, m, _ in owners if m), "")
    if meaning and not meaning[:2].isupper():  # "Whether to ..." -> "whether to ...", "ONNX ..." kept
        meaning = meaning[0].lower() + meaning[1:]
    own = FATES[f"passes.{kind}"].get(f"int4_{key}")
    if own is not None and own.fate == HONOURED:
        advice = f"this pass's own setting is int4_{key}"
    elif types[0] in USE_INSTEAD:
        advice = USE_INSTEAD[types[0]]
    else:
        advice = f"Grove does not run {'these passes' if len(types) > 1 else types[0] + ' passes'}"
    return (f"{key} applies to {named}" + (f" ({meaning})" if meaning else "")
            + f"; this {kind} pass ignores it, as Olive does; {advice}")


# passes.<type> -> the keys of its sibling pass types, each warned about and dropped
SIBLINGS: dict[str, dict[str, Fate]] = {section: _sibling_fates(section.removeprefix("passes."))
                                        for section in FATES if section.removeprefix("passes.") in PASSES}


def sift(section: str, raw: dict, where: str, warn: Callable[[str, str], None]) -> dict:
    """`raw` without its warned keys (each warned about); a refused key is an error. Honoured and
    unknown keys stay: the section's schema reads the first and names the second."""
    table, siblings = FATES[section], SIBLINGS.get(section, {})
    kept: dict[str, Any] = {}
    for key, value in raw.items():
        fate = table.get(key) or siblings.get(key)
        if fate is None or fate.fate == HONOURED:
            kept[key] = value
        elif any(value is same or (type(value) is type(same) and value == same) for same in fate.same):
            continue  # says what Grove does anyway
        elif fate.fate == REFUSED:
            raise ConfigError(f"{where}.{key}" if where else key, fate.note)
        else:
            warn(f"{where}.{key}" if where else key, fate.note)
    return kept


def known_keys(section: str) -> list[str]:
    """The section's key names, for did-you-mean: its own and, for a pass, its siblings' (a typo of
    double_quant in a LoRA pass is pointed at double_quant, which then warns with its meaning)."""
    return list(FATES[section]) + list(SIBLINGS.get(section, {}))


def readme_table() -> str:
    """The README's key table (between the FATES markers)."""
    lines = []
    for section, table in FATES.items():
        if not table:
            lines += [f"**`{section}`**: no options.", ""]
            continue
        lines += [f"**`{section}`**", "", "| key | Olive | fate | what Grove does |", "|---|---|---|---|"]
        for key, fate in table.items():
            same = f" (none when {', '.join(map(repr, fate.same))})" if fate.same and fate.fate != HONOURED else ""
            note = fate.note.replace("|", "\\|")
            lines.append(f"| `{key}` | {fate.dialect} | {fate.fate}{same} | {note} |")
        lines.append("")
        if SIBLINGS.get(section):
            lines += [_siblings_line(section), ""]
    return "\n".join(lines).rstrip() + "\n"


def _siblings_line(section: str) -> str:
    """One line per pass section: the sibling keys warned about, grouped by the pass types owning them."""
    by_owners: dict[str, list[str]] = {}
    kind = section.removeprefix("passes.")
    family = PASSES[kind]["family"]
    for key in SIBLINGS[section]:
        owners = [n for n, e in PASSES.items() if n != kind and e["family"] == family and key in e["keys"]]
        by_owners.setdefault(", ".join(owners), []).append(f"`{key}`")
    groups = "; ".join(f"{owners}: {', '.join(keys)}" for owners, keys in sorted(by_owners.items()))
    return (f"Keys of the other {family} pass types that {kind} lacks: warned (with the key's meaning and what to "
            f"do instead) and ignored, as Olive ignores them. {groups}.")


if __name__ == "__main__":
    print(readme_table(), end="")
