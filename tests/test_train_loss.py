"""The training loss computes LM-head logits only where a label is (tasks/train/fit.py): the
same loss and the same LoRA gradients as the stock Trainer loss, on a real tiny model."""

from __future__ import annotations

import pytest


def trainer_and_batch(tiny_model, tmp_path, answer_tokens: int):
    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments
    from peft import LoraConfig, get_peft_model

    from tasks.train.fit import _trainer_class

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():  # B is zero at init: make the adapter do something
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = _trainer_class()(model=model, args=args)
    ids = torch.randint(3, base.config.vocab_size, (4, 12))
    labels = ids.clone()
    labels[:, : 12 - answer_tokens] = -100
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a padded row
    labels[0, :3] = -100
    return trainer, model, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(trainer, model, batch, stock: bool, items=None):
    from transformers import Trainer

    model.zero_grad()
    compute = Trainer.compute_loss if stock else type(trainer).compute_loss
    loss = compute(trainer, model, dict(batch), num_items_in_batch=items)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("answer_tokens, count_items", [(2, False), (2, True), (11, False)])
def test_label_only_logits_give_the_stock_loss_and_gradients(tiny_model, tmp_path, answer_tokens, count_items):
    import torch

    trainer, model, batch = trainer_and_batch(tiny_model, tmp_path, answer_tokens)
    items = (batch["labels"][:, 1:] != -100).sum() if count_items else None
    fast, fast_grads = loss_and_grads(trainer, model, batch, stock=False, items=items)
    stock, stock_grads = loss_and_grads(trainer, model, batch, stock=True, items=items)
    assert fast == pytest.approx(stock, rel=1e-5, abs=1e-6)
    assert fast_grads.keys() == stock_grads.keys() and fast_grads
    for name in stock_grads:
        torch.testing.assert_close(fast_grads[name], stock_grads[name], rtol=1e-4, atol=1e-6)


def test_the_lm_head_sees_only_labelled_positions(tiny_model, tmp_path):
    trainer, model, batch = trainer_and_batch(tiny_model, tmp_path, answer_tokens=2)
    seen = []
    head = model.get_base_model().get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    try:
        type(trainer).compute_loss(trainer, model, dict(batch))
    finally:
        hook.remove()
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert seen == [(labelled, head.in_features)]
