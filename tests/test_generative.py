"""The bundled generative example (configs/smollm2-commands.json): free-text answers, no label;
and standard benchmarks through lm-evaluation-harness on a local task (no hub download).

The config as shipped, with the tiny model in place of SmolLM2 and a short training: every
stage runs, and base, fine-tuned and shipped ONNX are scored by exact match and chrF on
greedy answers (grove/generation.py) instead of accuracy. The real model runs the same
config in test_the_bundled_generative_example_learns_its_answers (slow).
"""

from __future__ import annotations

import json
import logging
import re

import pytest

from conftest import ROOT

CONFIG = ROOT / "configs" / "smollm2-commands.json"
DATA = ROOT / "configs" / "data" / "home_commands.jsonl"


def commands_config(tmp_path, model=None) -> dict:
    raw = json.loads(CONFIG.read_text())
    raw["engine"] = {"cache_dir": str(tmp_path / "store"), "output_dir": str(tmp_path / "out")}
    raw["data_configs"][0]["load_dataset_config"]["params"]["data_files"] = str(DATA)
    if model is not None:  # the tiny model: two layers, a few steps, short answers
        raw["input_model"]["model_path"] = str(model)
        raw["grove"].pop("lora_top_layers")
        args = raw["passes"]["lora"]["config"]["training_args"]
        args.pop("num_train_epochs")
        args.update(max_steps=3)
        raw["grove"]["evaluate"].update(max_new_tokens=6, max_rows=8, generation_rows=4)
        raw["grove"]["benchmark"] = {"prompts": 1, "max_new_tokens": 4, "warmup": 0, "repeats": 1}
    return raw


def answer_warnings(config) -> list[str]:
    """What validate warns at grove.evaluate.answer for a config file."""
    from flows.config import load_config

    warnings: list[str] = []
    load_config(config, warnings=warnings)
    return [w for w in warnings if w.startswith("grove.evaluate.answer")]


