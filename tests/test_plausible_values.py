"""Values the schema accepts but that cannot mean what they say are an error or a warning at their
key path when the config is read, never accepted silently: an implausible learning rate, mixed
precision on a training that runs on the CPU, a data_name the files' extension contradicts, LoRA
on more top layers than the model has (flows/config/plausible.py, flows/config/data.py)."""

from __future__ import annotations

import copy
import shutil

import pytest

from conftest import TONE_DATA, tiny_config
from flows.config import ConfigError, parse_config

ARGS = "passes.lora.config.training_args"
DATA_NAME = "data_configs.tone.load_dataset_config.params.data_name"


@pytest.fixture
def base(tiny_model, tmp_path):
    return tiny_config(tiny_model, TONE_DATA, tmp_path / "store", tmp_path / "out")


def parse(raw, tmp_path, **kwargs):
    warnings: list[str] = []
    return parse_config(copy.deepcopy(raw), base_dir=tmp_path, warnings=warnings, **kwargs), warnings


def training_args(raw) -> dict:
    return raw["passes"]["lora"]["config"]["training_args"]


@pytest.mark.parametrize("rate", [5, 1.0, 40.0])
def test_a_learning_rate_no_fine_tuning_uses_is_an_error_at_its_key_path(base, tmp_path, rate):
    training_args(base)["learning_rate"] = rate
    with pytest.raises(ConfigError) as caught:
        parse(base, tmp_path)
    assert caught.value.path == f"{ARGS}.learning_rate"
    assert "is not a fine-tuning learning rate" in caught.value.message and "1e-7..1e-2" in caught.value.message


@pytest.mark.parametrize("rate, said", [(0.05, "above the usual"), (0.5, "above the usual"),
                                        (1e-9, "below the usual"), (1e-3, None), (1e-2, None), (5e-6, None)])
def test_a_learning_rate_outside_the_usual_range_is_warned_at_its_key_path(base, tmp_path, rate, said):
    training_args(base)["learning_rate"] = rate
    config, warnings = parse(base, tmp_path)
    about = [w for w in warnings if w.startswith(f"{ARGS}.learning_rate: ")]
    assert (about[0].split(": ", 1)[1].startswith(f"{rate:g} is {said}") if said else not about), warnings
    assert config.train.training_args["learning_rate"] == rate  # warned, still what the config says


@pytest.mark.parametrize("warmup, said", [(3, True), (1000, True), (2, False), (0.5, False)])
def test_a_warmup_as_long_as_the_training_is_warned_at_its_key_path(base, tmp_path, warmup, said):
    training_args(base)["warmup_steps"] = warmup  # max_steps 3; 0.5: a ratio, as transformers reads it
    _, warnings = parse(base, tmp_path)
    about = [w for w in warnings if w.startswith(f"{ARGS}.warmup_steps: ")]
    assert (about == [f"{ARGS}.warmup_steps: {warmup}, but max_steps is 3: the learning rate only warms up and "
                      f"never reaches learning_rate; give fewer warmup steps (often 5-10% of max_steps)"]
            if said else not about), warnings


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_mixed_precision_on_a_cpu_training_is_warned_and_not_in_the_resolved_settings(base, tmp_path, device):
    """On this machine (CPU torch) `auto` trains on the CPU too: what the run will do is what
    `grove validate --resolved` shows and what the train key holds."""
    from flows.config.plausible import cpu_training

    if device == "auto" and cpu_training("auto", False, True) is None:
        pytest.skip("this machine trains on CUDA")
    base["grove"]["device"] = device
    training_args(base).update(bf16=True, fp16=True, tf32=True, optim="paged_adamw_32bit")
    config, warnings = parse(base, tmp_path)
    for flag in ("bf16", "fp16", "tf32"):
        assert any(w.startswith(f"{ARGS}.{flag}: turned off: training runs on the CPU") for w in warnings), warnings
        assert flag not in config.train.training_args
    assert any(w.startswith(f"{ARGS}.optim: paged_adamw_32bit: paged optimizers need CUDA") for w in warnings)
    assert config.train.training_args["optim"] == "adamw_torch"


def test_mixed_precision_is_left_to_the_machine_that_trains_when_this_one_is_not_it(base, tmp_path):
    """Deploy-time checks (not this machine's run) keep bf16: the worker's train stage decides."""
    base["grove"]["device"] = "cpu"
    training_args(base)["bf16"] = True
    config, warnings = parse(base, tmp_path, list_remote_data=False)
    assert config.train.training_args["bf16"] is True and not any(".bf16:" in w for w in warnings)


@pytest.mark.parametrize("data_name, suffix, found", [("parquet", "jsonl", "JSON"), ("csv", "jsonl", "JSON"),
                                                      ("json", "csv", "CSV"), ("parquet", "csv", "CSV"),
                                                      ("csv", "parquet", "parquet")])
def test_a_data_name_the_files_extension_contradicts_is_an_error_at_data_name(base, tmp_path, data_name, suffix,
                                                                               found):
    data = tmp_path / f"tone.{suffix}"
    shutil.copyfile(TONE_DATA, data)  # the check is on the names: the bytes are never read
    base["data_configs"][0]["load_dataset_config"]["params"].update(data_name=data_name, data_files=str(data))
    with pytest.raises(ConfigError) as caught:
        parse(base, tmp_path)
    assert caught.value.path == DATA_NAME
    assert caught.value.message.startswith(f"{data_name!r}, but {data} is {found} by its .{suffix} extension")


def test_lora_top_layers_beyond_the_models_layers_is_an_error_and_its_count_is_fine(base, tmp_path, tiny_model):
    import json

    layers = json.loads((tiny_model / "config.json").read_text())["num_hidden_layers"]
    base["grove"]["lora_top_layers"] = layers
    assert parse(base, tmp_path)[0].train.top_layers == layers
    base["grove"]["lora_top_layers"] = layers + 1
    with pytest.raises(ConfigError) as caught:
        parse(base, tmp_path)
    assert caught.value.path == "grove.lora_top_layers"
    assert caught.value.message == (f"{layers + 1}, but {tiny_model} has {layers} decoder layers; give at most "
                                    f"{layers}, or leave it out to adapt every layer")
