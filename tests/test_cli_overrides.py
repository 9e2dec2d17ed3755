"""`key.path=value` overrides and --device on `grove validate`, `stages` and `run`: set on the config's
keys before validation, refused with the config's own one-line errors (saying they came from the
command line), recorded in the run record; the cache keys follow them."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from typer.testing import CliRunner

from conftest import ROOT, tiny_config
from flows.cli import app

runner = CliRunner()
STEPS = "passes.lora.config.training_args.max_steps"


def grove(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, result.output
    return " ".join(result.output.split())


def test_overrides_and_device_set_the_keys_validate_resolves(tiny_model, tone_copy, tmp_path, write_config):
    config = write_config(tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out"))
    resolved = runner.invoke(app, ["validate", "-c", str(config), "--resolved", f"{STEPS}=7", "grove.name=renamed",
                                   "grove.device=cuda", "--device", "cpu",
                                   "data_configs.tone.pre_process_data_config.params.max_samples=30"])
    assert resolved.exit_code == 0, resolved.output
    settings = json.loads(resolved.output[:resolved.output.rindex("}") + 1])
    assert settings["train"]["training_args"]["max_steps"] == 7 and settings["name"] == "renamed"
    assert settings["device"] == "cpu", "--device is the last word on grove.device"
    assert settings["data"]["max_samples"] == 30
    assert json.loads(config.read_text())["passes"]["lora"]["config"]["training_args"]["max_steps"] == 3, \
        "the file is left as it was"


def test_a_bad_override_gets_the_config_error_saying_it_came_from_the_command_line(tiny_model, tone_copy, tmp_path,
                                                                                write_config):
    config = str(write_config(tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out")))
    typo = grove("validate", "-c", config, "passes.lora.config.training_args.max_stepz=20", code=2)
    assert "passes.lora.config.training_args.max_stepz: unknown training argument (did you mean 'max_steps'?)" in typo
    assert "(from the command line: passes.lora.config.training_args.max_stepz=20)" in typo
    assert "Traceback" not in typo
    section = grove("stages", "-c", config, "passes.lroa.config.lora_r=8", code=2)
    assert "passes.lroa:" in section and "(did you mean 'lora'?)" in section and "from the command line" in section
    nested = grove("validate", "-c", config, "grove.evaluat.max_rows=3", code=2)
    assert "grove.evaluat: unknown key (did you mean 'evaluate'?) (from the command line" in nested, \
        "the hint is said once, not again by the override's own guess"
    flag = grove("validate", "-c", config, "grove.evaluate.max_rows=true", code=2)
    assert "grove.evaluate.max_rows: input should be a number, not true or false (got true)" in flag, \
        "true is not read as 1 row"
    assert "grove.name: string should have at least 1 character" in grove("validate", "-c", config, "grove.name=",
                                                                           code=2), "not silently grove-model"
    assert "passes.lora.config.precision: unknown key here (a ModelBuilder pass setting; set it on that pass)" in \
        grove("validate", "-c", config, "passes.lora.config.precision=int8", code=2)
    assert "passes.builder.config.training_args: unknown key here (a LoRA/QLoRA pass setting" in \
        grove("validate", "-c", config, "passes.builder.config.training_args={}", code=2)
    for command in ("stages", "run"):  # the option as the user typed it, not the flow's parameter name
        assert grove(command, "-c", config, "--from-stage", "trian", code=2).startswith(
            "error: --from-stage: unknown stage 'trian' (did you mean 'train'?)")
    candidates = 'grove.quantization_search.candidates=[{"name": "a", "int4_block_size": 7}]'
    listed = grove("validate", "-c", config, candidates, code=2)
    assert "grove.quantization_search.candidates[0].int4_block_size: input should be 16, 32, 64, 128 or 256 (got 7)" \
        in listed, "the mistake inside the list, not 'should be builtin or ladder'"
    value = grove("run", "-c", config, f"{STEPS}=-5", code=2)
    assert f"{STEPS}: must be a whole number of at least 1" in value and f"command line: {STEPS}=-5" in value
    assert "unknown key (did you mean 'device'?) (from the command line: grove.devic=cpu)" in \
        grove("validate", "-c", config, "grove.devic=cpu", code=2)
    assert "error: command line: override 'max_steps': write KEY.PATH=VALUE" in \
        grove("validate", "-c", config, "max_steps", code=2)
    assert "invalid value for '--device'" in grove("validate", "-c", config, "--device", "gpu", code=2).lower()


def test_a_run_with_overrides_records_them_and_the_plan_keys_follow(tiny_model, tone_copy, tmp_path, write_config):
    config = str(write_config(tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out")))
    grove("run", "-c", config, f"{STEPS}=2", "--device", "cpu")
    record = json.loads(runner.invoke(app, ["runs", "-c", config, "--json"]).output)[0]
    assert record["overrides"] == [f"{STEPS}=2", "grove.device=cpu"]
    # the settings grove diff compares: the file's keys with the overrides set, by key path
    assert record["settings"][STEPS] == "2" and record["settings"]["grove.device"] == '"cpu"'
    assert record["settings"]["passes.lora.config.lora_r"] == "4"
    assert f"overrides: {STEPS}=2 grove.device=cpu" in grove("show", record["run_id"][:8], "-c", config)
    same = grove("stages", "-c", config, f"{STEPS}=2", "--device", "cpu")
    assert len(re.findall(r"\bhit\b", same)) == 7, same
    as_written = grove("stages", "-c", config)  # max_steps 3 in the file: training and what follows rerun
    assert len(re.findall(r"\bhit\b", as_written)) == 2 and re.search(r"\btrain\W+miss\b", as_written), as_written


def test_an_override_mistake_is_one_line_from_the_real_command(tiny_model, tone_copy, tmp_path, write_config):
    config = write_config(tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out"))
    done = subprocess.run([sys.executable, "-m", "flows.cli", "validate", "-c", str(config), "grove.seed=x"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "grove.seed" in done.stderr and "(from the command line: grove.seed=x)" in done.stderr


def test_validate_resolved_is_pure_json_warns_once_and_the_plan_names_candidates_and_gate(tiny_model, tone_copy,
                                                                                       tmp_path, write_config):
    """`--resolved | jq` works: stdout is the JSON alone (the ok line and warnings on stderr, each
    warning once); validate, stages and the JSON name the ladder's rungs and the gate's rules."""
    from flows.config.candidates import LADDER

    config = str(write_config(tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out")))
    ladder = ['grove.quantization_search={"candidates": "ladder"}', "grove.promotion.min=0.25"]
    result = runner.invoke(app, ["validate", "-c", config, "--resolved", "passes.lora.config.training_args.bf16=true",
                                 *ladder])
    assert result.exit_code == 0, result.output
    settings = json.loads(result.stdout)
    assert settings["plan"]["build"]["candidates"] == list(LADDER)
    assert settings["plan"]["promotion"]["rules"][0] == "onnx_accuracy >= 0.25 (min)"
    warned = "passes.lora.config.training_args.bf16: turned off: training runs on the CPU"
    assert result.stderr.count(warned) == 1, result.stderr
    assert result.stderr.startswith(f"warning: {warned}") and f"ok: {config}" in result.stderr
    said = grove("validate", "-c", config, *ladder)
    assert f"build: {' -> '.join(LADDER)}: built in this order; the first within 2 accuracy points" in said, said
    assert "promote: tiny becomes current if onnx_accuracy >= 0.25 (min); shipped accuracy at most 2 points" in said
    planned = grove("stages", "-c", config, *ladder)
    assert f"build: {' -> '.join(LADDER)}:" in planned and "promote: tiny becomes current if" in planned
    single = grove("stages", "-c", config)
    assert "build: int4 block 32 symmetric cpu: the one build ships" in single, single
    # no accuracy: its rules are not applied, the teacher-forced loss rule is, and the default gate
    # metric is the label-free one
    free_text = grove("validate", "-c", config, "grove.evaluate.answer=text")
    assert "promote: tiny becomes current if onnx_token_agreement >= 0 (min); shipped eval loss at most 0.02 nats " \
           "per token above the model it was built from (max_loss_increase_from_fine_tuned); onnx_token_agreement " \
           "at most 0.02 below" in free_text, free_text
