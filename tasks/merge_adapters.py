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
    merged.save_pretrained(out)
    load_tokenizer(folder, model.trust_remote_code).save_pretrained(out)
    return {"parameters": sum(p.numel() for p in merged.parameters()), "size_bytes": folder_bytes(out)}
