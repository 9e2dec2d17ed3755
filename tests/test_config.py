"""The run config: both Olive dialects accepted; every bad input a one-line error naming the key."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TONE_DATA, tiny_config
from flows.config import ConfigError, load_config, parse_config
from grove.errors import UserError


@pytest.fixture
def base(tiny_model, tmp_path):
    return tiny_config(tiny_model, TONE_DATA, tmp_path / "store", tmp_path / "out")


def error_of(raw: dict, tmp_path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, base_dir=tmp_path)
    message = str(caught.value)
    assert "\n" not in message, "errors are one line"
    return caught.value


def test_new_dialect_is_read_into_typed_settings(base, tmp_path):
    cfg = parse_config(base, base_dir=tmp_path)
    assert cfg.train.method == "lora" and cfg.train.r == 4 and cfg.train.alpha == 8
    assert cfg.data.text_cols == ["phrase", "tone"] and cfg.data.label_col == "tone"
    assert cfg.corpus.corpus_strategy == "line-by-line" and cfg.corpus.source_max_len == 64
    assert cfg.build.precision == "int4" and cfg.build.execution_provider == "cpu"
    assert cfg.merge is True
    assert cfg.artifact_root == str(tmp_path / "store")
    assert len(cfg.data.content_sha256) == 64


def test_olive_06_dialect_gives_the_same_settings(base, tiny_model, tmp_path):
    """PyTorchModel + hf_config, params_config with component_kwargs, `r`/`alpha` spellings."""
    new = parse_config(base, base_dir=tmp_path)
    old = copy.deepcopy(base)
    old["input_model"] = {"type": "PyTorchModel",
                          "config": {"hf_config": {"model_name": str(tiny_model), "task": "text-generation"}}}
    pre = old["data_configs"][0]["pre_process_data_config"]["params"]
    old["data_configs"][0] = {"name": "tone", "type": "HuggingfaceContainer",
                              "params_config": {"data_name": "json", "data_files": str(TONE_DATA), "split": "train",
                                                "component_kwargs": {"pre_process_data": pre}}}
    lora = old["passes"]["lora"]["config"]
    lora["r"], lora["alpha"] = lora.pop("lora_r"), lora.pop("lora_alpha")
    # older configs put engine keys at the top level
    old["cache_dir"] = old["engine"].pop("cache_dir")
    converted = parse_config(old, base_dir=tmp_path)
    assert converted.model_dump(exclude={"model"}) == new.model_dump(exclude={"model"})
    assert converted.model.path == new.model.path


def test_pass_options_may_sit_without_config_level_and_yaml_works(base, tmp_path):
    flat = copy.deepcopy(base)
    flat["passes"]["lora"] = {"type": "LoRA", **flat["passes"]["lora"]["config"]}
    flat["data_configs"][0]["load_dataset_config"] = flat["data_configs"][0]["load_dataset_config"]["params"]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(flat, sort_keys=False))
    assert load_config(path, base_dir=tmp_path) == parse_config(base, base_dir=tmp_path)


def test_shipped_default_config_is_valid():
    cfg = load_config(ROOT / "configs" / "smollm2-tone.json", base_dir=ROOT)
    assert cfg.model.bundled == "smollm2-135m-instruct"
    assert cfg.corpus.completion_only_loss is True


def test_phi3_recipe_config_validates_up_to_the_missing_model(tmp_path):
    """Everything in the recipe's config is accepted; only the hub model is not available offline."""
    with pytest.raises(ConfigError) as caught:
        load_config(ROOT / "configs" / "phi3-tone.json", base_dir=ROOT)
    assert caught.value.path == "input_model.config.hf_config.model_name"
    assert "not in the local Hugging Face cache" in caught.value.message
    assert "local folder" in caught.value.message


