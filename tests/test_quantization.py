"""Quantization choices: each reaches the builder (read back from the built graph), bad values
and traps fail at the door, the search keeps the right candidate (stubbed table, then end to
end on the tiny model), and a candidate whose model does not load is never kept."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from conftest import TONE_DATA, seed_store, tiny_config
from flows.cli import app
from flows.config import ConfigError, parse_config
from tasks.build_onnx.builder import run_builder
from tasks.build_onnx.quantization import builder_options
from tasks.build_onnx.search import select_candidate
from grove.settings import BuildSettings

runner = CliRunner()


# ---- each option reaches the builder -------------------------------------------------------------
@pytest.fixture(scope="module")
def tied_model(tmp_path_factory) -> Path:
    from grove.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tied") / "llama", "llama", tie_embeddings=True)


def built_graph(source: Path, target: Path, build: BuildSettings) -> dict[str, dict]:
    """Builds, proves the model loads and generates, returns {node name: {op, attributes, inputs}}."""
    from grove.engines import OnnxEngine

    calibration = [[1] + list(range(5 + i, 25 + i)) for i in range(4)] if build.algo == "gptq" else None
    run_builder(source, target, build, trust_remote_code=False, calibration=calibration)
    engine = OnnxEngine(target, eos_ids=set())
    assert len(engine.generate_timed([1, 5, 6], 2).tokens) == 2, "the built model must load and generate"
    graph = onnx.load(str(target / "model.onnx"), load_external_data=False).graph
    return {n.name: {"op": n.op_type, "inputs": list(n.input),
                     "attrs": {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}}
            for n in graph.node if n.op_type in ("MatMulNBits", "MatMul", "Gather", "GatherBlockQuantized")}


def weight_nodes(graph: dict, op: str) -> dict[str, dict]:
    return {name: node for name, node in graph.items() if node["op"] == op and "attn_mask" not in name}


OPTION_CASES = {
    "block_size": (dict(block_size=16), lambda g: {n["attrs"]["block_size"] for n in weight_nodes(g, "MatMulNBits").values()} == {16}),
    "accuracy_level": (dict(accuracy_level=1), lambda g: {n["attrs"]["accuracy_level"] for n in weight_nodes(g, "MatMulNBits").values()} == {1}),
    "k_quant": (dict(algo="k_quant"), lambda g: all(n["inputs"][1].endswith("_Q4G32") for n in weight_nodes(g, "MatMulNBits").values())),
    "int8_lm_head": (dict(algo="rtn", mixed_precision={"last_matmul": "int8"}),
                     lambda g: g["/lm_head/MatMul_Q8"]["attrs"]["bits"] == 8 if "/lm_head/MatMul_Q8" in g else
                     [n["attrs"]["bits"] for name, n in g.items() if "lm_head" in name] == [8]),
    "mixed_layers": (dict(algo="k_quant", mixed_precision={"mixed_layers": "int8"}),
                     lambda g: 8 in {n["attrs"]["bits"] for name, n in weight_nodes(g, "MatMulNBits").items() if "layers" in name}),
    "fp32_lm_head": (dict(nodes_to_exclude=["/lm_head/MatMul"]),
                     lambda g: [n["op"] for name, n in g.items() if "lm_head" in name] == ["MatMul"]),
    "asymmetric": (dict(is_symmetric=False), lambda g: all(len(n["inputs"]) >= 4 for n in weight_nodes(g, "MatMulNBits").values())),
    "int8": (dict(precision="int8"), lambda g: {n["attrs"]["bits"] for n in weight_nodes(g, "MatMulNBits").values()} == {8}),
    "hqq": (dict(algo="hqq", block_size=64),
            lambda g: {n["attrs"]["block_size"] for n in weight_nodes(g, "MatMulNBits").values()} == {64}
            and all(len(n["inputs"]) >= 4 for n in weight_nodes(g, "MatMulNBits").values())),
    "gptq": (dict(algo="gptq", block_size=32, is_symmetric=False),
             lambda g: {n["attrs"]["block_size"] for n in weight_nodes(g, "MatMulNBits").values()} == {32}
             and not weight_nodes(g, "MatMul")),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_each_quantization_option_reaches_the_built_graph(case, tiny_model, tmp_path):
    fields, check = OPTION_CASES[case]
    graph = built_graph(tiny_model, tmp_path / "model", BuildSettings(**fields))
    assert check(graph), {name: (n["op"], n["attrs"]) for name, n in graph.items()}


def test_shared_embeddings_false_unties_the_embedding_of_a_tied_model(tied_model, tmp_path):
    shared = built_graph(tied_model, tmp_path / "shared", BuildSettings(algo="k_quant"))
    assert [n["op"] for name, n in shared.items() if "embed_tokens" in name] == ["GatherBlockQuantized"]
    unshared = built_graph(tied_model, tmp_path / "unshared", BuildSettings(
        algo="k_quant", shared_embeddings=False, mixed_precision={"last_matmul": "int8"}))
    assert [n["op"] for name, n in unshared.items() if "embed_tokens" in name] == ["Gather"]
    assert [n["attrs"]["bits"] for name, n in unshared.items() if "lm_head" in name] == [8]


def test_builder_options_spell_what_the_builder_reads():
    build = BuildSettings(block_size=64, accuracy_level=1, is_symmetric=False, algo="k_quant",
                          mixed_precision={"last_matmul": "int8", "mixed_layers": "int8"},
                          nodes_to_exclude=["/a/MatMul", "/b/MatMul"], op_types_to_quantize=["MatMul", "Gather"],
                          shared_embeddings=False, extra_options={"fuse_qkv": "false"})
    assert builder_options(build, False) == [
        "block_size=64", "accuracy_level=1", "is_symmetric=false", "algo_config=k_quant",
        "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8", "nodes_to_exclude=/a/MatMul,/b/MatMul",
        "op_types_to_quantize=MatMul/Gather", "shared_embeddings=false", "fuse_qkv=false", "hf_token=false",
        "hf_remote=false"]


# ---- bad values and traps fail at the door ------------------------------------------------------
@pytest.fixture
def base(tiny_model, tmp_path):
    return tiny_config(tiny_model, TONE_DATA, tmp_path / "store", tmp_path / "out")


def builder_error(raw: dict, tmp_path: Path, **config) -> ConfigError:
    raw = copy.deepcopy(raw)
    raw["passes"]["builder"]["config"].update(config)
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, base_dir=tmp_path)
    assert "\n" not in str(caught.value)
    return caught.value


@pytest.mark.parametrize("config, key, words", [
    ({"extra_options": {"int4_algo_config": "k_quant"}}, "extra_options.int4_algo_config", "ignores this deprecated"),
    ({"extra_options": {"algo_config": "awq"}}, "extra_options.algo_config", "must be one of"),
    ({"extra_options": {"block_size": 48}}, "extra_options.block_size", "must be one of"),
    ({"int4_block_size": 48}, "int4_block_size", "16"),
    ({"extra_options": {"accuracy_level": 7}}, "extra_options.accuracy_level", "0-4"),
    ({"int4_block_size": 64, "extra_options": {"block_size": 16}}, "extra_options.block_size", "conflicts with int4_block_size"),
    ({"extra_options": {"matmul_mixed_precision": "lm_head:int8"}}, "extra_options.matmul_mixed_precision", "unknown selector"),
    ({"extra_options": {"matmul_mixed_precision": "last_matmul:int2"}}, "extra_options.matmul_mixed_precision", "int4 or int8"),
    ({"extra_options": {"matmul_mixed_precision": "linear_attn:int8"}}, "extra_options.matmul_mixed_precision", "selects nothing"),
    ({"extra_options": {"shared_embeddings": True}}, "extra_options.shared_embeddings", "does not tie"),
    ({"extra_options": {"shared_embedings": False}}, "extra_options.shared_embedings", "did you mean 'shared_embeddings'"),
    ({"extra_options": {"exclude_lm_head": True}}, "extra_options.exclude_lm_head", "hidden states"),
    ({"extra_options": {"enable_cuda_graph": True}}, "extra_options.enable_cuda_graph", "CUDA"),
    ({"extra_options": {"hf_token": "abc"}}, "extra_options.hf_token", "set by Grove"),
    ({"extra_options": {"nodes_to_exclude": ["lm_head"]}}, "extra_options.nodes_to_exclude", "/lm_head/MatMul"),
    ({"precision": "fp32", "int4_accuracy_level": 4}, "int4_accuracy_level", "int4/int8 weights only"),
    ({"precision": "int8", "int4_op_types_to_quantize": ["MatMul", "Gather"]}, "int4_op_types_to_quantize", "4-bit only"),
    ({"precision": "int8", "extra_options": {"algo_config": "hqq"}}, "extra_options.algo_config", "int4"),
    ({"extra_options": {"algo_config": "hqq", "matmul_mixed_precision": "last_matmul:int8"}},
     "extra_options.matmul_mixed_precision", "hqq"),
])
def test_invalid_quantization_choice_names_the_key(base, tmp_path, config, key, words):
    error = builder_error(base, tmp_path, **config)
    assert error.path == f"passes.builder.config.{key}", str(error)
    assert words in error.message, str(error)


def test_int8_lm_head_on_tied_embeddings_is_refused_before_any_work(tied_model, tmp_path, write_config):
    """The trap: default algorithm + int8 LM head on a tied model exits cleanly and writes a model
    that does not load. Refused at the door; rtn/k_quant or shared_embeddings=false are accepted."""
    raw = tiny_config(tied_model, TONE_DATA, tmp_path / "store", tmp_path / "out")
    raw["passes"]["builder"]["config"]["extra_options"] = {"matmul_mixed_precision": "last_matmul:int8"}
    result = runner.invoke(app, ["run", "--config", str(write_config(raw))])
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert "passes.builder.config.extra_options.matmul_mixed_precision" in output and "does not load" in output
    assert not (tmp_path / "store").exists()
    for fix in ({"shared_embeddings": False}, {"algo_config": "k_quant"}):
        raw["passes"]["builder"]["config"]["extra_options"] = {"matmul_mixed_precision": "last_matmul:int8", **fix}
        assert parse_config(raw, base_dir=tmp_path).build.mixed_precision == {"last_matmul": "int8"}


def test_asymmetric_int4_on_tied_embeddings_is_refused_before_any_work(tied_model, tmp_path, write_config):
    """The trap is real: asymmetric int4 with the default algorithm on a tied model writes a model
    whose shared uint8 embedding does not load. Refused at the door; rtn, k_quant or unshared
    embeddings build models that load (the rtn one is the default ladder's first rung)."""
    import onnxruntime_genai as og

    run_builder(tied_model, tmp_path / "trap", BuildSettings(is_symmetric=False), trust_remote_code=False)
    with pytest.raises(Exception, match="uint8"):
        og.Model(str(tmp_path / "trap"))
    raw = tiny_config(tied_model, TONE_DATA, tmp_path / "store", tmp_path / "out")
    raw["passes"]["builder"]["config"]["int4_is_symmetric"] = False
    result = runner.invoke(app, ["run", "--config", str(write_config(raw))])
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "passes.builder.config.int4_is_symmetric" in output and "does not load" in output
    assert "Traceback" not in output and not (tmp_path / "store").exists()
    for fix in ({"algo_config": "rtn"}, {"shared_embeddings": False}):
        raw["passes"]["builder"]["config"]["extra_options"] = fix
        build = parse_config(raw, base_dir=tmp_path).build
        built_graph(tied_model, tmp_path / f"fixed-{len(fix)}-{next(iter(fix))}", build)  # loads and generates


def test_search_candidates_are_checked_like_the_builder_pass(base, tmp_path):
    raw = copy.deepcopy(base)
    raw["grove"]["quantization_search"] = {"candidates": [
        {"name": "ok", "int4_block_size": 16},
        {"name": "bad", "extra_options": {"algo_config": "k_qunt"}}]}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, base_dir=tmp_path)
    assert caught.value.path == "grove.quantization_search.candidates[1].extra_options.algo_config"
    raw["grove"]["quantization_search"] = {"candidates": [{"name": "a"}, {"name": "a", "precision": "int8"}]}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, base_dir=tmp_path)
    assert caught.value.path == "grove.quantization_search.candidates[1].name"
    raw["grove"]["quantization_search"] = {}
    cfg = parse_config(raw, base_dir=tmp_path)
    assert len(cfg.search.candidates) >= 8 and cfg.search.tolerance_points == 2.0
    assert {c.build.algo for c in cfg.search.candidates} == {"default", "k_quant", "rtn"}