def choice_task(folder) -> str:
    """A local lm-eval task (YAML + JSONL in one folder): four multiple-choice questions."""
    folder.mkdir()
    rows = [{"q": "Turn on the", "choices": ["lights", "seven", "blue"], "answer": 0},
            {"q": "Open the", "choices": ["purple", "door", "twelve"], "answer": 1},
            {"q": "Set the thermostat to", "choices": ["quickly", "green", "20 degrees"], "answer": 2},
            {"q": "Close the", "choices": ["window", "eleven", "loud"], "answer": 0}]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "home_choice.yaml").write_text(
        f"task: home_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'rows.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    return str(folder)


def stored_lines(store, stage: str, name: str) -> list[dict]:
    from grove.store import ArtifactStore

    artifacts = ArtifactStore(str(store))
    [entry] = artifacts.entries(stage)
    return [json.loads(line) for line in (artifacts.materialize(entry) / name).read_text().splitlines()]


def test_the_generative_example_scores_free_text_answers_as_served(tiny_model, tmp_path, write_config, caplog):
    from flows.optimize import optimize
    from grove.shipped import ShippedModel

    raw = commands_config(tmp_path, tiny_model)
    raw["grove"]["evaluate"].update(lm_eval_tasks=["home_choice"], lm_eval_include=choice_task(tmp_path / "tasks"))
    logger = logging.getLogger("grove.evaluate")  # Prefect's handlers hold "grove": no propagation
    logger.addHandler(caplog.handler)
    try:
        result = optimize(str(write_config(raw)))
    finally:
        logger.removeHandler(caplog.handler)
    # the JSON answers are far longer than the 6 new tokens: said, as it caps every model's score
    assert re.search(r"(\d+) of \1 eval answers are longer than grove.evaluate.max_new_tokens=6", caplog.text)
    assert [s["status"] for s in result["stages"]] == ["ran"] * 7, result["stages"]
    summary = {s["stage"]: s["summary"] for s in result["stages"]}
    # no label: nothing counted per label, no accuracy anywhere
    assert "train_labels" not in summary["load_data"]
    for name in ("base", "fine_tuned"):
        assert summary["evaluate"][name]["accuracy"] is None
        assert summary["evaluate"][name]["generation"]["rows"] == 4
    onnx = summary["build_onnx"]
    assert "accuracy" not in onnx and onnx["generation"]["rows"] == 4

    # the standard benchmark (a local lm-eval task) on base, fine-tuned and the shipped ONNX folder
    for scores in (summary["evaluate"]["base"], summary["evaluate"]["fine_tuned"], onnx):
        assert set(scores["lm_eval"]) == {"home_choice"} and 0 <= scores["lm_eval"]["home_choice"]["acc"] <= 1

    # every scored row is stored: the evaluate entry holds base and fine-tuned, build_onnx the shipped model
    store = tmp_path / "store"
    references = [json.loads(line)["json"] for line in DATA.read_text().splitlines()]
    evaluated = stored_lines(store, "evaluate", "generations.jsonl")
    assert [(r["model"], r["row"]) for r in evaluated] == [(m, i) for m in ("base", "fine_tuned") for i in range(4)]
    shipped_rows = stored_lines(store, "build_onnx", "generations.jsonl")
    for row in evaluated + shipped_rows:
        assert row["reference"] in references
        assert row["exact_match"] == (row["predicted"] == row["reference"]) and 0 <= row["chrf"] <= 100
    assert onnx["generation"]["exact_match"] == sum(r["exact_match"] for r in shipped_rows) / 4

    # the shipped rows are what the shipped folder answers (grove predict's code path)
    eval_rows = stored_lines(store, "load_data", "eval.jsonl")[:4]
    shipped = ShippedModel(tmp_path / "out" / "smollm2-commands" / "model")
    assert shipped.spec["label_col"] == "json" and shipped.spec["fields"] == ["command"]
    assert [shipped.answer(r) for r in eval_rows] == [r["predicted"] for r in shipped_rows]
    assert [r["json"] for r in eval_rows] == [r["reference"] for r in shipped_rows]

    # aggregates in report.json and report.md's Evaluation table (the Prefect report artifact is that markdown)
    out = tmp_path / "out" / "smollm2-commands"
    metrics = json.loads((out / "report.json").read_text())["metrics"]
    for model, scores in (("base", summary["evaluate"]["base"]), ("onnx", onnx)):
        assert metrics[f"{model}.generation.chrf"] == scores["generation"]["chrf"]
        assert metrics[f"{model}.generation.exact_match"] == scores["generation"]["exact_match"]
        assert metrics[f"{model}.lm_eval.home_choice.acc"] == scores["lm_eval"]["home_choice"]["acc"]
    markdown = (out / "report.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| model |"))
    assert "generation.chrf" in header and "generation.exact_match" in header
    assert f"chrF {onnx['generation']['chrf']}, exact {onnx['generation']['exact_match']}" in markdown


@pytest.mark.parametrize("change, where, words", [
    (lambda raw: raw["data_configs"][0]["pre_process_data_config"]["params"].update(
        text_template="Command: {command}\nJSON: {json}\n---"), "grove.evaluate.answer", "does not end with"),
    (lambda raw: raw["grove"].update(quantization_search={"candidates": "ladder", "tolerance_metric": "accuracy"}),
     "grove.quantization_search.tolerance_metric", "accuracy needs a label column"),
    (lambda raw: raw["grove"].update(promotion={"metric": "onnx_accuracy"}), "grove.promotion.metric",
     "needs a label column"),
    (lambda raw: raw["grove"]["evaluate"].update(answer="prose"), "grove.evaluate.answer", "label"),
    (lambda raw: raw["grove"]["evaluate"].update(lm_eval_tasks=["x"], lm_eval_include="no/such/tasks"),
     "grove.evaluate.lm_eval_include", "is not a folder"),
    # the answer in the prompt too: every score would measure copying
    (lambda raw: raw["data_configs"][0]["pre_process_data_config"]["params"].update(
        text_template="### Command: {command} ({json})\n### JSON:\n{json}"),
     "data_configs.commands_train.pre_process_data_config.params.text_template", "uses the answer column {json} in "
                                                                                  "the prompt too"),
])
def test_free_text_answers_refuse_what_they_cannot_do(tmp_path, write_config, change, where, words):
    from flows.config import ConfigError, load_config

    raw = commands_config(tmp_path)
    change(raw)
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(raw))
    assert caught.value.path == where and words in caught.value.message, caught.value


