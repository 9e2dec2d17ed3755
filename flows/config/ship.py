"""grove.ship: adapter: what the config must say for the base + adapter path, checked before any work.

Each refusal names the config key and the fix; the base build and the adapter export repeat the
shape checks (tasks/build_onnx/adapters.py), since an adapter can also come from outside a run.
"""

from __future__ import annotations

from grove.settings import BuildSettings, SearchSettings, TrainSettings
from tasks.build_onnx.adapters import AdapterRefused, check_target_modules


def check_adapter_ship(train: TrainSettings | None, lora_where: str | None, build: BuildSettings | None,
                       build_where: str | None, search: SearchSettings | None, error) -> None:
    """Raises error(path, message) (the config's ConfigError) for a run that cannot ship an adapter."""
    where = "grove.ship"
    if train is None:
        raise error(where, "adapter needs a LoRA or QLoRA pass (there is no adapter to ship); "
                           "fix: add one, or grove.ship: merged")
    if build is None:
        raise error(where, "adapter needs a ModelBuilder pass (the base it runs on); fix: add one")
    try:
        check_target_modules(train.target_modules, f"{lora_where}.target_modules")
    except AdapterRefused as exc:
        raise error(f"{lora_where}.target_modules", str(exc).split(": ", 1)[1]) from None
    # every base the run may serve the adapter on: the pass's build, or each candidate of the search
    bases = [(c.build, "grove.quantization_search.candidates", f"candidate {c.name}: ") for c in search.candidates] \
        if search else [(build, f"{build_where}.extra_options.algo_config", "")]
    for base, at, which in bases:
        if base.algo in ("hqq", "gptq"):
            raise error(at, f"{which}{base.algo} quantizes after the build, LoRA branches included; fix: with "
                            f"grove.ship: adapter use default, rtn or k_quant, or grove.ship: merged")
    quantized = sorted({base.precision for base, _, _ in bases} & {"int4", "int8"})
    if train.method == "qlora" and quantized:
        raise error(lora_where, f"a QLoRA adapter is trained against {train.quant_type} (bitsandbytes) weights; "
                                f"grove.ship: adapter would serve it on the builder's {' or '.join(quantized)} "
                                f"weights, rounded differently, so it would correct errors the base does not have; "
                                f"fix: grove.ship: merged (merged into the full-precision weights, then quantized "
                                f"and measured), or a LoRA pass, or ModelBuilder precision fp16/fp32")
