"""Shipping adapters: one base with LoRA slots, many peft adapters served by onnxruntime-genai.

Adapters here are peft LoRA adapters with random non-zero B (a fresh LoRA is the identity), so
every adapter changes the model; their merged twins (peft merge_and_unload) are the reference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import TONE_DATA, seed_store, tiny_config
from grove.engines import OnnxEngine
from grove.settings import BuildSettings
from grove.store import ArtifactStore
from tasks.build_onnx import adapters
from tasks.build_onnx.builder import run_builder

PROMPTS = [[1, 5, 9, 30], [1, 40, 41, 42, 43], [1, 100, 7], [1, 12, 250, 3, 77]]


def make_adapter(model: Path, folder: Path, seed: int, targets=("q_proj", "v_proj", "down_proj"), rank: int = 4,
                 layers: list[int] | None = None):
    """Saves a peft adapter with random B under folder/adapter and its merged model under folder/merged
    (`layers`: only those layers adapted, as grove.lora_top_layers does)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)  # lora_A's init draws from the global generator: the same adapter in any test order
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                                LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                           layers_to_transform=layers))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(folder / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(folder / "merged")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model / name, folder / "merged" / name)
    return merged


def greedy(engine: OnnxEngine, prompt: list[int], n: int = 6) -> list[int]:
    return engine.generate_timed(prompt, n).tokens


