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
