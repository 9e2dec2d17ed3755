"""Stage 2, template_corpus: render each row through text_template and tokenize it.

`join` reproduces Olive: every row becomes bos + text + eos (just text with
add_special_tokens false), rows are concatenated and cut into non-overlapping source_max_len
blocks; the short tail is dropped. `join-random` does the same after shuffling the rows with
random_seed. `line-by-line` keeps one example per row (padded to source_max_len if pad_to_max_len).
With completion_only_loss the prompt tokens get label -100, so only the answer is learned.

The eval corpus is always one example per eval row, so eval loss does not depend on packing.
Its rows are rendered with the eval template (eval_text_template, else the train one) and
always as bos + text + eos: evaluate, build_onnx and benchmark prompt the model with
bos + the eval template's prompt part, and evaluate's forward-pass proof compares the two.
"""

from __future__ import annotations

import json
import logging
import random

from grove.errors import UserError
from grove.models import load_tokenizer, model_folder
from grove.settings import CorpusSettings, ModelSettings
from grove.stage import ArtifactRef, grove_stage, open_artifact, output_dir
from grove.textdata import encode, prompt_and_answer, read_jsonl, split_template

IGNORE = -100
log = logging.getLogger("grove.template_corpus")


def eval_template(corpus: CorpusSettings) -> tuple[str, str | None]:
    """The template and label column the eval rows are rendered with."""
    return corpus.eval_text_template or corpus.text_template, corpus.eval_label_col or corpus.label_col


def examples(rows: list[dict], corpus: CorpusSettings, tokenizer,
             evaluation: bool = False) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row; labels mask the prompt when completion_only_loss is on."""
    template, label_col = eval_template(corpus) if evaluation else (corpus.text_template, corpus.label_col)
    special = evaluation or corpus.add_special_tokens
    # a template that ends with its answer column: the prompt is masked even where a row's answer
    # is empty (only eos is learned there), not trained on as a template without one is
    answered = bool(split_template(template, label_col)[1])
    result = []
    for row in rows:
        prompt, answer = prompt_and_answer(template, label_col, row)
        ids, prompt_len = encode(tokenizer, prompt, answer, eos=special, bos=special)
        labels = list(ids)
        if corpus.completion_only_loss and answered:
            labels[:prompt_len] = [IGNORE] * prompt_len
        result.append((ids, labels))
    return result


def join_blocks(pairs: list[tuple[list[int], list[int]]], block: int) -> list[dict]:
    ids = [t for p in pairs for t in p[0]]
    labels = [t for p in pairs for t in p[1]]
    return [{"input_ids": ids[i: i + block], "labels": labels[i: i + block]}
            for i in range(0, len(ids) - block + 1, block)]


def line_examples(pairs, block: int, pad: bool, pad_id: int) -> list[dict]:
    out = []
    for ids, labels in pairs:
        ids, labels = ids[:block], labels[:block]
        mask = [1] * len(ids)
        if pad and len(ids) < block:
            extra = block - len(ids)
            ids, labels, mask = ids + [pad_id] * extra, labels + [IGNORE] * extra, mask + [0] * extra
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return out


def labelled(examples: list[dict]) -> int:
    return sum(1 for e in examples for t in e["labels"][1:] if t != IGNORE)  # a label predicted by a position


def check_answers_fit(train: list[dict], evaluation: list[dict], eval_pairs, corpus: CorpusSettings) -> None:
    """Before training: source_max_len leaves answer tokens to learn and to score. A prompt that
    fills it cuts the answer off, and with completion_only_loss nothing is left (training learned
    nothing, and every eval loss was missing, so the search refused every build)."""
    where = f"pre_process_data_config.params.source_max_len={corpus.source_max_len}"
    if not labelled(train):
        raise UserError(f"{where} cuts off every training example's answer: no token to learn "
                        f"(completion_only_loss scores the answer only); raise source_max_len")
    if evaluation and not labelled(evaluation):
        raise UserError(f"{where} cuts off every eval row's answer: nothing to score; raise source_max_len")
    cut = sum(len(ids) > corpus.source_max_len for ids, _ in eval_pairs)
    if cut:  # their answers lose their end (and eos): scored on what is left
        log.warning("%d of %d eval rows are longer than %s: their answers are cut short there",
                    cut, len(eval_pairs), where)


@grove_stage("template_corpus")
def template_corpus(corpus: CorpusSettings, data: ArtifactRef, model: ModelSettings) -> dict:
    """Tokenized training blocks (train.jsonl) and per-row eval examples (eval.jsonl)."""
    folder = open_artifact(data)
    tokenizer = load_tokenizer(model_folder(model), model.trust_remote_code)
    train_pairs = examples(read_jsonl(folder, "train"), corpus, tokenizer)
    eval_pairs = examples(read_jsonl(folder, "eval"), corpus, tokenizer, evaluation=True)
    if corpus.corpus_strategy == "join-random":
        random.Random(corpus.random_seed).shuffle(train_pairs)
    if corpus.corpus_strategy in ("join", "join-random"):
        train = join_blocks(train_pairs, corpus.source_max_len)
        total = sum(len(p[0]) for p in train_pairs)
        if not train:
            raise ValueError(f"the training corpus has {total} tokens, fewer than source_max_len="
                             f"{corpus.source_max_len}: lower source_max_len or use corpus_strategy line-by-line")
    elif corpus.corpus_strategy == "line-by-line":
        train = line_examples(train_pairs, corpus.source_max_len, corpus.pad_to_max_len, tokenizer.pad_token_id)
    else:
        raise ValueError(f"corpus_strategy {corpus.corpus_strategy!r} is not supported; "
                         f"use join, join-random or line-by-line")
    evaluation = line_examples(eval_pairs, corpus.source_max_len, False, tokenizer.pad_token_id)
    check_answers_fit(train, evaluation, eval_pairs, corpus)
    out = output_dir()
    for name, part in (("train.jsonl", train), ("eval.jsonl", evaluation)):
        with open(out / name, "w") as handle:
            for example in part:
                handle.write(json.dumps(example) + "\n")
    trained_tokens = sum(sum(1 for t in e["labels"] if t != IGNORE) for e in train)
    return {"train_examples": len(train), "eval_examples": len(evaluation),
            "train_tokens": sum(len(e["input_ids"]) for e in train), "loss_tokens": trained_tokens}