# ---- selection on a stubbed table ---------------------------------------------------------------------
def row(name, accuracy, size_mb, tps=100.0, loaded=True, error=None):
    return {"name": name, "loaded": loaded, "accuracy": accuracy if loaded else None,
            "size_bytes": int(size_mb * 2**20), "decode_tokens_per_s": tps, "build_seconds": 1.0, "error": error}


def test_selection_keeps_the_smallest_within_tolerance():
    picked = select_candidate([row("int8", 0.95, 200), row("int4", 0.94, 100), row("int4-bad", 0.80, 80)],
                              baseline=0.95, tolerance=2)
    assert picked.chosen == "int4" and picked.within_tolerance
    reasons = {r["name"]: r["reason"] for r in picked.rows}
    assert reasons["int8"].startswith("within tolerance but larger")
    assert reasons["int4-bad"].startswith("outside tolerance")


def test_selection_breaks_size_ties_by_decode_speed():
    picked = select_candidate([row("acc1", 0.95, 100, tps=80), row("acc4", 0.95, 100, tps=120)], 0.95, 2)
    assert picked.chosen == "acc4"
    assert "slower" in next(r["reason"] for r in picked.rows if r["name"] == "acc1")


def test_selection_tolerance_is_in_points_and_inclusive():
    assert select_candidate([row("a", 0.93, 50), row("b", 0.95, 90)], 0.95, 2).chosen == "a"
    assert select_candidate([row("a", 0.929, 50), row("b", 0.95, 90)], 0.95, 2).chosen == "b"
    assert select_candidate([row("a", 0.80, 50), row("b", 0.95, 90)], 0.95, 20).chosen == "a"