@pytest.fixture(scope="module")
def fp32_base(tiny_model, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("base") / "model"
    adapters.build_base(tiny_model, target, BuildSettings(precision="fp32"), False)
    return target


def test_two_adapters_on_one_base_answer_differently_and_as_their_merged_models(tiny_model, fp32_base, tmp_path):
    import torch

    answers = {}
    for seed in (1, 2):
        merged = make_adapter(tiny_model, tmp_path / str(seed), seed)
        file = fp32_base / f"a{seed}.onnx_adapter"
        info = adapters.export_adapter(tmp_path / str(seed) / "adapter", fp32_base, file)
        assert info["modules"] == 6 and info["ranks"] == [4]  # 2 layers x 3 target modules
        engine = OnnxEngine(fp32_base, set(), adapter=file)
        answers[seed] = [greedy(engine, p) for p in PROMPTS]
        run_builder(tmp_path / str(seed) / "merged", tmp_path / str(seed) / "onnx", BuildSettings(precision="fp32"),
                    False)
        merged_onnx = OnnxEngine(tmp_path / str(seed) / "onnx", set())
        assert answers[seed] == [greedy(merged_onnx, p) for p in PROMPTS]
        for prompt in PROMPTS:  # and the PyTorch model it was merged into, to float rounding
            with torch.no_grad():
                reference = merged(torch.tensor([prompt])).logits[0, -1].numpy()
            assert abs(first_logits(engine, prompt) - reference).max() < 1e-3
    plain = [greedy(OnnxEngine(fp32_base, set()), p) for p in PROMPTS]
    assert answers[1] != answers[2] and answers[1] != plain and answers[2] != plain


def test_base_with_no_adapter_active_is_the_plain_base(tiny_model, fp32_base, tmp_path):
    """The empty (rank 0) defaults add nothing: slots cost no accuracy when unused."""
    plain_dir = tmp_path / "plain"
    run_builder(tiny_model, plain_dir, BuildSettings(precision="fp32"), False)
    assert [greedy(OnnxEngine(fp32_base, set()), p) for p in PROMPTS] == \
        [greedy(OnnxEngine(plain_dir, set()), p) for p in PROMPTS]


def first_logits(engine: OnnxEngine, prompt: list[int]):
    import numpy as np

    generator = engine._generator(prompt, 1, force=True)
    generator.append_tokens(prompt)
    return np.asarray(generator.get_logits())[0, -1]


LADDER_FIRST_RUNG = BuildSettings(algo="rtn", is_symmetric=False, block_size=16,
                                  mixed_precision={"last_matmul": "int8", "mixed_layers": "int8"})


@pytest.mark.parametrize("build, layers", [(BuildSettings(precision="int4"), None), (LADDER_FIRST_RUNG, None),
                                           (LADDER_FIRST_RUNG, [1]), (BuildSettings(precision="int8"), [1])],
                         ids=["int4", "ladder-rung-1", "ladder-rung-1-top-layer-only", "ladder-rung-2-int8"])
def test_int4_base_with_adapter_tracks_the_merged_int4_model(tiny_model, tmp_path, build, layers):
    """Also an adapter on the top layer only (rank 4 there, 0 in the other slots): with one rank
    symbol for every slot, onnxruntime reused a rank-0 slot's buffer and failed to run it."""
    import numpy as np

    base = tmp_path / "base"
    adapters.build_base(tiny_model, base, build, False)
    make_adapter(tiny_model, tmp_path / "a", 3, layers=layers)
    file = base / "a.onnx_adapter"
    adapters.export_adapter(tmp_path / "a" / "adapter", base, file)
    run_builder(tmp_path / "a" / "merged", tmp_path / "merged_int4", build, False)
    served, merged, plain = (OnnxEngine(base, set(), adapter=file), OnnxEngine(tmp_path / "merged_int4", set()),
                             OnnxEngine(base, set()))
    for prompt in PROMPTS:
        to_merged = np.abs(first_logits(served, prompt) - first_logits(merged, prompt)).mean()
        to_plain = np.abs(first_logits(served, prompt) - first_logits(plain, prompt)).mean()
        # int4 rounds the merged weights, not the adapter's: close, not equal, and far nearer
        # the merged model than the base the adapter sits on. (The top token itself is not
        # compared: a random tiny model's top logits are near ties that this rounding can swap.)
        assert to_merged < 0.25 * to_plain, (to_merged, to_plain)


def test_adapter_on_layers_the_base_has_no_slot_for_is_refused(tiny_model, fp32_base, tmp_path):
    make_adapter(tiny_model, tmp_path, 4, targets=("q_proj", "lm_head"))
    with pytest.raises(adapters.AdapterRefused, match="lm_head.*no LoRA slot"):
        adapters.export_adapter(tmp_path / "adapter", fp32_base, tmp_path / "x.onnx_adapter")
    assert not (tmp_path / "x.onnx_adapter").exists()


def test_adapter_of_a_model_of_another_shape_is_refused(tiny_model, fp32_base, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    config = LlamaConfig.from_pretrained(tiny_model)
    config.intermediate_size = 192
    LlamaForCausalLM(config).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, other / name)
    make_adapter(other, tmp_path, 5, targets=("down_proj",))
    with pytest.raises(adapters.AdapterRefused, match="down_proj: the adapter is 192->128, the base 256->128"):
        adapters.export_adapter(tmp_path / "adapter", fp32_base, tmp_path / "x.onnx_adapter")


def test_merged_model_folder_is_not_a_base(tiny_model):
    with pytest.raises(adapters.AdapterRefused, match="merged model, not a base"):
        adapters.read_slots(tiny_model)


def test_target_modules_the_base_cannot_take_are_refused_at_config_time():
    adapters.check_target_modules(["q_proj", "v_proj"], "passes.lora.target_modules")
    with pytest.raises(adapters.AdapterRefused, match="passes.lora.target_modules.*qkv_proj.*fix"):
        adapters.check_target_modules(["qkv_proj"], "passes.lora.target_modules")


# ---- the flow with grove.ship: adapter ------------------------------------------------------------
def blob_bytes(store: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (store / "blobs").rglob("*") if p.is_file()}


def nightly_bytes(tiny_model, trained: Path, data: Path, tmp_path: Path, write_config, ship: str) -> tuple[int, dict]:
    """Two runs, the second on one edited row (a nightly retraining); bytes its blobs added. The
    store starts with the session's trained entries (the first run takes what it can from them)."""
    import json

    from test_flow import grove

    raw = tiny_config(tiny_model, data, seed_store(trained, tmp_path / ship / "store"), tmp_path / ship / "out")
    raw["grove"]["ship"] = ship
    config = write_config(raw, f"{ship}.json")
    grove("run", "--config", str(config))
    before = blob_bytes(tmp_path / ship / "store")
    lines = data.read_text().splitlines()
    first = json.loads(lines[0])
    first["phrase"] = "X" + first["phrase"][1:]
    data.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    grove("run", "--config", str(config))
    after = blob_bytes(tmp_path / ship / "store")
    report = json.loads((tmp_path / ship / "out" / "tiny" / "report.json").read_text())
    return sum(size for sha, size in after.items() if sha not in before), report


def test_adapter_ship_builds_the_base_once_and_a_nightly_run_stores_only_its_adapter(
        tiny_model, trained_store, tmp_path, write_config):
    from test_flow import grove

    from grove.served import adapter_file

    for ship in ("merged", "adapter"):
        shutil.copyfile(TONE_DATA, tmp_path / f"{ship}.jsonl")
    merged_bytes, _ = nightly_bytes(tiny_model, trained_store, tmp_path / "merged.jsonl", tmp_path, write_config,
                                    "merged")
    adapter_bytes, report = nightly_bytes(tiny_model, trained_store, tmp_path / "adapter.jsonl", tmp_path,
                                          write_config, "adapter")
    stages = {s["stage"]: s for s in report["stages"]}
    assert "merge_adapters" not in stages and stages["train"]["status"] == "ran"
    onnx = stages["build_onnx"]
    assert onnx["status"] == "ran" and onnx["summary"]["base"]["reused"] is True  # a hit across fine-tunes
    assert onnx["summary"]["accuracy"] is not None and stages["benchmark"]["summary"]["onnx"]["adapter_size_mb"] > 0
    base_size = onnx["summary"]["size_bytes"]
    print(f"nightly bytes stored: merged {merged_bytes}, adapter {adapter_bytes}; base {base_size}")
    assert adapter_bytes < base_size < merged_bytes
    out = tmp_path / "adapter" / "out" / "tiny"
    assert (out / "model" / "base.json").is_file() and adapter_file(out, "tiny").is_file()
    answer = grove("predict", "--model", str(out), "--adapter", "tiny", "--max-new-tokens", "3",
                   "### Text: I love it\n### The tone is:\n")
    assert answer.strip()

    # gc keeps the shared base (build_onnx/base-..., no stage's own key, named by the build's
    # manifest under meta.uses) although no run record or promoted model lists it: a cached rerun
    # after gc still publishes the base and the adapter
    config, store = tmp_path / "adapter.json", ArtifactStore(str(tmp_path / "adapter" / "store"))
    [base] = [e for e in store.entries("build_onnx") if e.key.startswith("base-")]
    grove("gc", "--keep", "1", "--config", str(config), "--grace-minutes", "0")
    assert store.lookup("build_onnx", base.key) is not None and store.by_digest(base.digest) is not None
    shutil.rmtree(out)
    grove("run", "--config", str(config))
    assert {s["status"] for s in json.loads((out / "report.json").read_text())["stages"]} == {"cached"}
    assert (out / "model" / "model.onnx").is_file() and adapter_file(out, "tiny").is_file()


def test_an_adapter_of_another_base_is_refused_before_loading(tiny_model, fp32_base, tmp_path):
    import json

    from grove.served import AdapterMismatch, adapter_file

    out = tmp_path / "shipped"
    shutil.copytree(fp32_base, out / "model")
    (out / "model" / "base.json").write_text(json.dumps({"digest": "a" * 64}))
    make_adapter(tiny_model, tmp_path, 6)
    (out / "adapters").mkdir()
    adapters.export_adapter(tmp_path / "adapter", out / "model", out / "adapters" / "x.onnx_adapter")
    (out / "adapters" / "x.onnx_adapter.json").write_text(json.dumps({"base_digest": "b" * 64}))
    with pytest.raises(AdapterMismatch, match="exported for base bbbbbbbbbbbb, but .* holds base aaaaaaaaaaaa.*fix"):
        adapter_file(out, "x")


@pytest.mark.parametrize("change, where, message", [
    (lambda raw: raw["passes"]["lora"]["config"].update(target_modules=["q_proj", "lm_head"]),
     "passes.lora.config.target_modules", "lm_head"),
    (lambda raw: raw["passes"].update(lora={**raw["passes"]["lora"], "type": "QLoRA"}),
     "passes.lora.config", "QLoRA adapter is trained against nf4"),
    (lambda raw: raw["passes"]["builder"]["config"].update(extra_options={"algo_config": "hqq"}),
     "passes.builder.config.extra_options.algo_config", "hqq"),
])
def test_adapter_ship_refusals_come_before_any_work(tiny_model, tone_copy, tmp_path, write_config,
                                                    change, where, message):
    from flows.config import ConfigError, load_config

    raw = tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out")
    raw["grove"]["ship"] = "adapter"
    change(raw)
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(raw))
    assert caught.value.path == where and message in caught.value.message and "fix" in caught.value.message
    assert not (tmp_path / "store").exists()


