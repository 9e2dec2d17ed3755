"""The promotion gate's default rules on real tiny runs (local store, the session's Prefect server).

The tiny model learns a one-label task (tests/test_nightly.py), so the base model scores 0
and a trained one 1: a model that was barely trained is not clearly above the base model.
Its int4 and fp32 builds keep every answer (measured: fp32, int4, int4 block 128 and hqq
all score 1.0), so the rule on the drop from the fine-tune is checked on a real run's stored
results with the ONNX accuracy lowered as a lossy quantization would lower it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from grove.settings import PromotionSettings
from tasks.promote import RULES, accuracies_of, decide, metrics_of, qualities_of, verdict_words

runner = CliRunner()


@pytest.fixture(scope="module")
def runs(learned_run, tmp_path_factory):
    """A trained run with the default gate (the session's learned_run), then a barely-trained one
    through the CLI on a copy of its store (run records and the promoted model included)."""
    import shutil

    folder = tmp_path_factory.mktemp("gate")
    shutil.copytree(learned_run["store"], folder / "store", ignore=shutil.ignore_patterns(".materialized"))
    raw = json.loads(json.dumps(learned_run["raw"]))
    raw["engine"] = {"cache_dir": str(folder / "store"), "output_dir": str(folder / "out")}
    raw["passes"]["lora"]["config"]["training_args"].update(max_steps=1, learning_rate=1e-4)
    (folder / "barely.json").write_text(json.dumps(raw))
    cli = runner.invoke(app, ["run", "--config", str(folder / "barely.json")])
    return {"trained": learned_run["result"], "cli": cli, "folder": folder}


def summary(result: dict, stage: str) -> dict:
    return next(s for s in result["stages"] if s["stage"] == stage)["summary"]


def test_the_default_gate_has_accuracy_rules():
    gate = PromotionSettings(model_name="x")
    assert gate.max_drop_from_fine_tuned == 0.02 and gate.min_gain_over_base > 0
    assert gate.tolerance_metric == "accuracy"
    assert list(RULES) == ["measured", "min", "max_drop_from_fine_tuned", "min_gain_over_base",
                           "max_loss_increase_from_fine_tuned", "max_kl_from_fine_tuned", "max_drop"]


def test_a_trained_model_that_keeps_its_accuracy_is_promoted_by_default(runs):
    trained = runs["trained"]
    scores, onnx = summary(trained, "evaluate"), summary(trained, "build_onnx")
    assert onnx["accuracy"] >= scores["fine_tuned"]["accuracy"] - 0.02
    assert onnx["accuracy"] >= scores["base"]["accuracy"] + 0.05
    assert trained["promotion"]["decision"] == "promoted" and trained["promotion"]["rule"] is None
    # the verdict names every rule it checked, with the numbers, not only `min`
    reason = trained["promotion"]["reason"]
    for rule in ("min", "max_drop_from_fine_tuned", "min_gain_over_base", "max_drop"):
        assert rule in reason, reason
    assert f"{onnx['accuracy'] * 100:.1f}" in reason and f"{scores['base']['accuracy'] * 100:.1f}" in reason
    assert trained["promotion"]["accuracy"] == {"shipped": onnx["accuracy"],
                                                "built_from": scores["fine_tuned"]["accuracy"],
                                                "base": scores["base"]["accuracy"]}


def test_a_barely_trained_model_is_built_reported_and_not_promoted(runs):
    cli, folder = runs["cli"], runs["folder"]
    assert cli.exit_code == 0, cli.output
    report = json.loads((folder / "out" / "tiny" / "report.json").read_text())
    scores = summary(report, "evaluate")
    # the premise: one step at a tiny learning rate leaves the model where the base model is
    assert scores["fine_tuned"]["accuracy"] < scores["base"]["accuracy"] + 0.05, scores
    promotion = report["promotion"]
    assert promotion["decision"] == "not_promoted" and promotion["rule"] == "min_gain_over_base", promotion
    assert "not clearly above the base model" in promotion["reason"]
    assert Path(report["model_path"], "model.onnx").is_file()  # built and shipped to output_dir all the same
    flat = " ".join(cli.output.split())
    assert "not promoted (failed rule min_gain_over_base)" in flat, cli.output
    assert "not promoted (failed rule min_gain_over_base)" in (folder / "out" / "tiny" / "report.md").read_text()
    # the trained model stays current
    models = runner.invoke(app, ["models", "--store", str(folder / "store"), "--json"])
    assert json.loads(models.output)["tiny"]["current"]["run_id"] == runs["trained"]["run_id"]


def test_an_onnx_model_that_lost_its_fine_tune_fails_max_drop_from_fine_tuned(runs):
    from grove.stage import ArtifactRef

    trained = runs["trained"]
    refs = {s["stage"]: ArtifactRef(stage=s["stage"], key=s["key"], uri=s["uri"], digest="d", summary=s["summary"])
            for s in trained["stages"]}
    tuned = summary(trained, "evaluate")["fine_tuned"]["accuracy"]
    gate = PromotionSettings(model_name="tiny")
    for lost, expected in ((0.019, None), (0.03, "max_drop_from_fine_tuned")):
        onnx = refs["build_onnx"]
        lossy = {**refs, "build_onnx": onnx.model_copy(update={"summary": {**onnx.summary,
                                                                           "accuracy": round(tuned - lost, 4)}})}
        decision, reason, rule = decide(gate, metrics_of(lossy), "new", None, accuracies_of(lossy))
        assert rule == expected, reason
        assert decision == ("promoted" if expected is None else "not_promoted")
    assert "below the model it was built from" in reason and "max_drop_from_fine_tuned" in reason
    assert verdict_words({"decision": decision, "rule": rule, "reason": reason})[0] == \
        "not promoted (failed rule max_drop_from_fine_tuned)"


def test_the_label_free_rules_judge_teacher_forced_loss_and_kl(runs):
    """tolerance_metric eval_loss / kl: the shipped model's teacher-forced eval loss (or KL) against
    the model it was built from decides, on a real run's stored numbers with the ONNX model's made
    worse as a damaged build's would be; the accuracy rules are then not applied."""
    from grove.stage import ArtifactRef

    trained = runs["trained"]
    refs = {s["stage"]: ArtifactRef(stage=s["stage"], key=s["key"], uri=s["uri"], digest="d", summary=s["summary"])
            for s in trained["stages"]}
    tuned_loss = summary(trained, "evaluate")["fine_tuned"]["eval_loss"]
    onnx = refs["build_onnx"]
    assert abs(onnx.summary["eval_loss"] - tuned_loss) < 0.01 and onnx.summary["token_agreement"] == 1.0
    for metric, field, worse, rule in (("eval_loss", "eval_loss", tuned_loss + 0.3, "max_loss_increase_from_fine_tuned"),
                                       ("kl", "kl_from_merged", 0.3, "max_kl_from_fine_tuned")):
        gate = PromotionSettings(model_name="tiny", tolerance_metric=metric)
        assert decide(gate, metrics_of(refs), "new", None, accuracies_of(refs), qualities_of(refs))[0] == "promoted"
        damaged = {**refs, "build_onnx": onnx.model_copy(update={"summary": {**onnx.summary, field: worse,
                                                                             "accuracy": 0.0}})}
        decision, reason, failed = decide(gate, metrics_of(damaged), "new", None, accuracies_of(damaged),
                                          qualities_of(damaged))
        assert (decision, failed) == ("not_promoted", rule), reason
