"""QLoRA on the CPU computes the right LoRA gradients.

On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights after an eval forward under
no_grad and then trains through gemv_4bit, which has no backward: the loss still falls
but LoRA gradients are wrong (relative error ~1.0). Grove's train stage turns that path
off. This test builds the model exactly as the train stage does, runs the eval pass that
triggers the repack, and compares every LoRA gradient with a float32 reference model
whose weights are the dequantized 4-bit weights.
"""

from __future__ import annotations

import torch

from grove.models import load_causal_lm
from grove.settings import ModelSettings, TrainSettings
from tasks.train.fit import add_lora, load_base_for_training


def test_qlora_lora_gradients_match_a_dequantized_fp32_reference(tiny_model):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from peft import LoraConfig, get_peft_model

    settings = TrainSettings(method="qlora", r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    model_settings = ModelSettings(name=str(tiny_model), path=str(tiny_model), content_sha256="x")
    torch.manual_seed(0)
    quantized = add_lora(load_base_for_training(model_settings, settings, "cpu"), settings)
    four_bit = [m for m in quantized.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit, "QLoRA must load 4-bit linear layers"
    assert all(m.support_avx512bf16_for_cpu is False for m in four_bit)
    # LoRA B starts at zero (so A gets no gradient); give both factors values to compare.
    with torch.no_grad():
        for name, param in quantized.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.05)

    ids = torch.randint(5, 300, (2, 16))
    quantized.eval()
    with torch.no_grad():  # the eval pass that triggers the repack on AVX512-BF16 CPUs
        quantized(input_ids=ids)
    quantized.train()
    quantized(input_ids=ids, labels=ids).loss.backward()
    got = {n: p.grad.clone() for n, p in quantized.named_parameters() if "lora_" in n}

    reference_base = load_causal_lm(tiny_model, "cpu")
    dequantized = {}
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = F.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            dequantized[name.replace("base_model.model.", "", 1).replace(".base_layer", "")] = weight
    for name, module in reference_base.named_modules():
        if name in dequantized:
            module.weight.data.copy_(dequantized[name])
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                        bias="none", task_type="CAUSAL_LM")
    reference = get_peft_model(reference_base, config)
    lora_state = {n: p.detach() for n, p in quantized.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_" in name:
                param.copy_(lora_state[name])
    reference.train()
    reference(input_ids=ids, labels=ids).loss.backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if "lora_" in n}

    assert set(got) == set(expected) and len(got) == 2 * 3 * 2  # A and B, 3 modules, 2 layers
    for name in expected:
        error = (got[name] - expected[name]).norm() / expected[name].norm()
        assert error < 1e-3, f"{name}: relative gradient error {error:.3g}"