def test_phi3_recipe_config_runs_through_with_a_local_phi3_folder(tiny_phi3, tmp_path):
    raw = json.loads((ROOT / "configs" / "phi3-tone.json").read_text())
    raw["input_model"]["config"]["hf_config"]["model_name"] = str(tiny_phi3)
    cfg = parse_config(raw, base_dir=ROOT)
    assert cfg.train.method == "qlora" and cfg.train.r == 64 and cfg.train.double_quant
    assert cfg.train.training_args["eval_strategy"] == "steps"  # renamed from evaluation_strategy
    assert cfg.train.training_args["train_sampling_strategy"] == "group_by_length"
    assert cfg.build.execution_provider == "cuda"
    assert cfg.corpus.completion_only_loss is False  # Olive-faithful


@pytest.mark.parametrize("edit, path, words", [
    (lambda r: r["passes"]["lora"]["config"].update(lora_rr=8), "passes.lora.config.lora_rr", "did you mean 'lora_r'"),
    (lambda r: r["passes"]["lora"]["config"].update(lora_r="eight"), "passes.lora.config.lora_r", "integer"),
    (lambda r: r["engine"].update(cache_dri="x"), "engine.cache_dri", "did you mean 'cache_dir'"),
    (lambda r: r.update(pases={}), "pases", "did you mean 'passes'"),
    (lambda r: r["data_configs"][0]["pre_process_data_config"]["params"].update(text_cols=["phrase", "mood"],
     text_template="{phrase} {mood}"), "data_configs.tone.pre_process_data_config.params.text_cols",
     "column 'mood' is not in"),
    (lambda r: r["data_configs"][0]["pre_process_data_config"]["params"].update(text_template="{phrase} {tone} {x}"),
     "data_configs.tone.pre_process_data_config.params.text_template", "uses {x}"),
    (lambda r: r["passes"]["lora"]["config"].update(train_data_config="tnoe"),
     "passes.lora.config.train_data_config", "does not exist (did you mean 'tone'?)"),
    (lambda r: r["data_configs"][0]["load_dataset_config"]["params"].update(data_files="missing.jsonl"),
     "data_configs.tone.load_dataset_config.params.data_files", "data file not found: missing.jsonl"),
    (lambda r: r["systems"].update(aml={"type": "AzureML", "config": {}}), "systems.aml.type", "Azure ML"),
    (lambda r: r["data_configs"][0]["load_dataset_config"]["params"].update(
        data_files={"type": "azureml_datastore", "config": {}}),
     "data_configs.tone.load_dataset_config.params.data_files", "use a local path or s3:// URL"),
    (lambda r: r.update(input_model={"type": "HfModel", "model_path": {"type": "azureml_registry_model",
                                                                        "name": "phi3"}}),
     "input_model.model_path", "use a local path or s3:// URL"),
    (lambda r: r["passes"]["lora"]["config"]["training_args"].update(learnin_rate=1),
     "passes.lora.config.training_args.learnin_rate", "did you mean 'learning_rate'"),
    (lambda r: r["passes"].update(conv={"type": "OnnxConversion"}), "passes.conv.type", "unsupported pass type"),
    (lambda r: r["passes"]["builder"]["config"].update(precision="int3"), "passes.builder.config.precision", "int4"),
    (lambda r: r["passes"].pop("merge"), "passes", "MergeAdapterWeights"),
    (lambda r: r["engine"].update(host="gpu_box"), "engine.host", "not in systems"),
    (lambda r: r.update(input_model={"type": "HfModel", "model_path": "nobody/no-such-model"}),
     "input_model.model_path", "cannot be downloaded here"),
])
def test_bad_config_names_the_key(base, tmp_path, edit, path, words):
    raw = copy.deepcopy(base)
    edit(raw)
    error = error_of(raw, tmp_path)
    assert error.path == path, str(error)
    assert words in str(error)