@pytest.mark.slow
@pytest.mark.long
def test_the_bundled_generative_example_learns_its_answers(tmp_path, write_config):
    """The real SmolLM2-135M on the config as shipped: about a quarter of an hour on 2 cores
    (generation of 16 answers per model is most of it), so it runs on request: `pytest -m long`."""
    from flows.optimize import optimize

    result = optimize(str(write_config(commands_config(tmp_path))))
    summary = {s["stage"]: s["summary"] for s in result["stages"]}
    base, tuned = summary["evaluate"]["base"]["generation"], summary["evaluate"]["fine_tuned"]["generation"]
    onnx = summary["build_onnx"]["generation"]
    # measured 2026-12-07 (2 cores): base chrF 0.47, exact 0; fine-tuned 95.68, 0.31; int4 ONNX 88.24, 0
    assert tuned["chrf"] > base["chrf"] + 50 and tuned["exact_match"] > base["exact_match"], (base, tuned)
    assert onnx["chrf"] > base["chrf"] + 50, (base, onnx)
    assert result["promotion"]["decision"] == "promoted", result["promotion"]


def test_free_text_left_as_a_label_is_warned_about_once_at_its_key(tmp_path, write_config, tiny_model, tone_copy):
    """A template whose last column holds sentences (here the example's JSON lines) under the
    default answer: label would be scored by exact first-line matches; validate says so at
    grove.evaluate.answer. As shipped (answer: text), and for real labels (tone), it is quiet."""
    from conftest import tiny_config

    raw = commands_config(tmp_path, tiny_model)
    raw["grove"]["evaluate"]["answer"] = "label"
    raw["grove"].pop("promotion")  # its metric, chrF, is a free-text one
    warnings = answer_warnings(write_config(raw, "as-label.json"))
    said = [w for w in warnings if w.startswith("grove.evaluate.answer: label, but the answer column 'json' "
                                                "reads as free text")]
    assert len(said) == 1 and "grove.evaluate.answer: text" in said[0], warnings
    assert not answer_warnings(write_config(commands_config(tmp_path, tiny_model), "as-text.json"))
    assert not answer_warnings(write_config(tiny_config(tiny_model, tone_copy, tmp_path / "s", tmp_path / "o"),
                                            "tone.json"))


def test_the_plan_says_the_rules_that_judge_free_text(tmp_path, write_config, tiny_model):
    """validate's plan names what the ladder and the gate judge free text by (teacher-forced eval
    loss, or KL when asked), not the accuracy rule they skip."""
    from flows.config import load_config
    from flows.plan_words import plan_lines

    raw = commands_config(tmp_path, tiny_model)
    build, promote = plan_lines(load_config(write_config(raw)))
    assert "with an eval loss at most 0.02 above the merged PyTorch model's ships (else the lowest eval_loss)" \
        in build and "accuracy" not in build, build
    assert "shipped eval loss at most 0.02 nats per token above the model it was built from " \
           "(max_loss_increase_from_fine_tuned)" in promote and "accuracy" not in promote, promote
    raw["grove"]["quantization_search"] = {"candidates": "ladder", "tolerance_metric": "kl", "max_kl": 0.05}
    raw["grove"]["promotion"].update(tolerance_metric="kl", max_kl_from_fine_tuned=0.03)
    build, promote = plan_lines(load_config(write_config(raw, "kl.json")))
    assert "with a KL from the merged PyTorch model of at most 0.05 ships" in build, build
    assert "shipped mean KL from the model it was built from at most 0.03 (max_kl_from_fine_tuned)" in promote


