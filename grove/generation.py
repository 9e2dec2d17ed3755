"""Free-text answers (grove.evaluate.answer: text): exact match and chrF of greedy answers.

chrF (sacrebleu) scores character n-gram overlap with the reference: it needs no tokenizer
and no language resources, is deterministic, and gives partial credit where one field of a
structured answer is wrong, which exact match cannot. The aggregate is sacrebleu's corpus
chrF (0-100); each row keeps its own sentence chrF.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GENERATIONS_FILE = "generations.jsonl"  # one line per model and row, in the stage's entry


def text_scores(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """Aggregates and per-row scores of greedy answers against their references."""
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    # an answer identical to its reference scores 100, an empty one too (sacrebleu gives an empty
    # reference 0 whatever the answer, so a right empty answer read as exact but chrF 0)
    per_row = [{"reference": r, "predicted": p, "exact_match": p == r,
                "chrf": 100.0 if p == r else round(chrf.sentence_score(p, [r]).score, 2)}
               for p, r in zip(predictions, references)]
    return {
        "rows": len(per_row),
        "exact_match": round(sum(r["exact_match"] for r in per_row) / len(per_row), 4) if per_row else None,
        "chrf": round(chrf.corpus_score(predictions, [references]).score, 2) if per_row else None,
        "examples": per_row[:3],
        "per_row": per_row,
    }


def aggregates(scores: dict[str, Any]) -> dict[str, Any]:
    """What a stage's summary, the report and the gate carry: no per-row lists."""
    return {k: scores[k] for k in ("rows", "exact_match", "chrf", "examples")}


def write_generations(folder: Path, per_model: dict[str, dict[str, Any]]) -> None:
    """generations.jsonl: every model's every scored row (model, row index, answer, scores)."""
    with open(Path(folder) / GENERATIONS_FILE, "w", encoding="utf-8") as handle:
        for model, scores in per_model.items():
            for index, row in enumerate(scores["per_row"]):
                handle.write(json.dumps({"model": model, "row": index, **row}) + "\n")
