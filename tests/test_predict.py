"""The number Grove reports is the user's number: on a real tiny run, the shipped folder's own
README snippet, `grove predict` and the build_onnx evaluation give the same answer on every
eval row, and the shipped prompt tokenizes exactly as training did (bos included)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import seed_store, tiny_config
from flows.cli import app
from grove.store import ArtifactStore
from grove.textdata import read_jsonl

runner = CliRunner()


@pytest.fixture(scope="module")
def shipped(tiny_model, trained_store, tmp_path_factory):
    from flows.optimize import optimize

    folder = tmp_path_factory.mktemp("predict")
    data = folder / "tone.jsonl"
    data.write_text(Path(__file__).resolve().parents[1].joinpath("configs/data/tone.jsonl").read_text())
    # the session's trained entries: training and the merge come from the cache
    raw = tiny_config(tiny_model, data, seed_store(trained_store, folder / "store"), folder / "out")
    raw["grove"]["evaluate"]["max_rows"] = 12
    raw["grove"]["promotion"] = {"enabled": False}
    (folder / "run.json").write_text(json.dumps(raw))
    result = optimize(str(folder / "run.json"))
    statuses = {s["stage"]: s["status"] for s in result["stages"]}
    assert {statuses[s] for s in ("template_corpus", "train", "merge_adapters")} == {"cached"}, statuses
    store = ArtifactStore(str(folder / "store"))

    def entry(stage: str) -> Path:
        record = next(s for s in result["stages"] if s["stage"] == stage)
        return store.materialize(store.lookup(stage, record["key"]))

    evaluation = json.loads((entry("build_onnx") / "onnx_eval.json").read_text())
    rows = read_jsonl(entry("load_data"), "eval")[:12]
    return {"model": Path(result["model_path"]), "evaluation": evaluation, "rows": rows}


def test_the_shipped_folder_carries_its_prompt_and_tokenizes_as_training_did(shipped, tiny_model):
    from transformers import AutoTokenizer

    spec = json.loads((shipped["model"] / "grove_prompt.json").read_text())
    bos = AutoTokenizer.from_pretrained(tiny_model).bos_token
    assert spec["prompt_template"] == bos + "### Text: {phrase}\n### The tone is:\n"
    assert spec["fields"] == ["phrase"] and spec["label_col"] == "tone" and spec["max_new_tokens"] == 3
    assert shipped["evaluation"]["prompts_unlike_training"] == 0
    assert len(shipped["evaluation"]["predictions"]) == len(shipped["rows"]) == 12


def test_the_readme_snippet_answers_every_eval_row_as_the_evaluation_did(shipped):
    readme = (shipped["model"] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    code = code.replace('"THIS_FOLDER"', repr(str(shipped["model"]))).replace('phrase="..."', "phrase=PHRASE")
    answers = []
    for row in shipped["rows"]:
        scope = {"PHRASE": row["phrase"]}
        exec(compile(code, "README.md snippet", "exec"), scope)  # noqa: S102 - the user's code, verbatim
        answers.append(scope["answer"])
    assert answers == shipped["evaluation"]["predictions"]


def test_grove_predict_answers_every_eval_row_as_the_evaluation_did(shipped):
    texts = [row["phrase"] for row in shipped["rows"]]
    result = runner.invoke(app, ["predict", "--model", str(shipped["model"]), *texts])
    assert result.exit_code == 0, result.output
    assert result.stdout.split("\n")[: len(texts)] == shipped["evaluation"]["predictions"]


def test_predict_refuses_a_folder_grove_did_not_ship(tmp_path):
    result = runner.invoke(app, ["predict", "--model", str(tmp_path), "hello"])
    assert result.exit_code == 2 and "has no grove_prompt.json" in " ".join(result.output.split())
    missing = runner.invoke(app, ["predict", "--model", str(tmp_path / "nowhere"), "hello"])
    assert missing.exit_code == 2 and f"error: --model {tmp_path / 'nowhere'}: no such folder" in missing.output


def test_predict_says_which_input_is_not_text_before_loading_a_model(tmp_path):
    binary = tmp_path / "texts.txt"
    binary.write_bytes(b"fine\n\xff\xfe\x00 not text\n")
    array = tmp_path / "rows.json"
    array.write_text('[{"phrase": "Could you kindly advise?"}]\n')  # a JSON array, not JSON Lines
    for args, stdin, said in ([["--input", str(binary)], None, f"error: {binary}:2: not UTF-8 text"],
                              [["-"], b"\xff\xfe bad\n", "error: standard input:1: not UTF-8 text"],
                              [["-i", str(array)], None, f"error: {array}:1: not a JSON object"]):
        result = runner.invoke(app, ["predict", "--model", str(tmp_path), *args], input=stdin)
        assert result.exit_code == 2 and result.output.startswith(said), result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_predict_reads_standard_input_and_jsonl_or_text_files(shipped, tmp_path):
    texts = [row["phrase"] for row in shipped["rows"]]
    expected = shipped["evaluation"]["predictions"]
    piped = runner.invoke(app, ["predict", "--model", str(shipped["model"]), "-"], input="\n".join(texts) + "\n")
    assert piped.exit_code == 0, piped.output
    answers = lambda out: out.split("\n")[:-1]  # noqa: E731 - a tiny model's answers hold \x1c: not splitlines
    assert answers(piped.stdout) == expected, "one answer per line of standard input"
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(row) for row in shipped["rows"]) + "\n\n")  # labels too: ignored
    batch = runner.invoke(app, ["predict", "--model", str(shipped["model"]), "--input", str(rows)])
    assert batch.exit_code == 0 and answers(batch.stdout) == expected, batch.output
    lines = tmp_path / "texts.txt"
    lines.write_text("\n".join(texts[:3]))
    both = runner.invoke(app, ["predict", "--model", str(shipped["model"]), "-i", str(lines), texts[3]])
    assert both.exit_code == 0 and answers(both.stdout) == [*expected[3:4], *expected[:3]], both.output


@pytest.mark.parametrize("args, stdin, said", [
    (["", ], None, "error: text 1 is empty: nothing to answer"),
    (["  "], None, "error: text 1 is empty"),
    (["-"], "\n\n", "error: standard input: no text to answer"),
    (["--input", "{rows}"], None, "rows.jsonl:2: no 'phrase' (the prompt template's fields: phrase)"),
    (["--input", "{nulls}"], None, "nulls.jsonl:1: 'phrase' is empty: nothing to answer"),
])
def test_predict_refuses_an_empty_text_and_a_row_without_the_fields(shipped, tmp_path, args, stdin, said):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"phrase": "Could you kindly advise?"}\n{"text": "hi"}\n')
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text('{"phrase": null}\n')  # not the text "None"
    result = runner.invoke(app, ["predict", "--model", str(shipped["model"]),
                                 *[a.format(rows=rows, nulls=nulls) for a in args]], input=stdin)
    assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output
