"""What the data's answer column says about grove.evaluate.answer, warned once at that key by
`validate` and `run` (local data, read through at config time by flows/config/checks.py):
free text left as a label, a label scored as text, labels over several lines, empty answers."""

from __future__ import annotations

from typing import Callable

from grove.settings import RunConfig

FREE_TEXT_WORDS = 6  # a label or a short exact answer is rarely this long; a sentence usually is
AT = "grove.evaluate.answer"


def warn_about_answers(config: RunConfig, answers: list[str], blank: list[str], warn: Callable[[str, str], None]) -> None:
    """`answers`: the template's last column, row by row; `blank`: where (file:line) each empty one is."""
    column = config.data.text_cols[-1]
    if config.evaluate.label_col != column:  # the template's last placeholder is not the answer column
        return
    if blank:
        warn(AT, f"{len(blank)} of {len(answers)} rows have an empty answer ({column!r}), first at {blank[0]}: "
                 f"the model is trained to answer nothing to their prompts, and an empty answer scores as right "
                 f"there; drop or fill those rows")
    if config.evaluate.answer == "label":
        multi_line = [a for a in answers if "\n" in a.strip()]
        if reads_as_free_text(answers):
            warn(AT, f"label, but the answer column {column!r} reads as free text ({len(set(answers))} distinct "
                     f"values in {len(answers)} rows, a median of {median_words(answers)} words): accuracy counts "
                     f"exact first-line matches only, and the ladder and the gate judge on it. Set "
                     f"grove.evaluate.answer: text to score answers by chrF and exact match and judge builds by "
                     f"teacher-forced eval loss")
        elif multi_line:
            warn(AT, f"label, but {len(multi_line)} of {len(answers)} answers in {column!r} span several lines: "
                     f"a label is scored on the first line generated, so those never match. Set "
                     f"grove.evaluate.answer: text to score whole answers")
    elif reads_as_labels(answers):
        warn(AT, f"text, but the answer column {column!r} reads as a label ({len(set(answers))} distinct values in "
                 f"{len(answers)} rows): chrF and exact match are scored instead of accuracy per label, and the "
                 f"ladder and the gate judge by eval loss. Leave grove.evaluate.answer at label to score it as one")


def median_words(answers: list[str]) -> int:
    counts = sorted(len(a.split()) for a in answers)
    return counts[len(counts) // 2] if counts else 0


def reads_as_free_text(answers: list[str]) -> bool:
    """Answers that are no label: mostly distinct, and sentences rather than a word or two (a
    short exact answer, such as a capital city, is still scored well by accuracy)."""
    return len(answers) >= 10 and len(set(answers)) > len(answers) / 2 and median_words(answers) >= FREE_TEXT_WORDS


def reads_as_labels(answers: list[str]) -> bool:
    """A class column: a few short values, each repeated (a fifth of the rows at most are distinct)."""
    return len(answers) >= 10 and len(set(answers)) <= len(answers) / 5 and median_words(answers) < FREE_TEXT_WORDS