def test_a_multi_line_answer_is_scored_and_shipped_whole(tiny_model, tmp_path, write_config):
    """A free-text answer over several lines (a list, pretty-printed JSON, code): once learned, the
    fine-tuned and shipped models answer it whole and score exact match 1; cut at its first line
    break (as a label is), a perfect model scored 0. The shipped folder answers it whole too."""
    from conftest import TONE_DATA, learnable_config
    from flows.optimize import optimize
    from grove.shipped import ShippedModel

    answer = "joy\nfear"  # two lines of words the tiny tokenizer knows: learned in 30 steps
    phrases = [json.loads(line)["phrase"] for line in TONE_DATA.read_text().splitlines()][:80]
    data = tmp_path / "steps.jsonl"
    data.write_text("".join(json.dumps({"phrase": p, "steps": answer}) + "\n" for p in phrases))
    raw = learnable_config(tiny_model, str(data), str(tmp_path / "store"), tmp_path / "out")
    raw["data_configs"][0]["pre_process_data_config"]["params"].update(
        text_cols=["phrase", "steps"], text_template="### Text: {phrase}\n### Steps:\n{steps}")
    raw["grove"]["evaluate"].update(answer="text", max_rows=4, generation_rows=4)
    raw["grove"]["evaluate"].pop("max_new_tokens")  # left unset: sized from the answers
    raw["grove"].update(completion_only_loss=True, promotion={"enabled": False})
    result = optimize(str(write_config(raw)))
    summary = {s["stage"]: s["summary"] for s in result["stages"]}
    assert summary["evaluate"]["fine_tuned"]["generation"]["exact_match"] == 1.0, summary["evaluate"]
    assert summary["build_onnx"]["generation"]["exact_match"] == 1.0, summary["build_onnx"]
    assert summary["build_onnx"]["generation"]["examples"][0]["predicted"] == answer

    shipped = ShippedModel(tmp_path / "out" / "tiny" / "model")
    assert shipped.spec["whole_answer"] is True and shipped.answer({"phrase": phrases[0]}) == answer
    # left unset, the budget is the answer's tokens and 8 more, in the scoring and the shipped folder alike
    from transformers import AutoTokenizer

    answer_tokens = len(AutoTokenizer.from_pretrained(tiny_model)(answer, add_special_tokens=False)["input_ids"])
    assert shipped.spec["max_new_tokens"] == answer_tokens + 8, shipped.spec
    assert "answer = text\n" in (shipped.folder / "README.md").read_text()


def test_a_local_lm_eval_task_that_cannot_load_is_said_at_validate(tmp_path, write_config):
    """A task file of lm_eval_include that is not YAML (lm-eval skips it without a word) is named
    with its line; a task whose data file is missing is refused before training, not in evaluate.
    The folder's good task validates quietly."""
    from flows.config import ConfigError, load_config

    folder = choice_task(tmp_path / "tasks")
    (tmp_path / "tasks" / "broken.yaml").write_text("task: broken\ndataset_path: json\n  bad: [indent\n")
    good = (tmp_path / "tasks" / "home_choice.yaml").read_text()
    (tmp_path / "tasks" / "no_rows.yaml").write_text(
        good.replace("home_choice", "no_rows").replace("rows.jsonl", "missing.jsonl"))
    raw = commands_config(tmp_path)
    said = {}
    for task in ("broken", "no_rows"):
        raw["grove"]["evaluate"].update(lm_eval_tasks=["home_choice", task], lm_eval_include=folder)
        with pytest.raises(ConfigError) as caught:
            load_config(write_config(raw, f"{task}.json"))
        assert caught.value.path == "grove.evaluate.lm_eval_tasks[1]", caught.value
        said[task] = caught.value.message
    assert f"{tmp_path / 'tasks' / 'broken.yaml'}:3: not YAML" in said["broken"], said
    assert "'no_rows' (in lm_eval_include) does not load" in said["no_rows"] and "missing.jsonl" in said["no_rows"]
    raw["grove"]["evaluate"].update(lm_eval_tasks=["home_choice"])
    warnings: list[str] = []
    assert load_config(write_config(raw, "good.json"), warnings=warnings).evaluate.lm_eval.tasks == ["home_choice"]


def test_empty_answers_are_warned_about_masked_and_scored_as_identical(tmp_path, write_config, tiny_model):
    """Rows whose answer is empty or whitespace: validate says how many and where the first is; a
    completion-only corpus still masks their prompt (only eos is learned), as for any other row;
    and an empty answer given where the reference is empty scores chrF 100, like any identical one."""
    from flows.config import load_config
    from grove.generation import text_scores
    from grove.models import load_tokenizer
    from grove.settings import CorpusSettings
    from tasks.template_corpus import IGNORE, examples

    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    rows[4]["json"], rows[9]["json"] = "", "  "
    data = tmp_path / "blank.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = commands_config(tmp_path, tiny_model)
    raw["data_configs"][0]["load_dataset_config"]["params"]["data_files"] = str(data)
    warnings: list[str] = []
    load_config(write_config(raw), warnings=warnings)
    said = [w for w in warnings if "empty answer" in w]
    assert said == [f"grove.evaluate.answer: 2 of {len(rows)} rows have an empty answer ('json'), first at "
                    f"{data}:5: the model is trained to answer nothing to their prompts, and an empty answer "
                    f"scores as right there; drop or fill those rows"], warnings

    tokenizer = load_tokenizer(tiny_model)
    corpus = CorpusSettings(text_template="### Command: {command}\n### JSON:\n{json}", text_cols=["command", "json"],
                            label_col="json", completion_only_loss=True)
    (ids, labels), = examples([rows[4]], corpus, tokenizer)
    assert [t for t in labels if t != IGNORE] == [tokenizer.eos_token_id], "the prompt is not trained on"

    scores = text_scores(["", "on", "x"], ["", "on", ""])
    assert [r["chrf"] for r in scores["per_row"]] == [100.0, 100.0, 0.0]