def test_a_plain_int4_pass_ships_adapters_through_the_ladder(tiny_model, tone_copy, tmp_path, write_config):
    """The builder's plain int4 lost 16 points on the bundled model, and an adapter trained on full
    weights lost 3.3 more on the ladder's first rung: a plain CPU int4 pass serving adapters
    searches the default ladder (each rung a base + the adapter, scored as served); a pass that
    says more is built as written; with no label to score, the rungs are judged by teacher-forced
    eval loss (grove/teacher_forcing.py) instead of accuracy."""
    from flows.config import load_config
    from flows.config.candidates import LADDER, ladder_candidates

    raw = tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out")
    raw["grove"]["ship"] = "adapter"
    raw["grove"].pop("quantization_search", None)
    raw["passes"]["builder"]["config"] = {"precision": "int4"}
    cfg = load_config(write_config(raw))
    assert [c.name for c in cfg.search.candidates] == list(LADDER) and cfg.search.early_stop
    first = dict(ladder_candidates(cfg.build, None))[LADDER[0]]
    assert cfg.search.candidates[0].build == first and first.algo == "rtn" and first.mixed_precision
    raw["passes"]["builder"]["config"] = {"precision": "int4", "int4_block_size": 64}
    explicit = load_config(write_config(raw, "explicit.json"))
    assert explicit.search is None and explicit.build.block_size == 64 and explicit.build.algo == "default"
    del raw["passes"]["builder"]["config"]["int4_block_size"]
    raw["data_configs"][0]["pre_process_data_config"]["params"]["text_template"] = "### Text: {phrase} {tone}."
    unlabelled = load_config(write_config(raw, "unlabelled.json"))
    assert [c.name for c in unlabelled.search.candidates] == list(LADDER)
    assert unlabelled.search.tolerance_metric == "eval_loss" and unlabelled.promotion.tolerance_metric == "eval_loss"