def test_selection_without_a_qualifier_keeps_the_most_accurate_and_says_it_fails():
    picked = select_candidate([row("a", 0.60, 50), row("b", 0.775, 110), row("c", 0.775, 200)], 0.95, 2)
    assert picked.chosen == "b" and not picked.within_tolerance
    assert "NO candidate" in picked.verdict and "FAILS" in picked.verdict
    assert next(r for r in picked.rows if r["chosen"])["reason"].endswith("fails the tolerance")


def test_a_candidate_that_failed_to_load_is_never_kept():
    picked = select_candidate([row("broken", None, 10, loaded=False, error="does not load"), row("ok", 0.5, 100)],
                              0.95, 2)
    assert picked.chosen == "ok"
    assert next(r for r in picked.rows if r["name"] == "broken")["reason"] == "failed: does not load"
    none = select_candidate([row("broken", None, 10, loaded=False, error="x")], 0.95, 2)
    assert none.chosen is None and "no candidate" in none.verdict


# ---- end to end on the tiny model --------------------------------------------------------------------
def test_search_end_to_end_builds_every_candidate_and_keeps_one(tiny_model, trained_store, tone_copy, tmp_path,
                                                                 write_config, monkeypatch):
    """Three candidates, one of which writes a model that does not load (the builder is wrapped to
    corrupt it): the broken one is a failed candidate, never kept; report, plot and Prefect
    table artifact list all three; a rerun takes every candidate from the cache."""
    import tasks.build_onnx.stage as build_module

    real = build_module.run_builder

    def corrupting(source, target, build, *args):
        printed = real(source, target, build, *args)
        if build.block_size == 64:  # the candidate named "broken"
            (target / "model.onnx").write_bytes(b"not an onnx model")
        return printed

    monkeypatch.setattr(build_module, "run_builder", corrupting)
    # the session's trained entries: the stages before build_onnx come from the cache
    raw = tiny_config(tiny_model, tone_copy, seed_store(trained_store, tmp_path / "store"), tmp_path / "out")
    raw["grove"]["quantization_search"] = {"tolerance_points": 100, "candidates": [
        {"name": "int8", "precision": "int8"},
        {"name": "int4-b16", "int4_block_size": 16},
        {"name": "broken", "int4_block_size": 64}]}
    config, out = write_config(raw), tmp_path / "out" / "tiny"
    result = runner.invoke(app, ["run", "--config", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    report = json.loads((out / "report.json").read_text())
    assert {s["stage"]: s["status"] for s in report["stages"]}["train"] == "cached"  # from the session's store
    search = report["quantization_search"]
    rows = {r["name"]: r for r in search["candidates"]}
    assert set(rows) == {"int8", "int4-b16", "broken"}
    assert rows["broken"]["loaded"] is False and not rows["broken"]["chosen"]
    assert rows["broken"]["reason"].startswith("failed:") and "does not load" in rows["broken"]["reason"]
    assert search["chosen"] == "int4-b16" and search["within_tolerance"]  # smaller than int8, within 100 points
    assert rows["int4-b16"]["size_bytes"] < rows["int8"]["size_bytes"]
    for name in ("int8", "int4-b16"):
        assert rows[name]["accuracy"] is not None and rows[name]["decode_tokens_per_s"] > 0
        assert rows[name]["build_seconds"] > 0
    assert report["onnx"]["block_size"] == 16 and report["onnx"]["candidate"] == "int4-b16"
    runs = [s.get("task_run") for s in report["stages"] if s["stage"] == "build_onnx"]
    assert runs == ["build_onnx[int8]", "build_onnx[int4-b16]", "build_onnx[broken]"]
    graph = onnx.load(str(out / "model" / "model.onnx"), load_external_data=False).graph
    assert {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"} == {16}

    markdown = (out / "report.md").read_text()
    assert "## Quantization search" in markdown and "![accuracy against size](accuracy_vs_size.png)" in markdown
    assert all(f"| {name} |" in markdown for name in rows)
    assert (out / "accuracy_vs_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    # the newest: other tests' searches of the tiny model publish under the same key on this server
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["grove-tiny-quantization-search"])),
                                          sort=ArtifactSort.CREATED_DESC)
    assert artifacts and artifacts[0].type == "table"
    table = artifacts[0].data if isinstance(artifacts[0].data, list) else json.loads(artifacts[0].data)
    assert {r["candidate"] for r in table} == set(rows) and {"size_mb", "accuracy", "decode_tokens_per_s",
                                                            "build_seconds", "chosen", "why"} <= set(table[0])

    result = runner.invoke(app, ["run", "--config", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    again = json.loads((out / "report.json").read_text())
    assert {s["status"] for s in again["stages"]} == {"cached"}
    assert again["quantization_search"]["chosen"] == "int4-b16"


def test_search_needs_a_builder_pass_and_task_accuracy(base, tmp_path):
    raw = copy.deepcopy(base)
    raw["grove"]["quantization_search"] = {"candidates": "builtin"}
    raw["passes"].pop("builder")
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, base_dir=tmp_path)
    assert caught.value.path == "grove.quantization_search" and "ModelBuilder" in caught.value.message
    raw = copy.deepcopy(base)
    raw["grove"]["quantization_search"] = {"candidates": [], "tolerance_points": 2}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, base_dir=tmp_path)
    assert caught.value.path == "grove.quantization_search.candidates"
    raw["grove"]["quantization_search"] = {"tolerance_points": -1}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, base_dir=tmp_path)
    assert caught.value.path == "grove.quantization_search.tolerance_points"