def test_the_search_section_of_a_free_text_report_names_only_what_was_measured():
    """No accuracy without a label: the search's baseline line says its eval loss, not 'accuracy None'."""
    from flows.search_report import search_markdown
    from tasks.build_onnx.search import candidate_row, select_candidate

    rows = [candidate_row("int4", {"loaded": True, "eval_loss": 1.01, "size_bytes": 2**20})]
    selection = select_candidate(rows, 1.0, 0.02, "eval_loss")
    search = {"baseline_accuracy": None, "baseline_eval_loss": 1.0, "baseline": "merged PyTorch model",
              "tolerance_metric": "eval_loss", "tolerance": 0.02, "tolerance_points": 2.0, "chosen": selection.chosen,
              "within_tolerance": selection.within_tolerance, "verdict": selection.verdict,
              "candidates": selection.rows, "not_built": []}
    text = "\n".join(search_markdown(search))
    assert "Baseline: merged PyTorch model, eval loss 1.0; tolerance by eval_loss, 0.02 nats per token." in text
    assert "None" not in text, text


def test_a_label_column_scored_as_text_is_warned_about_once_at_its_key(tmp_path, write_config, tiny_model, tone_copy):
    """answer: text on a class column (the tone labels): validate says that accuracy per label and the
    accuracy rules are given up; free text under answer: text (the bundled example) stays quiet."""
    from conftest import tiny_config

    raw = tiny_config(tiny_model, tone_copy, tmp_path / "s", tmp_path / "o")
    raw["grove"]["evaluate"]["answer"] = "text"
    warnings = answer_warnings(write_config(raw, "tone-as-text.json"))
    said = [w for w in warnings if w.startswith("grove.evaluate.answer: text, but the answer column 'tone' reads "
                                                "as a label (4 distinct values in 60 rows)")]
    assert len(said) == 1 and "Leave grove.evaluate.answer at label" in said[0], warnings
    assert not answer_warnings(write_config(commands_config(tmp_path, tiny_model), "commands.json"))


def test_answers_cut_off_by_source_max_len_are_said_before_training(tiny_model, caplog):
    """A prompt that fills source_max_len leaves no answer token: with completion_only_loss training
    learned nothing and every eval loss was missing, and the search then refused every build as 'no
    candidate built a model that loads'. template_corpus says so before training; a few rows cut
    short are a warning."""
    from grove.errors import UserError
    from grove.models import load_tokenizer
    from grove.settings import CorpusSettings
    from tasks.template_corpus import check_answers_fit, examples, line_examples

    tokenizer = load_tokenizer(tiny_model)
    rows = [json.loads(line) for line in DATA.read_text().splitlines()][:4]
    rows[3]["json"] = " ".join([rows[3]["json"]] * 4)  # one answer four times as long

    def fit(source_max_len: int) -> None:
        corpus = CorpusSettings(text_template="### Command: {command}\n### JSON:\n{json}", text_cols=["command", "json"],
                                label_col="json", completion_only_loss=True, corpus_strategy="line-by-line",
                                source_max_len=source_max_len)
        pairs = examples(rows, corpus, tokenizer, evaluation=True)
        cut = line_examples(pairs, source_max_len, False, tokenizer.pad_token_id)
        check_answers_fit(cut, cut, pairs, corpus)

    with pytest.raises(UserError) as caught:
        fit(8)
    assert str(caught.value).startswith("pre_process_data_config.params.source_max_len=8 cuts off every training "
                                        "example's answer: no token to learn"), caught.value
    longest = max(len(examples([r], CorpusSettings(text_template="### Command: {command}\n### JSON:\n{json}",
                                                   text_cols=["command", "json"], label_col="json"),
                               tokenizer, evaluation=True)[0][0]) for r in rows[:3])
    logger = logging.getLogger("grove.template_corpus")  # Prefect's handlers hold "grove": no propagation
    logger.addHandler(caplog.handler)
    try:
        fit(longest)
    finally:
        logger.removeHandler(caplog.handler)
    assert f"1 of 4 eval rows are longer than pre_process_data_config.params.source_max_len={longest}: their " \
           f"answers are cut short there" in caplog.text


