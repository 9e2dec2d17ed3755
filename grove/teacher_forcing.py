"""The shipped ONNX model's quality on any data: teacher-forced eval loss, perplexity, and agreement
with the merged PyTorch model, on exactly the positions tasks/evaluate.py's forward pass scores.

A position t of an eval example is scored when labels[t + 1] != -100 (the label of the next
token, as the training loss shifts them); its logits predict that label. evaluate stores the
PyTorch model's top-TOP_K log-probabilities at those positions (`reference.npz`, in position
order: example by example, left to right); build_onnx runs the ONNX model as served (through
onnxruntime-genai, the adapter active) on the same token ids and compares:

- eval_loss: mean negative log-likelihood of the labels (token-weighted, like evaluate's), and
  perplexity = exp(eval_loss): comparable with evaluate's base and fine-tuned numbers;
- token_agreement: the share of positions where the ONNX model's top-1 token is the PyTorch one's;
- kl_from_merged: mean KL(merged || shipped) over the top-TOP_K tokens of the merged model plus one
  bucket for the rest of the vocabulary. That is a lower bound on the full KL (merging outcomes
  never increases it) and equals it when the rest holds no mass; storing whole vocabulary rows
  instead would cost 49152 floats per position on SmolLM2.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

REFERENCE_FILE = "reference.npz"  # in the evaluate artifact
TOP_K = 32
# Rows x width per onnxruntime-genai call: the logits of a batch are rows x width x vocab floats
# (SmolLM2: 2048 positions = 400 MB), so long rows go fewer at a time.
TOKEN_BUDGET = 2048
IGNORE = -100
# A position whose logits are not finite (a broken build) scores this many nats, so a broken model
# fails every loss and KL bound instead of slipping through a comparison with NaN.
BROKEN_NATS = 100.0


def scored_positions(example: dict) -> tuple[list[int], list[int]]:
    """(positions, targets): the positions whose logits predict a label, and those labels."""
    labels = example["labels"]
    positions = [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE]
    return positions, [labels[t + 1] for t in positions]


def top_log_probs(logits) -> tuple[np.ndarray, np.ndarray]:
    """(ids [positions, TOP_K] int32, log-probabilities float32) of torch logits [positions, vocab]."""
    import torch

    values, ids = torch.log_softmax(logits.float(), dim=-1).topk(min(TOP_K, logits.shape[-1]), dim=-1)
    return ids.to(torch.int32).cpu().numpy(), values.cpu().numpy()


def save_reference(path: Path, parts: list[tuple[np.ndarray, np.ndarray]]) -> None:
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, TOP_K), np.int32)
    values = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, TOP_K), np.float32)
    np.savez_compressed(path, top_ids=ids, top_log_probs=values)


def load_reference(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    if not Path(path).is_file():
        return None
    with np.load(path) as data:
        return data["top_ids"], data["top_log_probs"]


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def coarse_kl(p_ids: np.ndarray, p_log: np.ndarray, q_log_rows: np.ndarray) -> np.ndarray:
    """KL(p || q) per position over p's top tokens plus one bucket for the rest (see module doc)."""
    q_top = np.take_along_axis(q_log_rows, p_ids.astype(np.int64), axis=-1)
    p_top = np.exp(p_log)
    kl = (p_top * (p_log - q_top)).sum(axis=-1)
    p_rest = np.clip(1.0 - p_top.sum(axis=-1), 0.0, 1.0)
    q_rest = np.clip(1.0 - np.exp(q_top).sum(axis=-1), 1e-12, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = np.where(p_rest > 1e-9, p_rest * (np.log(np.maximum(p_rest, 1e-12)) - np.log(q_rest)), 0.0)
    return np.maximum(kl + rest, 0.0)


def _batches(examples: list[dict], batch_size: int):
    """Consecutive (index, input ids) groups of at most batch_size rows and TOKEN_BUDGET positions;
    each row cut after its last scored position (nothing after it changes a scored logit)."""
    batch, width = [], 0
    for index, example in enumerate(examples):
        positions, _ = scored_positions(example)
        if not positions:
            continue
        ids = example["input_ids"][: positions[-1] + 1]
        if batch and (len(batch) >= batch_size or max(width, len(ids)) * (len(batch) + 1) > TOKEN_BUDGET):
            yield batch
            batch, width = [], 0
        batch.append((index, ids))
        width = max(width, len(ids))
    if batch:
        yield batch


def score_engine(engine, examples: list[dict], batch_size: int,
                 reference: tuple[np.ndarray, np.ndarray] | None, pad_id: int = 0) -> dict:
    """Teacher-forced eval_loss, perplexity and (with the PyTorch `reference`) token_agreement and
    kl_from_merged of an OnnxEngine on the eval examples. See the module docstring."""
    nll, agree, kl, broken = [], [], [], 0
    cursor = 0  # into the reference's positions, which follow the examples' order
    for batch in _batches(examples, batch_size):
        logits = engine.logits([ids for _, ids in batch], pad_id)
        for row, (index, _) in enumerate(batch):
            positions, targets = scored_positions(examples[index])
            log_q = _log_softmax(logits[row, positions])
            broken += int((~np.isfinite(log_q).all(axis=-1)).sum())
            log_q = np.nan_to_num(log_q, nan=-BROKEN_NATS, posinf=-BROKEN_NATS, neginf=-BROKEN_NATS)
            nll.append(-log_q[np.arange(len(targets)), targets])
            if reference is not None:
                p_ids, p_log = (part[cursor: cursor + len(positions)] for part in reference)
                agree.append(log_q.argmax(axis=-1) == p_ids[:, 0])
                kl.append(coarse_kl(p_ids, p_log, log_q))
            cursor += len(positions)
    if reference is not None and cursor != len(reference[0]):
        raise RuntimeError(f"the PyTorch reference holds {len(reference[0])} scored positions but the eval "
                           f"examples have {cursor}: evaluate and build_onnx read different examples")
    if not nll:
        return {"eval_loss": None, "perplexity": None, "token_agreement": None, "kl_from_merged": None,
                "scored_tokens": 0}
    loss = float(np.concatenate(nll).mean())
    return {"eval_loss": round(loss, 4), "perplexity": round(math.exp(loss), 3) if loss < 50 else None,
            "token_agreement": round(float(np.concatenate(agree).mean()), 4) if agree else None,
            "kl_from_merged": round(float(np.concatenate(kl).mean()), 5) if kl else None,
            "scored_tokens": int(sum(len(n) for n in nll)), "non_finite_tokens": broken}
