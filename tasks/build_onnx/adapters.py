"""An int4 base with LoRA slots, and peft adapters turned into onnxruntime's adapter format.

onnxruntime-genai serves many LoRA adapters on one model: `og.Adapters(model).load(file, name)`
then `generator.set_active_adapter(adapters, name)`. The adapter file (`.onnx_adapter`, written by
`onnxruntime.AdapterFormat`) is a set of named tensors; each name must be a graph input of the model,
else the runtime refuses it ("Invalid input name: model.layers.12.self_attn.v_proj.lora_A.weight").

The builder has no such base: with `adapter_path` it bakes one adapter in as quantized constants.
So the base is built from a rank-1 stub adapter on every slot module, with the LoRA MatMuls kept
out of quantization, and then each LoRA weight becomes an optional graph input named as peft names
it (`model.layers.0.self_attn.q_proj.lora_A.weight`, the names Olive's adapters use too), with an
empty default (rank 0): with no adapter active the LoRA branch adds zeros, and every adapter of any
rank on any subset of the slots fits the same base. The base therefore depends on the base model and
the build options only, never on a fine-tune.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# Linear layers that get a LoRA slot in the base; the llama-family names the builder keeps unpacked
# when LoRA is present (it splits packed ones such as phi3's qkv_proj by itself, which an adapter
# file cannot follow).
SLOT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# peft's saved names: base_model.model.<module>.lora_A.weight
PEFT_PREFIX = "base_model.model."
SLOTS_FILE = "lora_slots.json"
ADAPTER_SUFFIX = ".onnx_adapter"
_SLOT = re.compile(r"^model\.layers\.(\d+)\.(\w+)\.(\w+)$")
# The builder's block names for the HF ones (its initializers read model.layers.N.attn.q_proj...).
_BUILDER_BLOCK = {"self_attn": "attn", "mlp": "mlp"}


class AdapterRefused(ValueError):
    """An adapter that cannot be served on this base; the message says why and the fix."""


@dataclass(frozen=True)
class Slot:
    module: str  # HF module name, e.g. model.layers.0.self_attn.q_proj
    in_features: int
    out_features: int

    def builder_node(self, part: str) -> str:
        layer, block, leaf = _SLOT.match(self.module).groups()
        return f"/model/layers.{layer}/{_BUILDER_BLOCK[block]}/{leaf}/{part}/MatMul"

    def builder_weight(self, part: str) -> str:
        layer, block, leaf = _SLOT.match(self.module).groups()
        return f"model.layers.{layer}.{_BUILDER_BLOCK[block]}.{leaf}.{part}.MatMul.weight"


def model_slots(source: Path) -> list[Slot]:
    """The slot modules of an HF checkpoint, read from the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    slots = []
    for file in sorted(Path(source).glob("*.safetensors")):
        with safe_open(str(file), "pt") as weights:
            for name in weights.keys():
                module = name.removesuffix(".weight")
                match = _SLOT.match(module)
                if not name.endswith(".weight") or not match or match.group(3) not in SLOT_MODULES \
                        or match.group(2) not in _BUILDER_BLOCK:
                    continue
                out_features, in_features = weights.get_slice(name).get_shape()
                slots.append(Slot(module, in_features, out_features))
    if not slots:
        raise AdapterRefused(f"{source}: no linear layer the builder can give a LoRA slot "
                             f"({', '.join(SLOT_MODULES)} under model.layers.N.self_attn/mlp); "
                             f"fix: grove.ship: merged")
    return sorted(slots, key=lambda s: (int(_SLOT.match(s.module).group(1)), s.module))


