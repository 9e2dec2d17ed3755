"""Stage logic on small inputs: dedupe and split before packing, Olive's join, completion-only loss."""

from __future__ import annotations

import pytest

import json

from conftest import TONE_DATA
from tasks.load_data import dedupe, split_rows
from grove.models import load_tokenizer
from grove.settings import CorpusSettings
from tasks.template_corpus import IGNORE, examples, join_blocks, line_examples
from grove.textdata import first_line, prompt_and_answer

TEMPLATE = "### Text: {phrase}\n### The tone is:\n{tone}"


def rows():
    return [json.loads(line) for line in TONE_DATA.read_text().splitlines()]


def test_duplicates_are_dropped_and_counted():
    data = rows()
    unique, removed = dedupe(data, ["phrase", "tone"])
    assert removed == len(data) - len({(r["phrase"], r["tone"]) for r in data}) > 0
    assert len({(r["phrase"], r["tone"]) for r in unique}) == len(unique)


def test_split_is_seeded_disjoint_and_sized():
    unique, _ = dedupe(rows(), ["phrase", "tone"])
    train, held_out = split_rows(unique, 0.3, seed=7)
    again, _ = split_rows(unique, 0.3, seed=7)
    other, _ = split_rows(unique, 0.3, seed=8)
    assert train == again and train != other
    assert len(held_out) == round(len(unique) * 0.3)
    assert not {r["phrase"] for r in train} & {r["phrase"] for r in held_out}, "eval text leaked into training"
    assert len(split_rows(unique, 25, seed=7)[1]) == 25  # a whole number means rows


def corpus(**overrides) -> CorpusSettings:
    return CorpusSettings(**{"text_template": TEMPLATE, "text_cols": ["phrase", "tone"], "label_col": "tone",
                             "corpus_strategy": "join", "source_max_len": 32, **overrides})


def test_join_concatenates_bos_text_eos_and_drops_the_tail(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    sample = rows()[:20]
    pairs = examples(sample, corpus(), tokenizer)
    for ids, _ in pairs:
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    stream = [t for ids, _ in pairs for t in ids]
    blocks = join_blocks(pairs, 32)
    assert len(blocks) == len(stream) // 32
    assert all(len(b["input_ids"]) == 32 for b in blocks)
    assert [t for b in blocks for t in b["input_ids"]] == stream[: len(blocks) * 32]


def test_line_by_line_pads_only_when_asked(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    pairs = examples(rows()[:5], corpus(corpus_strategy="line-by-line"), tokenizer)
    padded = line_examples(pairs, 64, True, tokenizer.pad_token_id)
    assert all(len(e["input_ids"]) == 64 for e in padded)
    assert all(e["labels"][len(p[0]):] == [IGNORE] * (64 - len(p[0])) for e, p in zip(padded, pairs))
    unpadded = line_examples(pairs, 64, False, tokenizer.pad_token_id)
    assert [len(e["input_ids"]) for e in unpadded] == [len(p[0]) for p in pairs]


def test_completion_only_loss_masks_the_prompt_and_keeps_the_answer(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    row = rows()[0]
    (ids, labels), = examples([row], corpus(completion_only_loss=True), tokenizer)
    (_, full_labels), = examples([row], corpus(completion_only_loss=False), tokenizer)
    assert full_labels == ids, "Olive's default: loss on every token"
    learned = [t for t in labels if t != IGNORE]
    answer = tokenizer(row["tone"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert learned == answer
    assert labels[: len(ids) - len(answer)] == [IGNORE] * (len(ids) - len(answer))


def test_prompt_is_the_template_up_to_the_label():
    prompt, answer = prompt_and_answer(TEMPLATE, "tone", {"phrase": "I won!", "tone": "joy"})
    assert prompt == "### Text: I won!\n### The tone is:\n" and answer == "joy"
    assert first_line(" joy\n### Text: more") == "joy"


def test_forward_pass_argmax_is_what_greedy_generation_emits_first(tiny_model):
    """The forward-pass proof of a correct answer relies on this alignment."""
    from grove.engines import HfEngine
    from tasks.evaluate import forward_pass
    from grove.models import load_causal_lm
    from grove.scoring import prompts_and_labels

    tokenizer = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model, "cpu").eval()
    sample = rows()[:6]
    prompts, _ = prompts_and_labels(sample, TEMPLATE, "tone", tokenizer)
    pairs = examples(sample, corpus(corpus_strategy="line-by-line"), tokenizer)
    _, argmax = forward_pass(model, line_examples(pairs, 64, False, tokenizer.pad_token_id), 4)
    engine = HfEngine(model, tokenizer.pad_token_id, set())
    for prompt, predicted in zip(prompts, argmax):
        first = engine.generate_batch([prompt], 1)[0][0]
        assert predicted[len(prompt) - 1] == first


def test_forward_pass_on_a_completion_only_corpus_equals_the_full_forward(tiny_model):
    """evaluate runs the LM head only at labelled positions: same loss, same argmax there."""
    import torch

    from grove.models import load_causal_lm
    from tasks.evaluate import forward_pass

    tokenizer = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model, "cpu").eval()
    pairs = examples(rows()[:6], corpus(corpus_strategy="line-by-line", completion_only_loss=True), tokenizer)
    batch = line_examples(pairs, 64, False, tokenizer.pad_token_id)
    loss, argmax = forward_pass(model, batch, 4)
    total, count = 0.0, 0
    for example, predicted in zip(batch, argmax):
        ids, labels = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"][1:])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        keep = labels != -100
        assert 0 < int(keep.sum()) < len(labels)  # completion only: a few labelled positions
        total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
        count += int(keep.sum())
        expected = torch.where(keep, logits.argmax(-1), -1).tolist() + [-1]
        assert predicted == expected
    assert loss == pytest.approx(total / count, rel=1e-5)


def test_forward_pass_proof_accepts_only_exact_answers_followed_by_eos(tiny_model):
    from tasks.evaluate import proven_by_forward_pass
    from grove.scoring import prompts_and_labels

    tokenizer = load_tokenizer(tiny_model)
    sample = rows()[:3]
    prompts, labels = prompts_and_labels(sample, TEMPLATE, "tone", tokenizer)
    pairs = examples(sample, corpus(corpus_strategy="line-by-line"), tokenizer)
    exact = [ids[1:] + [0] for ids, _ in pairs]  # argmax at position t = token t+1: the gold answer
    wrong = [list(a) for a in exact]
    wrong[1][len(prompts[1]) - 1] = (wrong[1][len(prompts[1]) - 1] + 1) % 300  # first answer token differs
    eos = {tokenizer.eos_token_id}
    examples_ = [{"input_ids": ids} for ids, _ in pairs]
    assert proven_by_forward_pass(examples_, exact, prompts, labels, tokenizer, eos, 16) == \
        {0: labels[0], 1: labels[1], 2: labels[2]}
    assert set(proven_by_forward_pass(examples_, wrong, prompts, labels, tokenizer, eos, 16)) == {0, 2}
    # an answer longer than the generation budget would be cut short when generated: not proven
    answer_tokens = [len(ids) - 1 - len(prompt) for (ids, _), prompt in zip(pairs, prompts)]
    budget = max(answer_tokens) - 1
    assert set(proven_by_forward_pass(examples_, exact, prompts, labels, tokenizer, eos, budget)) == \
        {i for i, n in enumerate(answer_tokens) if n <= budget}
