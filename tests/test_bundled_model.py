"""End to end on the real bundled model: SmolLM2-135M, the default config, the bundled tone data.

This is the run `make demo` does. It takes minutes on 2 cores (marked slow; CI runs it).
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import ROOT
from flows.cli import app


@pytest.mark.slow
def test_default_config_fine_tunes_the_bundled_model_and_ships_a_working_onnx(tmp_path):
    raw = json.loads((ROOT / "configs" / "smollm2-tone.json").read_text())
    raw["engine"] = {"cache_dir": str(tmp_path / "store"), "output_dir": str(tmp_path / "out")}
    raw["data_configs"][0]["load_dataset_config"]["params"]["data_files"] = str(ROOT / "configs/data/tone.jsonl")
    config = tmp_path / "smollm2-tone.json"
    config.write_text(json.dumps(raw))

    result = CliRunner().invoke(app, ["run", "--config", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    report = json.loads((tmp_path / "out" / "smollm2-tone" / "report.json").read_text())
    summary = {s["stage"]: s["summary"] for s in report["stages"]}
    base, tuned = summary["evaluate"]["base"], summary["evaluate"]["fine_tuned"]
    assert tuned["accuracy"] > base["accuracy"], (base, tuned)
    assert tuned["eval_loss"] < base["eval_loss"]
    # the default config must generalise to phrases never seen in training, on every label
    assert tuned["accuracy"] >= 0.85, tuned
    assert min(label["accuracy"] for label in tuned["per_label"].values()) > 0.6, tuned["per_label"]
    onnx = summary["build_onnx"]
    assert onnx["precision"] == "int4" and onnx["accuracy"] is not None
    assert summary["benchmark"]["onnx"]["decode_tokens_per_s"] > 0
    assert (tmp_path / "out" / "smollm2-tone" / "model" / "genai_config.json").is_file()