def test_every_rung_of_an_adapter_search_is_a_base_scored_with_the_adapter_on_it(
        tiny_model, trained_store, tone_copy, tmp_path, write_config):
    import json

    from test_flow import grove

    from flows.config.candidates import LADDER

    # the session's trained entries: training and evaluation come from the cache, every rung is built here
    raw = tiny_config(tiny_model, tone_copy, seed_store(trained_store, tmp_path / "store"), tmp_path / "out")
    raw["grove"].update(ship="adapter", quantization_search={"candidates": "ladder", "early_stop": False})
    grove("run", "--config", str(write_config(raw)))
    report = json.loads((tmp_path / "out" / "tiny" / "report.json").read_text())
    assert {s["stage"]: s["status"] for s in report["stages"]}["train"] == "cached"  # from the session's store
    search = report["quantization_search"]
    assert search["scored"] == "base + adapter, as served" and not search["not_built"]
    assert [r["name"] for r in search["candidates"]] == list(LADDER)
    assert all(r["loaded"] and r["accuracy"] is not None for r in search["candidates"])
    # teacher-forced as served too: base + adapter against the merged PyTorch fine-tune
    assert all(r["eval_loss"] > 0 and 0 <= r["token_agreement"] <= 1 and r["kl_from_merged"] >= 0
               for r in search["candidates"])
    onnx = report["onnx"]
    assert onnx["candidate"] == search["chosen"] and onnx["base"] and onnx["adapter"]
    out = tmp_path / "out" / "tiny"
    assert json.loads((out / "model" / "base.json").read_text())["digest"] == onnx["base"]["digest"]
    answer = grove("predict", "--model", str(out), "--adapter", "tiny", "--max-new-tokens", "3",
                   "### Text: I love it\n### The tone is:\n")
    assert answer.strip()