def test_a_label_over_several_lines_is_warned_about(tmp_path, write_config, tiny_model):
    """answer: label compares the first line generated with the whole label: labels that span lines
    (short ones, which do not read as free text) can never match; validate says so once."""
    from conftest import TONE_DATA, tiny_config
    from flows.config import load_config

    rows = [json.loads(line) for line in TONE_DATA.read_text().splitlines()][:60]
    for row in rows[::3]:
        row["tone"] = "joy\nfear"
    data = tmp_path / "two-line-labels.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    warnings: list[str] = []
    load_config(write_config(tiny_config(tiny_model, data, tmp_path / "s", tmp_path / "o")), warnings=warnings)
    said = [w for w in warnings if w.startswith("grove.evaluate.answer: label, but 20 of 60 answers in 'tone' "
                                                "span several lines")]
    assert len(said) == 1 and "Set grove.evaluate.answer: text" in said[0], warnings


def test_a_model_whose_eval_loss_is_not_finite_fails_evaluate(tiny_model):
    """A diverged training (NaN weights) gave an eval loss of NaN, written to the report as a number,
    and NaN compares as within every loss bound of the ladder and the gate; evaluate refuses it."""
    import torch

    from grove.models import load_causal_lm, load_tokenizer
    from grove.settings import CorpusSettings, EvalSettings
    from grove.stage import StageFailed
    from tasks.evaluate import measure
    from tasks.template_corpus import examples

    tokenizer = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model, "cpu").eval()
    rows = [json.loads(line) for line in DATA.read_text().splitlines()][:2]
    corpus = CorpusSettings(text_template="### Command: {command}\n### JSON:\n{json}", text_cols=["command", "json"],
                            label_col="json", completion_only_loss=True)
    eval_examples = [{"input_ids": ids, "labels": labels} for ids, labels in examples(rows, corpus, tokenizer, True)]
    settings = EvalSettings(text_template=corpus.text_template)
    assert measure(model, tokenizer, rows, eval_examples, settings, "base", 8)["eval_loss"] > 0
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(StageFailed, match="the fine-tuned model's eval loss is nan: its weights hold NaN or inf"):
        measure(model, tokenizer, rows, eval_examples, settings, "fine-tuned", 8)


def test_free_text_without_a_build_gets_a_gate_it_can_measure(tmp_path, write_config, tiny_model):
    """No ModelBuilder pass and grove.promotion.metric not written: the gate judges the merged
    model's chrF. It was refused at grove.promotion.metric, a key the config does not hold, whether
    the section was left out (fine_tuned_accuracy needs a label) or only its min was set
    (onnx_accuracy needs a ModelBuilder pass)."""
    from flows.config import load_config

    raw = commands_config(tmp_path, tiny_model)
    del raw["passes"]["builder"]
    for name, promotion in (("left-out", None), ("min-only", {"min": 10})):
        raw["grove"].pop("promotion", None)
        if promotion:
            raw["grove"]["promotion"] = promotion
        gate = load_config(write_config(raw, f"{name}.json")).promotion
        assert gate.metric == "fine_tuned_chrf" and gate.tolerance_metric == "eval_loss", (name, gate)
    assert gate.min == 10


def test_the_generation_budget_left_unset_fits_the_answers():
    """max_new_tokens unset: 8 for a label; for free text the longest answer and half again (8 more
    at least), never past 512 or half the model's context; a set value is kept as written."""
    from grove.settings import EvalSettings

    text = EvalSettings(text_template="{q} {a}", label_col="a", answer="text")
    assert text.new_tokens([3, 10], None) == 18 and text.new_tokens([40], 4096) == 60
    assert text.new_tokens([2000], 8192) == 512 and text.new_tokens([300], 512) == 256
    assert text.new_tokens([], None) == 8
    assert EvalSettings(text_template="{q} {a}", label_col="a").new_tokens([3, 10], None) == 8
    assert text.model_copy(update={"max_new_tokens": 5}).new_tokens([40], None) == 5