def test_custom_code_model_needs_trust_remote_code(base, tiny_model, tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    config = json.loads((tiny_model / "config.json").read_text())
    config.update(model_type="my_custom_llm", auto_map={"AutoModelForCausalLM": "modeling_custom.MyModel"})
    (folder / "config.json").write_text(json.dumps(config))
    raw = copy.deepcopy(base)
    raw["input_model"]["model_path"] = str(folder)
    error = error_of(raw, tmp_path)
    assert error.path == "input_model.model_path" and "trust_remote_code" in error.message
    raw["input_model"]["load_kwargs"] = {"trust_remote_code": True}
    assert parse_config(raw, base_dir=tmp_path).model.trust_remote_code is True


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "passes": {,\n}')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value) and "line 2" in str(caught.value)


def test_bad_data_line_names_file_and_line(base, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text("not json\n")
    raw = copy.deepcopy(base)
    raw["data_configs"][0]["load_dataset_config"]["params"]["data_files"] = str(data)
    with pytest.raises(UserError) as caught:
        parse_config(raw, base_dir=tmp_path)
    assert str(caught.value).startswith(f"{data}:1: not valid JSON")


# ---- Olive 0.13 names and the keys a fine-tuning user expects honoured ------------------------------
def test_olive_013_strategy_and_max_seq_len_mean_corpus_strategy_and_source_max_len(base, tmp_path):
    new = copy.deepcopy(base)
    pre = new["data_configs"][0]["pre_process_data_config"]["params"]
    pre["strategy"], pre["max_seq_len"] = pre.pop("corpus_strategy"), pre.pop("source_max_len")
    pre["type"] = "text_generation_huggingface_pre_process"
    assert parse_config(new, base_dir=tmp_path) == parse_config(base, base_dir=tmp_path)
    pre["corpus_strategy"] = "join"
    with pytest.raises(ConfigError, match=r"pre_process_data_config\.params\.strategy: conflicts with corpus_strategy"):
        parse_config(new, base_dir=tmp_path)


def test_lora_and_pre_process_keys_land_in_settings(base, tmp_path):
    raw = copy.deepcopy(base)
    raw["passes"]["lora"]["type"] = "QLoRA"
    raw["passes"]["lora"]["config"].update(modules_to_save=["lm_head"], torch_dtype="float32",
                                           compute_dtype="float16", quant_type="fp4", double_quant=False)
    raw["data_configs"][0]["pre_process_data_config"]["params"].update(
        corpus_strategy="join-random", random_seed=7, add_special_tokens=False)
    cfg = parse_config(raw, base_dir=tmp_path)
    assert cfg.train.modules_to_save == ["lm_head"] and cfg.train.torch_dtype == "float32"
    assert (cfg.train.compute_dtype, cfg.train.quant_type, cfg.train.double_quant) == ("float16", "fp4", False)
    assert cfg.corpus.corpus_strategy == "join-random" and cfg.corpus.random_seed == 7
    assert cfg.corpus.add_special_tokens is False
    plain = parse_config(base, base_dir=tmp_path)
    assert plain.train.modules_to_save is None and plain.corpus.add_special_tokens is True


def test_unsupported_strategy_is_refused_naming_the_key(base, tmp_path):
    base["data_configs"][0]["pre_process_data_config"]["params"]["corpus_strategy"] = "join-sliding-window"
    error = error_of(base, tmp_path)
    assert error.path.endswith("pre_process_data_config.params.corpus_strategy")


def _adapter_folder(tmp_path: Path, **config) -> Path:
    adapter = tmp_path / "adapter"
    adapter.mkdir(exist_ok=True)
    body = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **config}
    (adapter / "adapter_config.json").write_text(json.dumps(body))
    return adapter


def test_input_model_adapter_path_is_resolved_and_digested(base, tmp_path):
    adapter = _adapter_folder(tmp_path)
    base["input_model"]["adapter_path"] = str(adapter)
    first = parse_config(base, base_dir=tmp_path).model
    assert first.adapter_path == str(adapter) and len(first.adapter_sha256) == 64
    (adapter / "adapter_model.safetensors").write_bytes(b"other weights")
    assert parse_config(base, base_dir=tmp_path).model.adapter_sha256 != first.adapter_sha256
    base["input_model"]["adapter_path"] = str(tmp_path / "nowhere")
    assert error_of(base, tmp_path).path == "input_model.adapter_path"


def test_training_from_an_adapter_takes_its_shape_where_the_pass_leaves_it_unset(base, tmp_path):
    base["input_model"]["adapter_path"] = str(_adapter_folder(tmp_path, r=2, lora_alpha=6))
    lora = next(p for p in base["passes"].values() if p["type"] in ("LoRA", "QLoRA"))["config"]
    for key in ("lora_r", "r", "lora_alpha", "alpha", "target_modules"):
        lora.pop(key, None)
    train = parse_config(base, base_dir=tmp_path).train
    assert (train.r, train.alpha, train.target_modules) == (2, 6, ["q_proj", "v_proj"])
    lora["r"] = 16  # a shape the adapter does not have: refused before any work, naming the key
    error = error_of(base, tmp_path)
    assert error.path.endswith(".r") and "r=2" in error.message


def test_an_adapter_that_is_not_lora_or_without_a_training_pass_is_refused(base, tmp_path):
    base["input_model"]["adapter_path"] = str(_adapter_folder(tmp_path, peft_type="IA3"))
    error = error_of(base, tmp_path)
    assert error.path == "input_model.adapter_path" and "IA3" in error.message
    base["input_model"]["adapter_path"] = str(_adapter_folder(tmp_path))
    base["passes"] = {k: v for k, v in base["passes"].items() if v["type"] == "ModelBuilder"}
    error = error_of(base, tmp_path)
    assert error.path == "input_model.adapter_path" and "LoRA or QLoRA pass" in error.message


def test_a_dtype_the_cpu_cannot_train_in_is_refused_before_work(base, tmp_path):
    lora = next(p for p in base["passes"].values() if p["type"] in ("LoRA", "QLoRA"))["config"]
    lora["torch_dtype"] = "float16"
    base.setdefault("grove", {})["device"] = "cpu"
    error = error_of(base, tmp_path)
    assert error.path.endswith(".torch_dtype") and "CUDA" in error.message


def test_data_dir_and_subset_locate_the_data_files(base, tmp_path):
    folder = tmp_path / "data" / "tone"
    folder.mkdir(parents=True)
    (folder / "part.jsonl").write_text(TONE_DATA.read_text())
    load = base["data_configs"][0]["load_dataset_config"]["params"]
    load.update(data_dir=str(tmp_path / "data"), subset="tone", data_files="part.jsonl")
    assert parse_config(base, base_dir=tmp_path).data.files == [str(folder / "part.jsonl")]
    del load["data_files"]  # no data_files: every data file under data_dir/subset
    assert parse_config(base, base_dir=tmp_path).data.files == [str(folder / "part.jsonl")]
    del load["data_dir"]
    error = error_of(base, tmp_path)
    assert error.path.endswith("load_dataset_config.params.subset") and "hub" in error.message


def test_eval_data_config_with_its_own_template_renders_the_eval_rows(base, tmp_path):
    eval_config = copy.deepcopy(base["data_configs"][0])
    eval_config["name"] = "tone_eval"
    eval_config["pre_process_data_config"]["params"]["text_template"] = "Phrase: {phrase}\nTone: {tone}"
    base["data_configs"].append(eval_config)
    base["passes"]["lora"]["config"]["eval_data_config"] = "tone_eval"
    cfg = parse_config(base, base_dir=tmp_path)
    assert cfg.corpus.eval_text_template == "Phrase: {phrase}\nTone: {tone}" and cfg.corpus.eval_label_col == "tone"
    assert cfg.evaluate.text_template == cfg.corpus.eval_text_template
    assert cfg.data.text_template == "### Text: {phrase}\n### The tone is:\n{tone}"
