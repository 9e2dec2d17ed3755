"""Every Olive key has one fate (flows/config/fates.py): honoured into settings, warned about, or
refused; the table covers Olive's own schema and is what the README shows; the shipped configs
mean what they meant before the config package was split."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from config_snapshot import SNAPSHOTS, parse_shipped
from conftest import ROOT, TONE_DATA, tiny_config
from flows.config import ConfigError, parse_config
from flows.config.fates import FATES, HONOURED, REFUSED, SIBLINGS, WARNED, readme_table
from flows.config.olive import SCHEMAS
from flows.config.olive_passes import PASSES
from grove.settings import MAX_KL, MAX_LOSS_INCREASE

DATA = Path(__file__).parent / "data"
# tests/data/olive*_keys.json section -> the fates section that covers it
DIALECTS = {"0.13": "olive013_keys.json", "0.6": "olive06_keys.json"}


@pytest.fixture
def base(tiny_model, tmp_path):
    return tiny_config(tiny_model, TONE_DATA, tmp_path / "store", tmp_path / "out")


# ---- the table against Olive and against the code -------------------------------------------------
@pytest.mark.parametrize("dialect", DIALECTS)
def test_every_key_of_olives_schema_has_a_fate_for_its_dialect(dialect):
    olive = json.loads((DATA / DIALECTS[dialect]).read_text())
    missing = [f"{section}.{key}" for section, keys in olive.items() for key in keys
               if key not in FATES[section] or FATES[section][key].dialect not in ("both", dialect)]
    assert not missing, f"Olive {dialect} keys without a fate for that dialect: {missing}"


def test_honoured_keys_are_exactly_the_schema_fields():
    """A schema field nobody lists would be read silently; a listed key no schema reads would be lost."""
    for section, schema in SCHEMAS.items():
        honoured = {k for k, f in FATES[section].items() if f.fate == HONOURED}
        assert honoured == set(schema.model_fields), section


@pytest.mark.parametrize("dialect", DIALECTS)
def test_the_pass_key_lists_agree_with_the_snapshot_of_olives_schema(dialect):
    """flows/config/olive_passes.py (every key of every pass type of the families, with Olive's
    description) and tests/data's key lists come from the same wheels by two readers: they agree
    on the pass types both hold."""
    olive = json.loads((DATA / DIALECTS[dialect]).read_text())
    for kind in ("LoRA", "QLoRA", "MergeAdapterWeights", "ModelBuilder"):
        keys = {k for k, (_, spelled) in PASSES[kind]["keys"].items() if spelled in ("both", dialect)}
        assert keys == set(olive[f"passes.{kind}"]), kind
    assert {"LoftQ", "OnnxConversion"} <= {k for k, p in PASSES.items() if all(m for m, _ in p["keys"].values())}


def test_readme_key_table_is_generated_from_the_code_table():
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- FATES:START (python -m flows.config.fates) -->\n", "<!-- FATES:END -->"
    assert start in readme and end in readme
    assert readme.split(start, 1)[1].split(end, 1)[0] == readme_table()


# ---- each warned key warns, each refused key is refused, by key path --------------------------------
def _place(raw: dict, section: str, key: str, value, model: str) -> str:
    """Puts `key` where `section` lives in the tiny config; returns the key path Grove reports."""
    lora, builder = raw["passes"]["lora"]["config"], raw["passes"]["builder"]["config"]
    data = raw["data_configs"][0]
    if section.startswith("input_model.config"):
        raw["input_model"] = {"type": "PyTorchModel", "config": {"hf_config": {"model_name": model}}}
    if section == "passes.QLoRA":
        raw["passes"]["lora"]["type"] = "QLoRA"
    targets = {
        "top": (raw, ""), "engine": (raw["engine"], "engine."), "input_model": (raw["input_model"], "input_model."),
        "input_model.config": (raw["input_model"].get("config"), "input_model.config."),
        "input_model.config.hf_config": ((raw["input_model"].get("config") or {}).get("hf_config"),
                                         "input_model.config.hf_config."),
        "systems.*": (raw["systems"]["local_system"], "systems.local_system."),
        "systems.*.config": (raw["systems"]["local_system"].setdefault("config", {}), "systems.local_system.config."),
        "systems.*.accelerators[]": (raw["systems"]["local_system"]["accelerators"][0],
                                     "systems.local_system.accelerators[0]."),
        "data_configs[]": (data, "data_configs[0]."),
        "load_dataset": (data["load_dataset_config"]["params"], "data_configs.tone.load_dataset_config.params."),
        "pre_process": (data["pre_process_data_config"]["params"], "data_configs.tone.pre_process_data_config.params."),
        "passes.*": (raw["passes"]["lora"], "passes.lora."),
        "passes.LoRA": (lora, "passes.lora.config."), "passes.QLoRA": (lora, "passes.lora.config."),
        "passes.ModelBuilder": (builder, "passes.builder.config."),
        "training_args": (lora["training_args"], "passes.lora.config.training_args."),
    }
    target, prefix = targets[section]
    target[key] = value
    return prefix + key


CASES = [(s, k, f.fate) for s, table in FATES.items() for k, f in table.items() if f.fate in (WARNED, REFUSED)]


def test_each_warned_key_warns_and_each_refused_key_is_refused_naming_its_key_path(base, tiny_model, tmp_path):
    unexpected = []
    for section, key, fate in CASES:
        raw = copy.deepcopy(base)
        path = _place(raw, section, key, "not-what-grove-does", str(tiny_model))
        warnings: list[str] = []
        try:
            parse_config(raw, base_dir=tmp_path, warnings=warnings)
            outcome = WARNED if any(w.startswith(f"{path}: has no effect in Grove") for w in warnings) else "silent"
        except ConfigError as exc:
            outcome = REFUSED if exc.path == path and exc.message.startswith("not supported: ") else f"error {exc}"
        if outcome != fate:
            unexpected.append(f"{path}: {fate} expected, got {outcome}")
    assert not unexpected, unexpected


@pytest.mark.parametrize("section", sorted(s for s, keys in SIBLINGS.items() if keys))
def test_a_key_of_a_sibling_pass_type_is_warned_with_its_meaning_and_ignored(section, base, tiny_model, tmp_path):
    """Every key Olive defines for another pass type of the family (QLoRA's double_quant in a LoRA
    pass, OnnxMatMul4Quantizer's block_size in a ModelBuilder pass), all at once: each warned at its
    key path with the pass type it belongs to and its meaning, and the run is what it is without them."""
    warnings: list[str] = []
    plain = copy.deepcopy(base)
    if section == "passes.QLoRA":
        plain["passes"]["lora"]["type"] = "QLoRA"
    expected = parse_config(copy.deepcopy(plain), base_dir=tmp_path).model_dump()
    raw, paths = copy.deepcopy(plain), {}
    for key in SIBLINGS[section]:
        paths[key] = _place(raw, section, key, "not-what-grove-does", str(tiny_model))
    parsed = parse_config(raw, base_dir=tmp_path, warnings=warnings)
    kind = section.removeprefix("passes.")
    for key, path in paths.items():
        owner, (meaning, _) = next((n, p["keys"][key]) for n, p in PASSES.items()
                                   if n != kind and p["family"] == PASSES[kind]["family"] and key in p["keys"])
        said = [w for w in warnings if w.startswith(f"{path}: {key} applies to ")]
        assert len(said) == 1 and owner in said[0] and f"this {kind} pass ignores it" in said[0], (path, warnings)
        assert meaning[1:] in said[0], said[0]
    assert parsed.model_dump() == expected


def test_a_value_that_means_what_grove_does_is_accepted_without_a_word(base, tmp_path):
    raw = copy.deepcopy(base)
    raw["engine"]["search_strategy"] = False
    raw["data_configs"][0]["pre_process_data_config"]["params"]["use_attention_mask"] = True
    raw["passes"]["builder"]["config"]["metadata_only"] = False
    warnings: list[str] = []
    parse_config(raw, base_dir=tmp_path, warnings=warnings)
    assert warnings == []


# ---- the seed document's config runs as written --------------------------------------------------------
def test_the_seed_documents_config_validates_and_plans_as_written_with_the_double_quant_warning(tiny_phi3, tmp_path):
    """configs/phi3-lora-seed.json, as `grove validate` and `grove stages` read it (the commands, in a
    subprocess: exit code and output as a user sees them). Phi-3-mini is not here offline: a tiny
    Phi-3 folder stands in for the model name, the one change; its data path is relative, as written."""
    raw = json.loads((ROOT / "configs" / "phi3-lora-seed.json").read_text())
    raw["input_model"]["config"]["hf_config"]["model_name"] = str(tiny_phi3)
    (tmp_path / "seed.json").write_text(json.dumps(raw))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tone.jsonl").symlink_to(TONE_DATA)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for command in ("validate", "stages"):
        done = subprocess.run([sys.executable, "-m", "flows.cli", command, "--config", "seed.json"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        assert ("passes.lora.config.double_quant: double_quant applies to QLoRA (whether to use nested quantization"
                in output), output
        assert "this LoRA pass ignores it, as Olive does; use type QLoRA to train on a 4-bit base" in output
        assert "Traceback" not in output and "error" not in output.lower()
    assert all(re.search(rf"^{stage} ", done.stdout, re.M) for stage in ("load_data", "train", "build_onnx",
                                                                       "benchmark")), output


# ---- the shipped configs keep their meaning ---------------------------------------------------------
# honoured now, silently dropped before the split: the only differences allowed
NEWLY_HONOURED = {"phi3-tone.json": {("train", "compute_dtype"): "bfloat16"},
                  "smollm2-tone-cuda.json": {("train", "compute_dtype"): "bfloat16"}}
# settings added since the snapshots, at their defaults in every shipped config
ADDED_SINCE = {("train", "nodes"): 1, (None, "placement"): {}, (None, "ship"): "merged",
               ("promotion", "max_drop_from_fine_tuned"): 0.02, ("promotion", "min_gain_over_base"): 0.05,
               ("evaluate", "answer"): "label", ("evaluate", "generation_rows"): 16, ("evaluate", "lm_eval"): None}
# changed on purpose since the snapshots: the default run's benchmark times each prompt once (the
# whole default run under 4 minutes on 2 cores; bench/README.md: The default run)
RETUNED = {"smollm2-tone.json": {("benchmark", "repeats"): 1}}
# A plain int4 build with a label to score now gets the ladder search by default (the model
# shipped keeps its accuracy), the CUDA ladder on CUDA; every other setting keeps its meaning.
LADDER_BY_DEFAULT = {"smollm2-tone.json", "smollm2-tone-nightly.json", "smollm2-tone-cuda.json", "phi3-tone.json",
                     # free-text answers (no label): the ladder judged by teacher-forced eval loss (issue 21)
                     "smollm2-commands.json"}
# Machine facts (grove/machine_facts.py) are resolved on the machine that runs the stage, not when
# the config is parsed: the benchmark's machine left the settings, train.processes stays `auto`.
MACHINE_FACTS = {("benchmark", "machine"): None, ("train", "processes"): "auto"}
# snapshotted when added, after ADDED_SINCE: they hold those settings already
SNAPSHOTTED_LATER = {"phi3-lora-seed.json", "smollm2-commands.json", "smollm2-capitals.json"}
# the label-free tolerances (issue 21), in every shipped config with a search or a gate: by
# accuracy as before where there is a label; the free-text example (no label) judges by eval loss,
# and a gate left at the default metric there gates on the shipped model's token agreement
UNLABELLED = {"smollm2-commands.json"}
LABEL_FREE_TOLERANCES = {("promotion", "tolerance_metric"): "accuracy",
                         ("promotion", "max_loss_increase_from_fine_tuned"): MAX_LOSS_INCREASE,
                         ("promotion", "max_kl_from_fine_tuned"): MAX_KL,
                         ("search", "tolerance_metric"): "accuracy", ("search", "max_loss_increase"): MAX_LOSS_INCREASE,
                         ("search", "max_kl"): MAX_KL}


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.json")))
def test_shipped_config_parses_as_before_the_split(name):
    before = json.loads((SNAPSHOTS / name).read_text())
    for (section, field), value in NEWLY_HONOURED.get(name, {}).items():
        assert before[section][field] is None
        before[section][field] = value
    for (section, field), value in RETUNED.get(name, {}).items():
        assert before[section][field] != value
        before[section][field] = value
    for (section, field), value in ADDED_SINCE.items() if name not in SNAPSHOTTED_LATER else ():
        target = before if section is None else before[section]
        if target is not None:
            assert field not in target
            target[field] = value
    for (section, field), value in LABEL_FREE_TOLERANCES.items():
        if before[section] is not None:
            assert field not in before[section]
            before[section][field] = "eval_loss" if name in UNLABELLED and field == "tolerance_metric" else value
    if name in UNLABELLED and before["promotion"]["metric"] == "onnx_accuracy":  # the default: never measured
        before["promotion"]["metric"] = "onnx_token_agreement"
    for (section, field), value in MACHINE_FACTS.items():
        if before[section] is not None:
            assert before[section].pop(field) in ("<machine>", "<processes>")
            if value is not None:
                before[section][field] = value
    # evaluate.max_new_tokens left unwritten is sized by the stages (EvalSettings.new_tokens): 8 for a
    # label, as the snapshot's default was; free text from its answers
    written = json.loads((ROOT / "configs" / name).read_text()).get("grove", {}).get("evaluate", {})
    if "max_new_tokens" not in written and before["evaluate"] is not None:
        assert before["evaluate"]["max_new_tokens"] == 8 and before["evaluate"].get("answer", "label") == "label"
        before["evaluate"]["max_new_tokens"] = None
    parsed = parse_shipped(name)
    if name in LADDER_BY_DEFAULT:
        from flows.config.candidates import ladder_names

        assert before["search"] is None and parsed["search"]["early_stop"] is True
        assert [c["name"] for c in parsed["search"]["candidates"]] == list(ladder_names(before["build"]["execution_provider"]))
        before["search"] = parsed["search"]
    assert parsed == before
