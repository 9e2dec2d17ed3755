"""Text helpers shared by the stages that read the data: templating, prompts, answers.

Training examples and evaluation prompts are tokenized the same way (prompt and answer
separately, then joined), so the model is scored on exactly the token boundary it
was trained on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path


def read_jsonl(folder: Path, name: str) -> list[dict]:
    """Rows of <name>.jsonl in an artifact folder (data splits, tokenized examples)."""
    with open(Path(folder) / f"{name}.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def split_template(template: str, label_col: str | None) -> tuple[str, str]:
    """(prompt part, answer part) of a template whose last placeholder is the label."""
    if label_col:
        match = re.search(r"\{" + re.escape(label_col) + r"\}\s*$", template)
        if match:
            return template[: match.start()], template[match.start():]
    return template, ""


def render(template: str, row: dict) -> str:
    return template.format(**{k: "" if v is None else v for k, v in row.items()})


def prompt_and_answer(template: str, label_col: str | None, row: dict) -> tuple[str, str]:
    prompt_part, answer_part = split_template(template, label_col)
    return render(prompt_part, row), render(answer_part, row)


def encode(tokenizer, prompt: str, answer: str = "", eos: bool = True, bos: bool = True) -> tuple[list[int], int]:
    """(bos +) prompt + answer (+ eos); returns the ids and how many belong to bos+prompt."""
    start = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []
    prompt_ids = start + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] if answer else []
    tail = [tokenizer.eos_token_id] if eos and tokenizer.eos_token_id is not None else []
    return prompt_ids + answer_ids + tail, len(prompt_ids)


def first_line(generated: str) -> str:
    """The model's answer: what it generated up to the first line break."""
    return generated.strip().split("\n", 1)[0].strip() if generated.strip() else ""


def answer_of(generated: str, whole: bool = False) -> str:
    """A label is the first line generated; a free-text answer (grove.evaluate.answer: text, `whole`)
    is all of it up to eos or max_new_tokens, stripped: multi-line answers (a list, pretty-printed
    JSON, code) are scored and shipped whole, not cut to their first line."""
    return generated.strip() if whole else first_line(generated)