def write_stub_adapter(slots: list[Slot], folder: Path) -> None:
    """A rank-1 peft adapter on every slot: it makes the builder emit the LoRA subgraphs."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for slot in slots:
        tensors[f"{PEFT_PREFIX}{slot.module}.lora_A.weight"] = torch.zeros(1, slot.in_features)
        tensors[f"{PEFT_PREFIX}{slot.module}.lora_B.weight"] = torch.zeros(slot.out_features, 1)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    leaves = sorted({_SLOT.match(s.module).group(3) for s in slots})
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1, "lora_dropout": 0.0,
         "target_modules": leaves, "bias": "none", "base_model_name_or_path": None}))


def builder_slot_options(stub: Path, slots: list[Slot]) -> list[str]:
    """Extra builder options: the stub adapter, and its MatMuls kept in float (they become inputs)."""
    nodes = [slot.builder_node(part) for slot in slots for part in ("lora_A", "lora_B")]
    return [f"adapter_path={stub}", f"nodes_to_exclude={','.join(nodes)}"]


def input_name(module: str, part: str) -> str:
    return f"{module}.{part}.weight"


def open_slots(model_dir: Path, slots: list[Slot]) -> None:
    """Turns each LoRA weight of the built model into an optional input (empty default: rank 0)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path = model_dir / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)  # the stub's bytes stay unreferenced
    graph = model.graph
    by_name = {init.name: index for index, init in enumerate(graph.initializer)}
    # The LoRA tensors take the model's float io dtype (fp32 on CPU, fp16 on CUDA), as the KV cache does.
    io_type = next((i.type.tensor_type.elem_type for i in graph.input if i.name.startswith("past_key_values")),
                   TensorProto.FLOAT)
    renames, drop, inputs, defaults = {}, set(), [], []
    for number, slot in enumerate(slots):
        # each slot its own rank symbol: one shared symbol tells onnxruntime every slot has the
        # same rank, and its memory planner then reuses one slot's buffer for another's output,
        # which fails for an adapter on some layers only (rank 0 elsewhere: lora_top_layers)
        rank = f"lora_r_{number}"
        for part, shape in (("lora_A", [slot.in_features, 0]), ("lora_B", [0, slot.out_features])):
            old = slot.builder_weight(part)
            if old not in by_name:
                raise RuntimeError(f"the builder did not emit {old} for {slot.module}; it cannot take a LoRA "
                                   f"slot there (fix: grove.ship: merged)")
            new = input_name(slot.module, part)
            renames[old] = new
            drop.add(by_name[old])
            dims = [slot.in_features, rank] if part == "lora_A" else [rank, slot.out_features]
            inputs.append(helper.make_tensor_value_info(new, io_type, dims))
            default = numpy_helper.from_array(np.zeros(shape, dtype=helper.tensor_dtype_to_np_dtype(io_type)), new)
            defaults.append(default)
    kept = [init for index, init in enumerate(graph.initializer) if index not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept + defaults)
    # The rtn/k_quant quantizers run shape inference, which records the stub's rank-1 shapes for
    # every tensor on a LoRA path; onnxruntime plans buffer reuse from them and then fails on an
    # adapter of another rank ("Shape mismatch attempting to re-use buffer"). Those shapes depend
    # on the adapter: drop them.
    shaped = [info for info in graph.value_info if "lora" not in info.name]
    del graph.value_info[:]
    graph.value_info.extend(shaped)
    graph.input.extend(inputs)
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in renames:
                node.input[index] = renames[name]
    onnx.save(model, str(path))
    (model_dir / SLOTS_FILE).write_text(json.dumps(
        {"io_dtype": helper.tensor_dtype_to_np_dtype(io_type).name,
         "slots": {s.module: [s.in_features, s.out_features] for s in slots}}, indent=1))


def read_slots(model_dir: Path) -> dict:
    file = Path(model_dir) / SLOTS_FILE
    if not file.is_file():
        raise AdapterRefused(f"{model_dir} has no LoRA slots ({SLOTS_FILE} missing): it is a merged model, "
                             f"not a base for adapters; fix: build it with grove.ship: adapter")
    return json.loads(file.read_text())


def adapter_tensors(peft_dir: Path) -> tuple[dict, dict]:
    """(adapter_config, {module: (A [r, in], B [out, r] * scaling)}) of a saved peft LoRA adapter."""
    from safetensors.torch import load_file

    config = json.loads((peft_dir / "adapter_config.json").read_text())
    weights = load_file(str(peft_dir / "adapter_model.safetensors"))
    pairs: dict[str, dict] = {}
    for name, tensor in weights.items():
        match = re.match(rf"^{re.escape(PEFT_PREFIX)}(.+)\.(lora_A|lora_B)(?:\.default)?\.weight$", name)
        if match:
            pairs.setdefault(match.group(1), {})[match.group(2)] = tensor.float()
    result = {}
    for module, pair in pairs.items():
        leaf = module.rsplit(".", 1)[-1]
        rank = pair["lora_A"].shape[0]
        alpha = (config.get("alpha_pattern") or {}).get(leaf, config.get("lora_alpha", 8))
        rank = (config.get("rank_pattern") or {}).get(leaf, rank)
        scaling = alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
        result[module] = (pair["lora_A"], pair["lora_B"] * scaling)
    return config, result


