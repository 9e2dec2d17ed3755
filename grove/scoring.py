"""Task accuracy: generate greedily after the prompt part of the template, exact-match the label.

Used for the base model, the fine-tuned model and the ONNX model alike, on the same
eval rows and the same prompt token ids, with per-label counts.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from grove.settings import EvalSettings
from grove.textdata import answer_of, encode, prompt_and_answer


def prompts_and_labels(rows: list[dict], template: str, label_col: str, tokenizer) -> tuple[list[list[int]], list[str]]:
    prompts, labels = [], []
    for row in rows:
        prompt, _ = prompt_and_answer(template, label_col, row)
        ids, _ = encode(tokenizer, prompt, eos=False)
        prompts.append(ids)
        labels.append(str(row[label_col]).strip())
    return prompts, labels


def task_accuracy(engine, tokenizer, rows: list[dict], template: str, label_col: str,
                  max_new_tokens: int, batch_size: int, progress=None) -> dict[str, Any]:
    """Accuracy overall and per label, plus a few predictions to look at."""
    prompts, labels = prompts_and_labels(rows, template, label_col, tokenizer)
    return score_prompts(engine, tokenizer, prompts, labels, max_new_tokens, batch_size, progress)


def score_prompts(engine, tokenizer, prompts: list[list[int]], labels: list[str], max_new_tokens: int,
                  batch_size: int, progress=None, known: dict[int, str] | None = None) -> dict[str, Any]:
    """Greedy answers for tokenized prompts, scored against their labels."""
    return summarize(generate_answers(engine, tokenizer, prompts, max_new_tokens, batch_size, progress, known),
                     labels)


def generate_answers(engine, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                     progress=None, known: dict[int, str] | None = None, whole: bool = False) -> list[str]:
    """Each prompt's greedy answer (the first line generated; with `whole`, all of it), in order.

    `known` maps row indexes to answers already established (see evaluate's forward-pass
    proof); every other row is generated greedily.
    """
    predictions: dict[int, str] = dict(known or {})
    todo = [i for i in range(len(prompts)) if i not in predictions]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start: start + batch_size]
        batch = engine.generate_batch([prompts[i] for i in chunk], max_new_tokens)
        for index, tokens in zip(chunk, batch):
            predictions[index] = answer_of(tokenizer.decode(tokens, skip_special_tokens=True), whole)
        if progress:
            progress(len(predictions), len(prompts))
    return [predictions[i] for i in range(len(prompts))]


def summarize(predictions: list[str], labels: list[str]) -> dict[str, Any]:
    total, correct = Counter(labels), Counter(l for p, l in zip(predictions, labels) if p == l)
    per_label = {label: {"correct": correct[label], "total": n, "accuracy": round(correct[label] / n, 4)}
                 for label, n in sorted(total.items())}
    return {
        "accuracy": round(sum(correct.values()) / len(labels), 4) if labels else None,
        "rows": len(labels),
        "per_label": per_label,
        "predicted": dict(Counter(predictions).most_common(10)),
        "examples": [{"label": l, "predicted": p} for p, l in list(zip(predictions, labels))[:5]],
        "predictions": predictions,  # every row's answer, in row order
    }


def answer_token_counts(settings: EvalSettings, rows: list[dict], tokenizer) -> list[int]:
    """The free-text answers of the eval rows, in tokens (none for a label)."""
    if settings.answer != "text" or not settings.label_col:
        return []
    return [len(tokenizer(str(r[settings.label_col]).strip(), add_special_tokens=False)["input_ids"]) for r in rows]


def new_tokens(settings: EvalSettings, answer_tokens: list[int], model_config: dict | None) -> int:
    """The generation budget of a run's scoring and of its shipped folder (EvalSettings.new_tokens):
    evaluate and build_onnx size it alike, from answer_token_counts of the same eval rows."""
    context = (model_config or {}).get("max_position_embeddings")
    return settings.new_tokens(answer_tokens, context if isinstance(context, int) else None)
