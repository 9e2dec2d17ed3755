"""Shipping what keeps its accuracy by default: a plain CPU int4 ModelBuilder pass becomes the
ladder search (rtn int4 with zero points, an 8-bit head and 8-bit sensitive layers first, then more precision),
built in order and stopped at the first candidate within tolerance."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, learnable_config, one_label_rows, seed_store, tiny_config
from flows.config import load_config
from flows.config.candidates import LADDER


def test_the_bundled_config_ships_through_the_ladder_by_default():
    cfg = load_config(ROOT / "configs" / "smollm2-tone.json")
    assert cfg.search is not None and cfg.search.early_stop
    assert [c.name for c in cfg.search.candidates] == list(LADDER)
    first = cfg.search.candidates[0].build
    assert first.algo == "rtn" and not first.is_symmetric and first.block_size == 16
    assert first.mixed_precision == {"last_matmul": "int8", "mixed_layers": "int8"}
    assert cfg.search.candidates[-1].build.precision == "int8"


@pytest.mark.parametrize("change, searched", [
    (lambda raw: None, True),
    (lambda raw: raw["passes"]["builder"]["config"].update(int4_block_size=64), False),  # the user chose a build
    (lambda raw: raw["passes"]["builder"]["config"].update(precision="fp32"), False),
    (lambda raw: raw["grove"].update(quantization_search={"enabled": False}), False),
    (lambda raw: raw["grove"].update(quantization_search={"candidates": "builtin"}), True),
    # no label column: the ladder all the same, its rungs judged by teacher-forced eval loss
    (lambda raw: raw["data_configs"][0]["pre_process_data_config"]["params"].update(
        text_template="### Text: {phrase} {tone}."), True),
])
def test_which_configs_search_by_default(tiny_model, tone_copy, tmp_path, write_config, change, searched):
    raw = tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out")
    raw["grove"].pop("quantization_search")  # the default
    change(raw)
    cfg = load_config(write_config(raw))
    assert (cfg.search is not None) == searched
    if searched:
        assert cfg.search.tolerance_metric == ("accuracy" if cfg.evaluate.label_col else "eval_loss")
    if searched and raw["grove"].get("quantization_search"):
        assert not cfg.search.early_stop and len(cfg.search.candidates) > len(LADDER)


def test_the_ladder_stops_at_the_first_candidate_within_tolerance(tiny_model, learned_run, tmp_path, prefect_api):
    """Through `grove run`: the summary names the candidate that ships, and the run record keeps it."""
    from typer.testing import CliRunner

    from flows.cli import app

    data = tmp_path / "tone.jsonl"
    data.write_text(one_label_rows(0, 80))
    # the session's learned entries: training, evaluation and the merge come from the cache
    raw = learnable_config(tiny_model, str(data), str(seed_store(learned_run["store"], tmp_path / "store")),
                           tmp_path / "out")
    raw["passes"]["builder"]["config"] = {"precision": "int4"}
    raw["grove"].pop("quantization_search")  # the default
    (tmp_path / "run.json").write_text(json.dumps(raw))
    said = CliRunner().invoke(app, ["run", "-c", str(tmp_path / "run.json")])
    assert said.exit_code == 0, said.output
    report = json.loads((tmp_path / "out" / "tiny" / "report.json").read_text())
    assert {s["stage"]: s["status"] for s in report["stages"]}["train"] == "cached"
    built = [s for s in report["stages"] if s["stage"] == "build_onnx"]
    # the summary names what ships: the candidate's task run (not taken for markup) and the shipped line
    assert f"build_onnx[{LADDER[0]}]" in said.output and f"shipped:     {LADDER[0]}\n" in said.output, said.output
    record = json.loads(CliRunner().invoke(app, ["runs", "-c", str(tmp_path / "run.json"), "--json"]).output)[0]
    assert record["shipped"] == LADDER[0]
    # the search's table artifact is kept per model name, like every other Grove artifact
    from prefect_http import prefect_http

    found = prefect_http.post(f"{prefect_api}/artifacts/filter", timeout=30, json={"artifacts": {
        "key": {"any_": ["grove-tiny-quantization-search"]}, "flow_run_id": {"any_": [record["run_id"]]}}})
    assert found.status_code == 200 and len(found.json()) == 1, found.text
    search = report["quantization_search"]
    assert search["within_tolerance"] and search["chosen"] == LADDER[0], search["verdict"]
    assert len(built) == 1 and search["not_built"] == list(LADDER[1:])
    assert report["onnx"]["algo"] == "rtn" and report["onnx"]["mixed_precision"] == {"last_matmul": "int8", "mixed_layers": "int8"}


def test_a_plain_cuda_int4_build_walks_the_cuda_ladder_down_to_fp16():
    """The CUDA config (a plain `precision: int4` pass for the CUDA provider) searches by default, like the CPU
    one: the builder's default int4 lost 10 points there (bench/results/h200/precision_probe.json)."""
    from flows.config.candidates import CUDA_LADDER

    from flows.config import parse_config

    # parsed, not loaded: loading checks for the CUDA runtimes and a GPU, which this machine lacks
    cfg = parse_config(json.loads((ROOT / "configs" / "smollm2-tone-cuda.json").read_text()), base_dir=ROOT)
    assert cfg.build.execution_provider == "cuda"
    assert cfg.search is not None and cfg.search.early_stop and cfg.search.tolerance_points == 2
    assert [c.name for c in cfg.search.candidates] == list(CUDA_LADDER)
    builds = [c.build for c in cfg.search.candidates]
    assert all(b.execution_provider == "cuda" and b.extra_options.get("enable_cuda_graph") == "true" for b in builds)
    first = builds[0]
    assert (first.precision, first.algo, first.is_symmetric, first.block_size) == ("int4", "rtn", False, 32)
    assert first.mixed_precision == {"last_matmul": "int8", "mixed_layers": "int8"}
    assert [b.precision for b in builds[-2:]] == ["int8", "fp16"], "fp16 on CUDA is the last rung"
    sizes = [(b.precision != "int4", b.block_size < 32) for b in builds]
    assert sizes == sorted(sizes), "rungs go from small to large"

    # serving a LoRA adapter on CUDA: the same ladder, each rung a base; with the search off, the first
    # rung (the builder's default int4 is what lost the 10 points)
    raw = json.loads((ROOT / "configs" / "smollm2-tone-cuda.json").read_text())
    lora = raw["passes"].pop("qlora")
    lora["type"] = "LoRA"
    for key in ("quant_type", "double_quant", "compute_dtype"):
        lora["config"].pop(key)
    raw["passes"] = {"lora": lora, **raw["passes"]}
    raw["grove"]["ship"] = "adapter"
    adapters = parse_config(raw, base_dir=ROOT)
    assert [c.name for c in adapters.search.candidates] == list(CUDA_LADDER)
    raw["grove"]["quantization_search"] = {"enabled": False}
    unsearched = parse_config(raw, base_dir=ROOT)
    assert unsearched.search is None and unsearched.build == first, unsearched.build


def test_a_cuda_build_the_user_chose_is_built_as_written(tiny_model, tone_copy, tmp_path):
    from flows.config import parse_config

    raw = tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out")
    raw["grove"].pop("quantization_search")
    raw["systems"]["local_system"]["accelerators"] = [{"device": "gpu", "execution_providers": ["CUDAExecutionProvider"]}]
    assert parse_config(raw, base_dir=tmp_path).search is not None
    raw["passes"]["builder"]["config"].update(int4_block_size=64)
    cfg = parse_config(raw, base_dir=tmp_path)
    assert cfg.search is None and cfg.build.block_size == 64
