"""The shipped ONNX model's quality on any data (grove/teacher_forcing.py), and the ladder and the gate
judging by it when the data has no label column."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import TONE_DATA, tiny_config

UNLABELLED = "### Text: {phrase}\n### The tone is: {tone}."  # ends with text: no label column


def damage(folder: Path) -> None:
    """Multiplies the LM head's weights (or, quantized, their scales) by 50: a build that loads and
    generates, with confidently wrong logits."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(folder / "model.onnx"))
    floats = [t for t in model.graph.initializer if "lm_head" in t.name and t.data_type == onnx.TensorProto.FLOAT]
    target = max(floats, key=lambda t: int(np.prod(t.dims)))
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * 50, target.name))
    for old in folder.glob("model.onnx*"):
        old.unlink()
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")


def tone_examples(tokenizer, rows: int) -> list[dict]:
    """Completion-only examples as template_corpus makes them, one of them padded on the right."""
    examples = []
    for line in TONE_DATA.read_text().splitlines()[:rows]:
        row = json.loads(line)
        prompt = tokenizer(f"### Text: {row['phrase']}\n### The tone is:\n", add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["tone"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = [tokenizer.bos_token_id] + prompt + answer
        examples.append({"input_ids": ids, "labels": [-100] * (len(ids) - len(answer)) + answer})
    examples[3] = {"input_ids": examples[3]["input_ids"] + [tokenizer.pad_token_id] * 9,
                   "labels": examples[3]["labels"] + [-100] * 9}
    return examples


def test_teacher_forced_onnx_loss_is_pytorchs_and_a_damaged_weight_shows(tiny_model, tmp_path):
    """On an fp32 build the ONNX model's teacher-forced loss is PyTorch's on the same positions (so
    base, fine-tuned and shipped numbers compare), agrees on every top-1 token with ~0 KL, whatever
    the batching; a damaged LM head loads and generates but its loss and KL leave every bound."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grove.engines import OnnxEngine
    from grove.settings import MAX_KL, MAX_LOSS_INCREASE, BuildSettings
    from grove.teacher_forcing import score_engine
    from tasks.build_onnx.builder import run_builder
    from tasks.evaluate import forward_pass

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    examples = tone_examples(tokenizer, 40)
    parts: list = []
    loss, _ = forward_pass(model, examples, 16, parts)
    reference = tuple(np.concatenate([p[i] for p in parts]) for i in (0, 1))
    built = tmp_path / "fp32" / "model"
    run_builder(tiny_model, built, BuildSettings(precision="fp32"), False)

    engine = OnnxEngine(built, {tokenizer.eos_token_id})
    scores = score_engine(engine, examples, 16, reference, tokenizer.pad_token_id)
    assert abs(scores["eval_loss"] - loss) < 1e-3, (scores, loss)
    assert scores["token_agreement"] == 1.0 and scores["kl_from_merged"] < 1e-4
    assert scores["scored_tokens"] == sum(sum(label != -100 for label in e["labels"][1:]) for e in examples)
    one_by_one = score_engine(engine, examples, 1, reference, tokenizer.pad_token_id)
    assert one_by_one["eval_loss"] == pytest.approx(scores["eval_loss"], abs=1e-4)

    damage(built)
    broken = score_engine(OnnxEngine(built, {tokenizer.eos_token_id}), examples, 16, reference,
                          tokenizer.pad_token_id)
    assert broken["eval_loss"] - loss > 10 * MAX_LOSS_INCREASE and broken["kl_from_merged"] > 10 * MAX_KL
    # scaled logits keep every top-1 token: agreement alone cannot see this damage, loss and KL do
    assert broken["token_agreement"] == 1.0


def test_without_a_label_the_ladder_and_the_gate_judge_by_eval_loss_and_catch_a_damaged_build(
        tiny_model, prefect_api, tmp_path, write_config, monkeypatch):
    """No label column: the search keeps the smallest candidate within the eval-loss bound of the
    merged model, so a smaller int8 build with a damaged weight is passed over for fp32; the gate
    (tolerance_metric eval_loss, metric onnx_token_agreement) promotes the good build and, when the
    damaged one is all a run has, refuses it by max_loss_increase_from_fine_tuned. The report shows
    base / fine-tuned / shipped eval loss, perplexity, agreement and KL."""
    import tasks.build_onnx.stage as build_module
    from flows.optimize import optimize
    from grove.settings import MAX_LOSS_INCREASE

    real = build_module.run_builder

    def damaging(source, target, build, *args):
        printed = real(source, target, build, *args)
        if build.precision == "int8":
            damage(target)
        return printed

    monkeypatch.setattr(build_module, "run_builder", damaging)
    raw = tiny_config(tiny_model, TONE_DATA, tmp_path / "store", tmp_path / "out")
    raw["data_configs"][0]["pre_process_data_config"]["params"]["text_template"] = UNLABELLED
    raw["grove"]["quantization_search"] = {"candidates": [{"name": "int8", "precision": "int8"},
                                                          {"name": "fp32", "precision": "fp32"}]}
    result = optimize(str(write_config(raw)))
    report = json.loads(Path(result["report_path"]).read_text())
    search = report["quantization_search"]
    rows = {r["name"]: r for r in search["candidates"]}
    assert search["tolerance_metric"] == "eval_loss" and search["tolerance"] == MAX_LOSS_INCREASE
    assert rows["int8"]["accuracy"] is None and rows["int8"]["size_bytes"] < rows["fp32"]["size_bytes"]
    assert rows["int8"]["eval_loss"] > search["baseline_eval_loss"] + MAX_LOSS_INCREASE
    assert rows["int8"]["reason"].startswith("outside tolerance")
    assert search["chosen"] == "fp32" and search["within_tolerance"], search["verdict"]
    promotion = report["promotion"]
    assert promotion["decision"] == "promoted", promotion
    assert promotion["metric"] == "onnx_token_agreement" and promotion["tolerance_metric"] == "eval_loss"
    assert "max_loss_increase_from_fine_tuned" in promotion["reason"]
    quality = {row["model"].split(" ")[0]: row for row in report["quality"]}
    assert set(quality) == {"base", "fine_tuned", "shipped"}
    assert quality["shipped"]["token_agreement"] == 1.0 and abs(quality["shipped"]["loss_increase"]) < 1e-3
    assert all(quality[m]["eval_loss"] > 0 and quality[m]["perplexity"] > 1 for m in quality)
    markdown = (tmp_path / "out" / "tiny" / "report.md").read_text()
    assert "## Quality on the eval split" in markdown and "| shipped (fp32) |" in markdown

    # the damaged build alone: the ladder has nothing within tolerance, and the gate refuses it
    raw["grove"]["quantization_search"]["candidates"] = [{"name": "int8", "precision": "int8"}]
    result = optimize(str(write_config(raw, "damaged.json")))
    report = json.loads(Path(result["report_path"]).read_text())
    assert {s["stage"]: s["status"] for s in report["stages"]}["train"] == "cached"
    assert not report["quantization_search"]["within_tolerance"]
    promotion = report["promotion"]
    assert promotion["decision"] == "not_promoted" and promotion["rule"] == "max_loss_increase_from_fine_tuned"
    assert promotion["quality"]["shipped_eval_loss"] > promotion["quality"]["built_from_eval_loss"] + MAX_LOSS_INCREASE
