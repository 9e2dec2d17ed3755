"""The merged Hugging Face folder is right for transformers users: its tokenizer, config and
generation settings agree on eos, bos and pad, so `generate` stops after the answer.

Seen on the H200 (transformers 5.17 converting the bundled GGUF): the tokenizer named `<|im_start|>`
(id 1) eos, pad and bos while config.json said eos 2, so training taught the model to end answers
with id 1 and `generate` on the merged folder wrote `joy<|im_start|>assistant...`. The tiny model
here carries the same disagreement (tokenizer eos = pad = bos `<s>`, config eos `</s>`).
The real stages run in-process on the CPU: load_data, template_corpus, train (LoRA), merge_adapters.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import TONE_DATA
from grove.data_files import content_digest
from grove.settings import CorpusSettings, DataSettings, ModelSettings, TrainSettings
from grove.stage import RunContext, stage_run
from grove.store import ArtifactStore

TEMPLATE = "### Text: {phrase}\n### The tone is:\n{tone}"


@pytest.fixture(scope="module")
def disagreeing_model(tmp_path_factory) -> Path:
    """A tiny model whose tokenizer names `<s>` (id 1) eos, pad and bos while config.json says eos `</s>` (2)."""
    from grove.models import make_tiny_model

    corpus = [TEMPLATE.format(**json.loads(line)) for line in TONE_DATA.read_text().splitlines()]
    folder = make_tiny_model(tmp_path_factory.mktemp("disagreeing") / "llama", "llama", corpus)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings.update(eos_token="<s>", pad_token="<s>", bos_token="<s>")
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    config = json.loads((folder / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"]) == (2, 1)
    return folder


@pytest.fixture(scope="module")
def merged_folder(disagreeing_model, tmp_path_factory) -> Path:
    from tasks.load_data import load_data
    from tasks.merge_adapters import merge_adapters
    from tasks.template_corpus import template_corpus
    from tasks.train import train

    model = ModelSettings(name="tiny", path=str(disagreeing_model), content_sha256="tiny-disagreeing")
    digest = hashlib.sha256(content_digest(str(TONE_DATA)).encode()).hexdigest()
    data = DataSettings(name="tone", files=[str(TONE_DATA)], format="json", text_cols=["phrase", "tone"],
                        text_template=TEMPLATE, label_col="tone", max_samples=120, content_sha256=digest)
    corpus = CorpusSettings(text_template=TEMPLATE, text_cols=["phrase", "tone"], label_col="tone",
                            corpus_strategy="line-by-line", completion_only_loss=True, source_max_len=48)
    lora = TrainSettings(method="lora", r=8, alpha=16,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                         training_args={"seed": 0, "per_device_train_batch_size": 16, "max_steps": 30,
                                        "learning_rate": 2e-2, "logging_steps": 10})
    store = ArtifactStore(str(tmp_path_factory.mktemp("store")))
    with stage_run(RunContext(store=store, device="cpu")):
        merge_adapters(model, train(lora, template_corpus(corpus, load_data(data), model), model))
    [entry] = store.entries("merge_adapters")
    return store.materialize(entry)


def test_the_merged_folders_tokenizer_config_and_generation_settings_agree(merged_folder):
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(merged_folder)
    config = json.loads((merged_folder / "config.json").read_text())
    generation = GenerationConfig.from_pretrained(merged_folder)
    assert (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token) == ("</s>", "<s>", "<pad>")
    assert tokenizer.eos_token_id == config["eos_token_id"] == generation.eos_token_id
    assert tokenizer.bos_token_id == config["bos_token_id"] == generation.bos_token_id
    assert tokenizer.pad_token_id == config["pad_token_id"] == generation.pad_token_id


def test_transformers_generate_on_the_merged_folder_stops_after_the_answer(merged_folder):
    """Greedy `generate` with nothing but the folder's own settings: the answer, then eos, well before
    max_new_tokens (on the old code the model ended answers with `<s>`, which stops nothing)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_folder)
    model = AutoModelForCausalLM.from_pretrained(merged_folder).eval()
    rows = [json.loads(line) for line in TONE_DATA.read_text().splitlines()][-6:]
    for row in rows:
        prompt = tokenizer.bos_token + TEMPLATE.split("{tone}")[0].format(phrase=row["phrase"])
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            new = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
        answer = tokenizer.decode(new, skip_special_tokens=True)
        assert new[-1] == tokenizer.eos_token_id and len(new) < 16, f"no eos after the answer: {answer!r} {new}"
        assert answer.strip() in {"joy", "sadness", "fear", "surprise", "anger", "love"}, answer