def test_a_qlora_adapter_is_refused_when_any_candidate_base_is_quantized(
        tiny_model, tone_copy, tmp_path, write_config):
    from flows.config import ConfigError, load_config

    raw = tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out")
    raw["grove"].update(ship="adapter", quantization_search={"candidates": [
        {"name": "fp32", "precision": "fp32"}, {"name": "int8", "precision": "int8"}]})
    raw["passes"]["lora"]["type"] = "QLoRA"
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(raw))
    assert caught.value.path == "passes.lora.config" and "int8" in caught.value.message


def test_grove_export_of_an_adapter_shipped_run_is_a_folder_predict_answers_with(tmp_path):
    """The export put the adapter, its prompt and base.json into metrics/ and the base into model/
    without base.json: `grove predict --model FOLDER` (what export says to run) refused it, and
    --adapter found none. Now it is laid out as the run's output folder is."""
    from flows.export import export
    from flows.runs import RunLog
    from grove.served import BASE_FILE, adapter_file, adapter_prompt
    from grove.stage import ArtifactRef, StageRecord

    store = ArtifactStore(str(tmp_path / "store"))
    base_src, build_src = tmp_path / "base", tmp_path / "build"
    (base_src / "model").mkdir(parents=True)
    (base_src / "model" / "genai_config.json").write_text("{}")
    base = store.put_dir("build_onnx", "base-0123", base_src, {})
    build_src.mkdir()
    (build_src / BASE_FILE).write_text(json.dumps({"stage": "build_onnx", "key": "base-0123", "digest": base.digest}))
    (build_src / "adapter.onnx_adapter").write_bytes(b"lora")
    (build_src / "adapter.onnx_adapter.json").write_text(json.dumps({"base_digest": base.digest}))
    (build_src / "grove_prompt.json").write_text(json.dumps({"template": "{text}", "eos_token_ids": [2]}))
    (build_src / "onnx_eval.json").write_text("{}")
    build = store.put_dir("build_onnx", "k", build_src, {})
    run = RunLog(store, "tiny", "run.json", None, run_id="a" * 32)
    run.add(StageRecord("build_onnx", "ran", ref=ArtifactRef(stage="build_onnx", key="k", digest=build.digest,
                                                             uri=store.entry_uri("build_onnx", "k"))))
    run.finish("completed")

    done = export(store, "aaaaaaaa", tmp_path / "out")
    out = tmp_path / "out"
    assert done.adapter == "tiny" and (out / "adapters" / "tiny.onnx_adapter").read_bytes() == b"lora"
    assert json.loads((out / "model" / BASE_FILE).read_text())["digest"] == base.digest
    assert (out / "model" / "genai_config.json").is_file() and adapter_prompt(adapter_file(out, "tiny"))
    assert sorted(done.placed["metrics"]) == ["metrics/onnx_eval.json"]  # the adapter's files are not metrics
