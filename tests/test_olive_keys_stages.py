"""The stages honour the Olive keys Grove reads: an input adapter trained further, modules_to_save
carried into the merged model, the training dtypes, add_special_tokens, join-random and an eval
data config with its own template.

Settings objects are built directly (the config layer that fills them is tested elsewhere);
training runs fit() or the real stages on the tiny model, on the CPU.
"""

from __future__ import annotations

import hashlib
import math
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TONE_DATA
from grove.data_files import content_digest
from grove.models import load_causal_lm, load_tokenizer
from grove.settings import CorpusSettings, DataSettings, ModelSettings, TrainSettings
from grove.stage import RunContext, stage_run
from grove.store import ArtifactStore
from grove.textdata import encode, prompt_and_answer, read_jsonl
from tasks.template_corpus import examples, line_examples
from tasks.train.base import adapter_conflicts, dtype_problems
from tasks.train.fit import fit

TEMPLATE = "### Text: {phrase}\n### The tone is:\n{tone}"
EVAL_TEMPLATE = "Q: what tone has '{phrase}'?\nA: {tone}"


def tone_rows(n: int = 60) -> list[dict]:
    return [json.loads(line) for line in TONE_DATA.read_text().splitlines()][:n]


def model_settings(tiny_model: Path, adapter: Path | None = None) -> ModelSettings:
    return ModelSettings(name=str(tiny_model), path=str(tiny_model), content_sha256="tiny",
                         adapter_path=str(adapter) if adapter else None, adapter_sha256="a" if adapter else None)


def lora(**overrides) -> TrainSettings:
    args = {"seed": 0, "per_device_train_batch_size": 8, "max_steps": 3, "learning_rate": 1e-2, "logging_steps": 1}
    args.update(overrides.pop("training_args", {}))
    return TrainSettings(**{"method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
                            "training_args": args, **overrides})


@pytest.fixture(scope="module")
def corpus_folder(tiny_model, tmp_path_factory) -> Path:
    """A line-by-line corpus as template_corpus writes it (train.jsonl, eval.jsonl)."""
    folder = tmp_path_factory.mktemp("corpus")
    tokenizer = load_tokenizer(tiny_model)
    settings = CorpusSettings(text_template=TEMPLATE, text_cols=["phrase", "tone"], label_col="tone",
                              corpus_strategy="line-by-line")
    for name, rows in (("train", tone_rows(48)), ("eval", tone_rows(60)[48:])):
        pairs = examples(rows, settings, tokenizer)
        with open(folder / f"{name}.jsonl", "w") as handle:
            for example in line_examples(pairs, 64, False, tokenizer.pad_token_id):
                handle.write(json.dumps(example) + "\n")
    return folder


