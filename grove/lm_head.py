"""The LM head applied only where its output is used.

A completion-only corpus labels a few answer tokens per row, yet a causal LM's forward computes
a vocabulary-wide logit row at every position (SmolLM2: 49152 x 576 per token). Training's
loss and evaluate's loss and answer check need those rows at the labelled positions only.
"""

from __future__ import annotations


def split_model(model):
    """(decoder, head) of a causal LM or a peft model around one; None where the model does not
    expose them (custom code): callers then use the full forward."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        decoder, head = causal.get_decoder(), causal.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return (decoder, head) if decoder is not None and head is not None and decoder is not causal else None


def labelled_logits(model, inputs: dict, keep):
    """Float logits at the positions `keep` (bool [batch, width - 1]) selects, i.e. the rows that
    predict each labelled next token, or None if the model cannot be split (see split_model)."""
    parts = split_model(model)
    if parts is None:
        return None
    decoder, head = parts
    features = {k: v for k, v in inputs.items() if k != "labels"}  # packing adds position ids
    hidden = decoder(**features, use_cache=False).last_hidden_state
    return head(hidden[:, :-1][keep]).float()