def export_adapter(peft_dir: Path, base_dir: Path, target: Path) -> dict:
    """Writes the peft adapter in `peft_dir` as an onnxruntime adapter file for the base in `base_dir`."""
    import numpy as np
    import onnxruntime as ort

    config, tensors = adapter_tensors(peft_dir)
    check_fits(config, tensors, base_dir)
    dtype = np.dtype(read_slots(base_dir)["io_dtype"])
    params = {}
    for module, (lora_a, lora_b) in tensors.items():
        # MatMul weights are [in, out]: the transposes of torch's Linear weights.
        for part, tensor in (("lora_A", lora_a.T), ("lora_B", lora_b.T)):
            params[input_name(module, part)] = ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(tensor.numpy().astype(dtype)))
    adapter = ort.AdapterFormat()
    adapter.set_parameters(params)
    target.parent.mkdir(parents=True, exist_ok=True)
    adapter.export_adapter(str(target))
    ranks = sorted({int(a.shape[0]) for a, _ in tensors.values()})
    return {"file": target.name, "size_bytes": target.stat().st_size, "modules": len(tensors),
            "ranks": ranks, "target_modules": sorted({m.rsplit(".", 1)[-1] for m in tensors})}


def check_fits(config: dict, tensors: dict, base_dir: Path) -> None:
    """Refuses an adapter whose layers the base has no slot for, or whose shapes differ."""
    if config.get("use_dora"):
        raise AdapterRefused("the adapter is DoRA (use_dora); onnxruntime-genai adapters are plain LoRA; "
                             "fix: grove.ship: merged")
    slots = read_slots(base_dir)["slots"]
    missing = sorted({m.rsplit(".", 1)[-1] for m in tensors if m not in slots})
    if missing:
        raise AdapterRefused(f"the adapter trains {', '.join(missing)}, which the base has no LoRA slot for "
                             f"(slots: {', '.join(SLOT_MODULES)}); fix: target_modules within those, "
                             f"or grove.ship: merged")
    for module, (lora_a, lora_b) in tensors.items():
        in_features, out_features = slots[module]
        if lora_a.shape[1] != in_features or lora_b.shape[0] != out_features:
            raise AdapterRefused(f"{module}: the adapter is {lora_a.shape[1]}->{lora_b.shape[0]}, the base "
                                 f"{in_features}->{out_features}: it was trained on another model")


def check_target_modules(target_modules: list[str] | str | None, where: str) -> None:
    """Config-time refusal: LoRA targets the base build cannot give a slot."""
    if target_modules is None or isinstance(target_modules, str):  # "all-linear" and the like
        targets = [target_modules] if target_modules else []
    else:
        targets = list(target_modules)
    bad = [t for t in targets if t.rsplit(".", 1)[-1] not in SLOT_MODULES]
    if bad:
        raise AdapterRefused(f"{where}: grove.ship: adapter cannot serve LoRA on {', '.join(map(str, bad))}: "
                             f"the int4 base has LoRA slots only on {', '.join(SLOT_MODULES)}; fix: set "
                             f"target_modules to those, or grove.ship: merged")


def build_base(source: Path, target: Path, build, trust_remote_code: bool) -> str:
    """Builds the base with LoRA slots on every slot module of `source`; returns the builder's log."""
    import tempfile

    from tasks.build_onnx.builder import run_builder

    slots = model_slots(source)
    with tempfile.TemporaryDirectory(prefix="grove-lora-stub-") as stub:
        write_stub_adapter(slots, Path(stub))
        printed = run_builder(source, target, build, trust_remote_code, extra=builder_slot_options(Path(stub), slots))
    open_slots(target, slots)
    return printed
