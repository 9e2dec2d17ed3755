"""The bundled model's tokenizer.json stays readable by onnxruntime-genai whatever transformers converted it.

transformers 5.17 wrote SmolLM2's byte-level BPE with SentencePiece parts (byte_fallback, fuse_unk, an
empty normalizer Sequence, a ByteFallback/Fuse/Replace/ByteLevel decoder). Hugging Face's tokenizers
ignores them on byte-level input; onnxruntime-genai 0.18 then encoded every prompt with -1 ids, and every
ONNX model of the fine-tune scored 0.02-0.08 on the H200 machine (bench/README.md: Shipping adapters).
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from grove.models import repair_byte_level_tokenizer

TEXTS = ["### Text: A huge dog lunged at us on the trail and I froze.\n### The tone is:\nfear",
         "Our garden club won first prize at the county fair.", "naïve café, 東京 🙂 double  spaces\ttab"]


def byte_level_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>"], show_progress=False)
    tokenizer.train_from_iterator(TEXTS * 5, trainer)
    return tokenizer


def as_transformers_5_17_wrote_it(spec: dict) -> dict:
    spec = json.loads(json.dumps(spec))
    spec["model"].update(byte_fallback=True, fuse_unk=True, unk_token="<|endoftext|>")
    spec["normalizer"] = {"type": "Sequence", "normalizers": []}
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    return spec


def test_the_sentencepiece_parts_go_and_the_ids_stay(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(as_transformers_5_17_wrote_it(json.loads(byte_level_bpe().to_str()))))
    before = Tokenizer.from_file(str(path))
    ids = [before.encode(text).ids for text in TEXTS]

    assert repair_byte_level_tokenizer(path) is True
    spec = json.loads(path.read_text())
    assert spec["model"]["byte_fallback"] is False and spec["model"]["fuse_unk"] is False
    assert spec["normalizer"] is None
    assert spec["decoder"]["type"] == "ByteLevel"
    after = Tokenizer.from_file(str(path))
    assert [after.encode(text).ids for text in TEXTS] == ids
    assert [after.decode(i) for i in ids] == TEXTS
    assert repair_byte_level_tokenizer(path) is False  # idempotent: a repaired file is left alone


def test_a_plain_byte_level_file_and_a_sentencepiece_one_are_left_alone(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text(byte_level_bpe().to_str())
    text = plain.read_text()
    assert repair_byte_level_tokenizer(plain) is False and plain.read_text() == text

    # a real SentencePiece BPE (Metaspace, byte fallback): its byte_fallback is needed, not repaired
    sentencepiece = tmp_path / "sp.json"
    spec = as_transformers_5_17_wrote_it(json.loads(byte_level_bpe().to_str()))
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    sentencepiece.write_text(json.dumps(spec))
    text = sentencepiece.read_text()
    assert repair_byte_level_tokenizer(sentencepiece) is False and sentencepiece.read_text() == text
    assert repair_byte_level_tokenizer(tmp_path / "missing.json") is False
