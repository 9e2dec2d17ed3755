"""Grove's QLoRA/LoRA training setup on a GPU: the levers measured by bench/gpu_train_throughput.py.

Imports only torch/transformers/peft (and liger-kernel when asked for), never Prefect, so the
GPU benchmark runs the very code the train stage runs. Measured on one H200 with the
Phi-3-mini shape (bench/results/h200/, README "Training throughput on a GPU"):

- no fp32 upcast: peft's prepare_model_for_kbit_training casts norms, embeddings and lm_head
  to fp32, which costs ~40% of the step; Grove only makes the inputs require grad.
- padding-free packing: a batch's examples are packed first-fit into rows of `pack_length`
  tokens with position_ids restarting at 0 for each example and no attention_mask, so
  transformers builds a block-diagonal causal mask (no attention across examples) and no
  compute is spent on padding. The first label of each packed example is ignored, so the
  loss covers exactly the token pairs of the padded batch.
- Liger kernels (liger-kernel, pinned in the `cuda` extra): fused RMSNorm, SwiGLU, RoPE and a
  chunked linear+cross-entropy that never materializes the [tokens, vocab] logits.

These apply on CUDA only: on a CPU the train stage behaves as before (padded batches).
"""

from __future__ import annotations

import logging

IGNORE = -100
log = logging.getLogger("grove.train")


def pack_examples(examples: list[dict], capacity: int) -> list[list[int]]:
    """First-fit: indices of examples per row, each row holding at most `capacity` tokens
    (an example longer than capacity gets a row of its own). Order within a row is kept."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index, example in enumerate(examples):
        size = len(example["input_ids"])
        for row, free in enumerate(room):
            if size <= free:
                rows[row].append(index)
                room[row] -= size
                break
        else:
            rows.append([index])
            room.append(max(capacity - size, 0))
    return rows


class PackingCollator:
    """Packs a batch into rows without cross-example attention (position_ids restart per example).

    Returns input_ids, labels and position_ids of shape [rows, width]; no attention_mask, which
    is what makes transformers derive the packed (block-diagonal) causal mask from position_ids.
    A row's padded tail is its own segment (positions from 0, labels ignored).
    """

    def __init__(self, pad_id: int, capacity: int):
        self.pad_id, self.capacity = pad_id, capacity

    def __call__(self, batch):
        import torch

        rows = pack_examples([{"input_ids": range(_length(e))} for e in batch], self.capacity)
        packed = []
        for row in rows:
            ids, labels, positions = [], [], []
            for index in row:
                example = batch[index]
                n = _length(example)
                ids += list(example["input_ids"][:n])
                example_labels = list(example.get("labels", example["input_ids"]))[:n]
                # the previous example's last token must not learn to predict this one's first
                labels += [IGNORE] + example_labels[1:]
                positions += list(range(n))
            packed.append((ids, labels, positions))
        width = max(len(p[0]) for p in packed)
        tail = [width - len(p[0]) for p in packed]
        return {
            "input_ids": torch.tensor([p[0] + [self.pad_id] * t for p, t in zip(packed, tail)]),
            "labels": torch.tensor([p[1] + [IGNORE] * t for p, t in zip(packed, tail)]),
            "position_ids": torch.tensor([p[2] + list(range(t)) for p, t in zip(packed, tail)]),
        }


def _length(example: dict) -> int:
    """An example's real length: padding (attention_mask 0, at the right) is dropped."""
    mask = example.get("attention_mask")
    return sum(mask) if mask is not None else len(example["input_ids"])


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or no triton/CUDA
        return False
    return True


def apply_liger(model, fused_cross_entropy: bool = True, rms_norm: bool = True, swiglu: bool = True,
                rope: bool = True) -> bool:
    """Liger kernels on a loaded (possibly 4-bit) model, before peft wraps it. Returns whether
    the model type is supported (unsupported types are left as they are)."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(model.config, "model_type", None)
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        log.warning("liger-kernel has no kernels for model type %r; training without them", model_type)
        return False
    import inspect

    wanted = {"fused_linear_cross_entropy": fused_cross_entropy, "rms_norm": rms_norm, "swiglu": swiglu,
              "rope": rope, "cross_entropy": False}
    accepted = inspect.signature(apply).parameters
    apply(model=model, **{k: v for k, v in wanted.items() if k in accepted})
    return True


def compile_layers(model) -> int:
    """Regional torch.compile: each decoder layer (one compiled graph shared by all layers)."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile()
    return len(layers)