def train(settings: TrainSettings, model: ModelSettings, corpus: Path, out: Path) -> tuple[dict, dict]:
    """fit() in this process; returns the summary and the stored adapter's tensors."""
    out.mkdir(parents=True)
    workdir = out.parent / f"{out.name}-work"
    workdir.mkdir()
    summary = fit(settings, model, corpus, "cpu", out, workdir, 0, None, [])
    return summary, load_file(out / "adapter" / "adapter_model.safetensors")


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- input adapter --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def first_adapter(tiny_model, corpus_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("first") / "run"
    train(lora(), model_settings(tiny_model), corpus_folder, out)
    return out / "adapter"


def test_training_from_an_adapter_starts_from_its_weights_and_continues(tiny_model, corpus_folder,
                                                                         first_adapter, tmp_path):
    given = load_file(first_adapter / "adapter_model.safetensors")
    start = model_settings(tiny_model, first_adapter)
    # learning rate 0: the step changes nothing, so what is stored is what training started from
    summary, unchanged = train(lora(training_args={"learning_rate": 0.0, "max_steps": 1}), start,
                               corpus_folder, tmp_path / "zero")
    assert summary["started_from"] == "adapter"
    assert same_tensors(unchanged, given)

    _, continued = train(lora(), start, corpus_folder, tmp_path / "continued")
    _, fresh = train(lora(), model_settings(tiny_model), corpus_folder, tmp_path / "fresh")
    assert continued.keys() == given.keys() == fresh.keys()
    assert not same_tensors(continued, given), "training went on from the adapter"
    assert not same_tensors(continued, fresh), "a continued adapter is not a fresh-start one"


def test_qlora_trains_from_an_adapter_too(tiny_model, corpus_folder, first_adapter, tmp_path):
    given = load_file(first_adapter / "adapter_model.safetensors")
    settings = lora(method="qlora", training_args={"learning_rate": 0.0, "max_steps": 1})
    summary, unchanged = train(settings, model_settings(tiny_model, first_adapter), corpus_folder, tmp_path / "q")
    assert summary["quantization"]["layers_4bit"] > 0
    assert same_tensors(unchanged, given)


def test_lora_settings_that_disagree_with_the_adapter_are_config_errors(tiny_model, corpus_folder,
                                                                          first_adapter, tmp_path):
    assert adapter_conflicts(lora(), first_adapter) == []
    assert adapter_conflicts(lora(target_modules=None), first_adapter) == [], "unset: the adapter's"
    problems = adapter_conflicts(lora(r=8, target_modules=["q_proj"], modules_to_save=["lm_head"]), first_adapter)
    assert [p.split(":")[0] for p in problems] == ["lora_r", "target_modules", "modules_to_save"]
    assert all("adapter_config.json" in p for p in problems)
    assert adapter_conflicts(lora(alpha=16), first_adapter)[0].startswith("lora_alpha")
    assert "no adapter_config.json" in adapter_conflicts(lora(), tiny_model)[0]
    with pytest.raises(ValueError, match="lora_r: 8"):  # the stage refuses too, before any training
        train(lora(r=8), model_settings(tiny_model, first_adapter), corpus_folder, tmp_path / "bad")


# ---- dtypes -----------------------------------------------------------------------------------------
def test_torch_dtype_bfloat16_loads_the_base_in_bf16(tiny_model, corpus_folder, tmp_path):
    default, _ = train(lora(), model_settings(tiny_model), corpus_folder, tmp_path / "default")
    bf16, _ = train(lora(torch_dtype="bfloat16"), model_settings(tiny_model), corpus_folder, tmp_path / "bf16")
    assert default["param_dtypes"]["frozen"] == ["float32"] and default["base_dtype"] == "float32"
    assert bf16["param_dtypes"]["frozen"] == ["bfloat16"] and bf16["base_dtype"] == "bfloat16"
    assert math.isfinite(bf16["final_loss"]), "bf16 training gives a real loss"


def test_qlora_compute_dtype_reaches_bitsandbytes(tiny_model, corpus_folder, tmp_path):
    settings = lora(method="qlora", training_args={"max_steps": 1})
    default, _ = train(settings, model_settings(tiny_model), corpus_folder, tmp_path / "default")
    bf16, _ = train(settings.model_copy(update={"compute_dtype": "bfloat16"}), model_settings(tiny_model),
                    corpus_folder, tmp_path / "bf16")
    assert default["quantization"]["compute_dtype"] == "float32"  # the CPU default, as before
    assert bf16["quantization"]["compute_dtype"] == "bfloat16"


def test_float16_training_is_refused_on_a_cpu_before_loading(tiny_model, corpus_folder, tmp_path):
    assert dtype_problems(lora(torch_dtype="bfloat16"), "cpu") == []
    assert dtype_problems(lora(), "cpu") == []
    [problem] = dtype_problems(lora(torch_dtype="float16"), "cpu")
    assert problem.startswith("torch_dtype:") and "CUDA" in problem
    assert any("training_args.bf16" in p for p in dtype_problems(lora(torch_dtype="float16",
                                                                      training_args={"bf16": True}), "cuda"))
    with pytest.raises(ValueError, match="torch_dtype: float16"):
        train(lora(torch_dtype="float16"), model_settings(tiny_model), corpus_folder, tmp_path / "fp16")


# ---- modules_to_save ------------------------------------------------------------------------------
def data_settings(**overrides) -> DataSettings:
    digest = hashlib.sha256(content_digest(str(TONE_DATA)).encode()).hexdigest()
    return DataSettings(**{"name": "tone", "files": [str(TONE_DATA)], "format": "json",
                           "text_cols": ["phrase", "tone"], "text_template": TEMPLATE, "label_col": "tone",
                           "max_samples": 80, "content_sha256": digest, **overrides})


def corpus_settings(**overrides) -> CorpusSettings:
    return CorpusSettings(**{"text_template": TEMPLATE, "text_cols": ["phrase", "tone"], "label_col": "tone",
                             "source_max_len": 32, **overrides})


def test_modules_to_save_are_stored_with_the_adapter_and_merged(tiny_model, tmp_path):
    from tasks.load_data import load_data
    from tasks.merge_adapters import merge_adapters
    from tasks.template_corpus import template_corpus
    from tasks.train import train as train_stage

    model = model_settings(tiny_model)
    store = ArtifactStore(str(tmp_path / "store"))
    with stage_run(RunContext(store=store, device="cpu")):
        corpus = template_corpus(corpus_settings(corpus_strategy="line-by-line"), load_data(data_settings()), model)
        adapter = train_stage(lora(modules_to_save=["lm_head"]), corpus, model)
        merged = merge_adapters(model, adapter)
    [train_entry], [merge_entry] = store.entries("train"), store.entries("merge_adapters")
    stored = load_file(store.materialize(train_entry) / "adapter" / "adapter_model.safetensors")
    [head_key] = [k for k in stored if "lm_head" in k]
    base_head = load_causal_lm(tiny_model, "cpu").lm_head.weight.detach()
    assert not torch.equal(stored[head_key], base_head), "lm_head was trained in full"
    merged_head = load_causal_lm(store.materialize(merge_entry), "cpu").lm_head.weight.detach()
    assert torch.equal(merged_head, stored[head_key]), "the merged model carries the trained lm_head"
    assert adapter.summary["trainable_params"] > base_head.numel()
    assert merged.summary["parameters"] == sum(p.numel() for p in load_causal_lm(tiny_model, "cpu").parameters())


# ---- corpus: special tokens, join-random, eval template ---------------------------------------------
def run_corpus(tiny_model: Path, tmp_path: Path, corpus: CorpusSettings) -> tuple[list[dict], list[dict], Path]:
    """template_corpus (after load_data) as the flow runs it: its train and eval examples, and the
    split rows folder."""
    from tasks.load_data import load_data
    from tasks.template_corpus import template_corpus

    store = ArtifactStore(str(tmp_path / "store"))
    with stage_run(RunContext(store=store, device="cpu")):
        template_corpus(corpus, load_data(data_settings()), model_settings(tiny_model))
    [data_entry], [corpus_entry] = store.entries("load_data"), store.entries("template_corpus")
    folder = store.materialize(corpus_entry)
    return read_jsonl(folder, "train"), read_jsonl(folder, "eval"), store.materialize(data_entry)


def stream(blocks: list[dict]) -> list[int]:
    return [t for b in blocks for t in b["input_ids"]]


def test_default_join_corpus_is_bos_text_eos_per_row_as_encode_makes_it(tiny_model, tmp_path):
    train, evaluation, rows = run_corpus(tiny_model, tmp_path, corpus_settings())
    tokenizer = load_tokenizer(tiny_model)
    expected = [t for row in read_jsonl(rows, "train")
                for t in encode(tokenizer, *prompt_and_answer(TEMPLATE, "tone", row))[0]]
    usable = len(expected) // 32 * 32
    assert [b["input_ids"] for b in train] == [expected[i: i + 32] for i in range(0, usable, 32)]
    assert all(b["labels"] == b["input_ids"] for b in train)
    assert [e["input_ids"] for e in evaluation] == \
        [encode(tokenizer, *prompt_and_answer(TEMPLATE, "tone", row))[0][:32] for row in read_jsonl(rows, "eval")]


def test_without_special_tokens_rows_are_joined_bare(tiny_model, tmp_path):
    train, evaluation, rows = run_corpus(tiny_model, tmp_path, corpus_settings(add_special_tokens=False))
    tokenizer = load_tokenizer(tiny_model)
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    assert not specials & set(stream(train))
    bare = [t for row in read_jsonl(rows, "train")
            for t in encode(tokenizer, *prompt_and_answer(TEMPLATE, "tone", row), eos=False, bos=False)[0]]
    assert stream(train) == bare[: len(stream(train))]
    assert all(e["input_ids"][0] == tokenizer.bos_token_id for e in evaluation), \
        "eval rows keep bos/eos: they must match the prompts the model is scored on"


def test_join_random_joins_whole_rows_in_a_seeded_order(tiny_model, tmp_path):
    tokenizer = load_tokenizer(tiny_model)
    joined, _, rows = run_corpus(tiny_model, tmp_path / "join", corpus_settings())
    shuffled, _, _ = run_corpus(tiny_model, tmp_path / "seed1", corpus_settings(corpus_strategy="join-random",
                                                                                random_seed=1))
    again, _, _ = run_corpus(tiny_model, tmp_path / "again", corpus_settings(corpus_strategy="join-random",
                                                                            random_seed=1))
    other, _, _ = run_corpus(tiny_model, tmp_path / "seed2", corpus_settings(corpus_strategy="join-random",
                                                                            random_seed=2))
    assert shuffled == again and shuffled != other and shuffled != joined
    per_row = {tuple(encode(tokenizer, *prompt_and_answer(TEMPLATE, "tone", row))[0])
               for row in read_jsonl(rows, "train")}
    tokens, bos = stream(shuffled), tokenizer.bos_token_id
    starts = [i for i, t in enumerate(tokens) if t == bos]
    whole = [tuple(tokens[a:b]) for a, b in zip(starts, starts[1:])]
    assert len(whole) > 10 and all(segment in per_row for segment in whole), "rows are joined whole"
    assert len(tokens) == len(stream(joined)), "the same tokens, reordered"


def test_eval_rows_are_rendered_with_the_eval_template(tiny_model, tmp_path):
    from grove.scoring import prompts_and_labels

    settings = corpus_settings(eval_text_template=EVAL_TEMPLATE, eval_label_col="tone", source_max_len=128)
    train, evaluation, rows = run_corpus(tiny_model, tmp_path, settings)
    tokenizer = load_tokenizer(tiny_model)
    eval_rows, train_rows = read_jsonl(rows, "eval"), read_jsonl(rows, "train")
    assert [e["input_ids"] for e in evaluation] == \
        [encode(tokenizer, *prompt_and_answer(EVAL_TEMPLATE, "tone", row))[0][:128] for row in eval_rows]
    first = encode(tokenizer, *prompt_and_answer(TEMPLATE, "tone", train_rows[0]))[0]
    assert stream(train)[: len(first)] == first, "training rows keep the train template"
    # evaluate scores prompts made from EvalSettings.text_template (the eval config's): its
    # forward-pass proof needs them to be the start of each eval example
    prompts, _ = prompts_and_labels(eval_rows, EVAL_TEMPLATE, "tone", tokenizer)
    assert all(e["input_ids"][: len(p)] == p for e, p in zip(evaluation, prompts))
