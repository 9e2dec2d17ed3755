"""Training variants only the benches compare (outside every stage's cache key)."""


def prepare_quantized(base, upcast: bool, gradient_checkpointing: bool = False):
    """Ready a 4-bit base for LoRA training: peft's prepare_model_for_kbit_training (fp32
    upcast of the non-quantized weights) when `upcast`, else only input grads (Grove's default)."""
    if upcast:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing)
    base.enable_input_require_grads()
    return base


def uncompile_layers(model) -> None:
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
