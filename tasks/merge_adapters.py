"""Stage 5, merge_adapters: fold the LoRA adapter into the base weights and save safetensors.

Always merges into the full-precision base (for QLoRA too, as Olive does): merging into
4-bit weights would bake quantization error into the model the builder then quantizes again.
"""

from __future__ import annotations

from grove.models import load_causal_lm, load_tokenizer, model_folder
from grove.settings import ModelSettings
from grove.stage import ArtifactRef, grove_stage, open_artifact, output_dir
from grove.store import folder_bytes


@grove_stage("merge_adapters")
def merge_adapters(model: ModelSettings, adapter: ArtifactRef) -> dict:
    """Stores the merged model as an HF folder (config, safetensors, tokenizer)."""
    from peft import PeftModel

    folder = model_folder(model)
    base = load_causal_lm(folder, "cpu", model.trust_remote_code)
    merged = PeftModel.from_pretrained(base, open_artifact(adapter) / "adapter").merge_and_unload()
    out = output_dir()
    tokenizer = load_tokenizer(folder, model.trust_remote_code)  # its eos is what training taught the model
    stop_at_eos(merged.generation_config, tokenizer)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"parameters": sum(p.numel() for p in merged.parameters()), "size_bytes": folder_bytes(out)}


def stop_at_eos(generation, tokenizer) -> None:
    """`generate` on the merged folder stops at the eos training appended to every answer (the
    tokenizer's, made to agree with config.json by load_tokenizer) and pads with the tokenizer's pad."""
    eos = generation.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.insert(0, tokenizer.eos_token_id)
    generation.eos_token_id = eos[0] if len(eos) == 1 else eos or None
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    if generation.bos_token_id is None:
        generation.bos_token_id = tokenizer.bos_token_id
