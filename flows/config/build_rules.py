"""The ONNX builder's quantization rules: a ModelBuilder pass's options (or a search candidate's)
checked into a typed `BuildSettings`.

onnxruntime-genai's model builder takes its choices as flat KEY=VALUE strings and rejects
few bad ones: some it ignores silently, some build a model that does not load. Grove
parses them into a typed `BuildSettings` and checks every value and combination here,
before any work, so a mistake is a one-line error naming the config key, never a
wasted build. Rules seen with onnxruntime-genai 0.18.0 on CPU (tests/test_quantization.py
builds each one and inspects the graph):

- `int4_algo_config`-style names (the builder's help calls them deprecated aliases) are
  ignored by the installed builder: a k_quant request would silently build the default.
- `matmul_mixed_precision=last_matmul:int8` with the default algorithm on a model that
  ties its embeddings (SmolLM2) builds a model that does not load (the shared 8-bit
  embedding refers to a weight the default quantizer names differently); rtn, k_quant or
  shared_embeddings=false build loadable ones. So does asymmetric int4 (is_symmetric=false,
  uint4 with zero points) with the default algorithm: its shared uint8 embedding meets a float
  Reshape ("Type (tensor(uint8)) ... does not match expected type (tensor(float))").
- int8 precision never quantizes the embedding Gather (GatherBlockQuantized is 4-bit only).
- `linear_attn` selects nothing on a model without linear attention.

`hqq` and `gptq` are Grove's own algorithm choices: an fp32 build quantized afterwards with
onnxruntime's MatMulNBitsQuantizer (HQQ: data-free; GPTQ: calibrated on training rows),
since the builder offers neither (tasks/build_onnx/quantization.py runs them).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from flows.config.errors import did_you_mean
from grove.settings import BuildSettings
from tasks.build_onnx.quantization import POST_BUILD

BLOCK_SIZES = (16, 32, 64, 128, 256)
ALGOS = ("default", "rtn", "k_quant", "hqq", "gptq")
# ModelBuilder pass keys (Olive 0.13) that are builder extra_options under the same name.
LIFTED = ("enable_cuda_graph", "use_cuda_bf16", "use_qdq", "include_hidden_states", "use_8bits_moe")
# The builder's compound names: base method + mixed precision.
ALGO_ALIASES = {
    "rtn_last": ("rtn", {"last_matmul": "int8"}),
    "k_quant_last": ("k_quant", {"last_matmul": "int8"}),
    "k_quant_mixed": ("k_quant", {"last_matmul": "int8", "mixed_layers": "int8"}),
    "k_quant_linear": ("k_quant", {"last_matmul": "int8", "linear_attn": "int8"}),
}
SELECTORS = ("last_matmul", "mixed_layers", "linear_attn")
QUANT_TYPES = ("int4", "int8")
# Typed fields of BuildSettings, as the builder spells them inside extra_options.
TYPED = {"block_size": "block_size", "accuracy_level": "accuracy_level", "is_symmetric": "is_symmetric",
         "algo_config": "algo", "matmul_mixed_precision": "mixed_precision", "nodes_to_exclude": "nodes_to_exclude",
         "op_types_to_quantize": "op_types_to_quantize", "shared_embeddings": "shared_embeddings"}
# Builder options Grove cannot accept: it sets them itself, or the model they build cannot be
# evaluated from token ids to logits, which is what every Grove model must do.
GROVE_SET = {"hf_token": "Grove never reaches for a model hub", "hf_remote": "set by trust_remote_code",
             "filename": "Grove loads model.onnx", "config_only": "Grove builds the whole model",
             "adapter_path": "Grove merges the adapter before building (MergeAdapterWeights)",
             "num_hidden_layers": "it drops layers (a builder test option)"}
NOT_EVALUABLE = {"exclude_embeds": "the model would take embeddings instead of token ids",
                 "exclude_lm_head": "the model would return hidden states instead of logits",
                 "use_paged_attention": "paged attention needs onnxruntime-genai's engine, not a generator",
                 "dflash2_path": "block drafters need paged attention", "dspark_path": "block drafters need paged attention"}
CUDA_ONLY = ("enable_cuda_graph", "use_cuda_bf16", "matmulnbits_weights_prepacked", "qmoe_weights_prepacked",
             "enable_cuda_fpa_intb_gemm")
OTHER_EP = ("enable_dml_graph", "enable_webgpu_graph", "use_webgpu_fp32")
BOOLS = ("prune_lm_head", "include_hidden_states", "fuse_qkv", "fuse_qk_norm_gqa", "fuse_mlp_gate_up",
         "use_qdq", "use_device_allocator_for_initializers", "windowed_kv_cache", "exclude_mtp",
         "enable_cuda_graph", "use_cuda_bf16", "enable_cuda_fpa_intb_gemm", "disable_qkv_fusion")


class QuantOptionError(ValueError):
    """A bad quantization choice; `path` is relative to the ModelBuilder pass (or candidate)."""

    def __init__(self, path: str, message: str):
        self.path, self.message = path, message
        super().__init__(f"{path}: {message}")


@lru_cache(maxsize=1)
def builder_option_names() -> frozenset[str]:
    """The extra_options names the installed builder documents, read from its source (importing
    it loads torch and transformers; validation must stay fast)."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime_genai")
    source = Path(spec.submodule_search_locations[0]) / "models" / "builder.py"
    names = set(re.findall(r"^ {16}(\w+) = ", source.read_text(), re.M)) - {"value"}
    if not names:
        raise RuntimeError(f"no extra_options found in {source}; the builder changed shape")
    return frozenset(names)


# ---- config -> BuildSettings ------------------------------------------------------------------
def parse_build(spec: dict[str, Any], explicit: set[str], provider: str, model_config: dict | None) -> BuildSettings:
    """A ModelBuilder pass (or search candidate) config -> checked BuildSettings.

    `spec` holds the Olive keys (precision, int4_block_size, int4_accuracy_level,
    int4_is_symmetric, int4_op_types_to_quantize) and extra_options; `explicit` names the
    Olive keys the user wrote; `model_config` is the model's config.json (None: unknown).
    """
    fields: dict[str, Any] = {"precision": spec.get("precision", "int4"), "execution_provider": provider}
    origin: dict[str, str] = {"precision": "precision"}
    olive = {"int4_block_size": "block_size", "int4_accuracy_level": "accuracy_level",
             "int4_is_symmetric": "is_symmetric", "int4_op_types_to_quantize": "op_types_to_quantize"}
    for key, field in olive.items():
        if key in explicit and spec.get(key) is not None:
            fields[field], origin[field] = spec[key], key
    for key, builder_key in (("int4_nodes_to_exclude", "nodes_to_exclude"), ("int4_algo_config", "algo_config")):
        if key in explicit and spec.get(key) is not None:
            fields[TYPED[builder_key]], origin[TYPED[builder_key]] = _typed(builder_key, spec[key], key), key
    extra: dict[str, str] = {}
    names = builder_option_names()
    # builder options Olive 0.13 lifts to pass keys, then extra_options (each path as the user wrote it)
    options = [(key, key, spec[key]) for key in LIFTED if key in explicit and spec.get(key) is not None]
    options += [(f"extra_options.{key}", key, value) for key, value in (spec.get("extra_options") or {}).items()]
    for path, key, value in options:
        if any(key == k for _, k, _ in options[: options.index((path, key, value))]):
            raise QuantOptionError(path, f"is also given as the pass key {key}; give one of them")
        if key.startswith("int4_") and key.removeprefix("int4_") in names:
            raise QuantOptionError(path, f"the installed builder ignores this deprecated name (it would build the "
                                         f"default); write {key.removeprefix('int4_')!r}")
        if key in GROVE_SET:
            raise QuantOptionError(path, f"is set by Grove ({GROVE_SET[key]}); remove it")
        if key in NOT_EVALUABLE:
            raise QuantOptionError(path, f"is not supported: {NOT_EVALUABLE[key]}")
        if key not in names:
            hint = did_you_mean(key, names)
            raise QuantOptionError(path, f"unknown builder option{hint}; the installed onnxruntime-genai builder "
                                         f"documents {len(names)} (see README: quantization options)")
        if key in TYPED:
            field = TYPED[key]
            if field in origin:
                raise QuantOptionError(path, f"conflicts with {origin[field]}; give one of them")
            fields[field], origin[field] = _typed(key, value, path), path
            continue
        if key in CUDA_ONLY and provider != "cuda":
            raise QuantOptionError(path, "applies to the CUDA execution provider only; this build is for CPU")
        if key in OTHER_EP:
            raise QuantOptionError(path, f"applies to DirectML/WebGPU; Grove builds for {provider}")
        if key in BOOLS:
            value = _bool(value, path)
        extra[key] = str(value).lower() if isinstance(value, bool) else str(value)
    if isinstance(fields.get("algo"), tuple):  # a compound alias: base method + mixed precision
        fields["algo"], implied = fields["algo"]
        fields["mixed_precision"] = {**implied, **fields.get("mixed_precision", {})}
        origin.setdefault("mixed_precision", origin["algo"])
    build = BuildSettings(**fields, extra_options=extra)
    check_build(build, origin, model_config)
    return build


def _typed(key: str, value: Any, path: str) -> Any:
    if key == "block_size":
        size = _int(value, path)
        if size not in BLOCK_SIZES:
            raise QuantOptionError(path, f"must be one of {list(BLOCK_SIZES)} (got {value!r})")
        return size
    if key == "accuracy_level":
        level = _int(value, path)
        if level not in range(5):
            raise QuantOptionError(path, f"must be 0-4: 1 fp32, 2 fp16, 3 bf16, 4 int8 compute (got {value!r})")
        return level
    if key in ("is_symmetric", "shared_embeddings"):
        return _bool(value, path)
    if key == "algo_config":
        if value in ALGO_ALIASES:
            return ALGO_ALIASES[value]
        if value not in ALGOS:
            raise QuantOptionError(path, f"must be one of {list(ALGOS) + list(ALGO_ALIASES)} (got {value!r})")
        return value
    if key == "matmul_mixed_precision":
        return _mixed(value, path)
    if key == "nodes_to_exclude":
        nodes = value.split(",") if isinstance(value, str) else value
        if not isinstance(nodes, list) or not all(isinstance(n, str) and n.strip() for n in nodes):
            raise QuantOptionError(path, "must be a list of node names (or one comma-separated string)")
        nodes = [n.strip() for n in nodes]
        for node in nodes:
            if not node.startswith("/"):
                raise QuantOptionError(path, f"{node!r} is not a builder node name; they look like "
                                             f"/lm_head/MatMul or /model/layers.0/mlp/down_proj/MatMul")
        return nodes
    if key == "op_types_to_quantize":
        ops = value.split("/") if isinstance(value, str) else value
        if not isinstance(ops, list) or not ops or any(o not in ("MatMul", "Gather") for o in ops):
            raise QuantOptionError(path, f"must list MatMul and/or Gather (got {value!r})")
        return ops
    raise AssertionError(key)


def _mixed(value: Any, path: str) -> dict[str, str]:
    if isinstance(value, str):
        pairs = []
        for entry in filter(None, (e.strip() for e in value.split(","))):
            if ":" not in entry:
                raise QuantOptionError(path, f"entries are selector:type, e.g. last_matmul:int8 (got {entry!r})")
            pairs.append(tuple(p.strip() for p in entry.split(":", 1)))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise QuantOptionError(path, "must be 'selector:type,...' or a mapping of selector to type")
    for selector, kind in pairs:
        if selector not in SELECTORS:
            hint = did_you_mean(selector, SELECTORS)
            raise QuantOptionError(path, f"unknown selector {selector!r}{hint}; selectors: {', '.join(SELECTORS)}")
        if kind not in QUANT_TYPES:
            raise QuantOptionError(path, f"{selector}: type must be int4 or int8 (got {kind!r})")
    return dict(pairs)


def _int(value: Any, path: str) -> int:
    if isinstance(value, bool):
        raise QuantOptionError(path, f"must be a whole number (got {value!r})")
    try:
        return int(str(value))
    except ValueError:
        raise QuantOptionError(path, f"must be a whole number (got {value!r})") from None


def _bool(value: Any, path: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value) in ("true", "True", "1"):
        return True
    if str(value) in ("false", "False", "0"):
        return False
    raise QuantOptionError(path, f"must be true or false (got {value!r})")


# ---- combinations -----------------------------------------------------------------------------
def ties_embeddings(model_config: dict | None) -> bool | None:
    """Whether the model shares its input embedding with the LM head (None: unknown)."""
    if model_config is None:
        return None
    return bool(model_config.get("tie_word_embeddings", False))


def check_build(build: BuildSettings, origin: dict[str, str], model_config: dict | None) -> None:
    """Combinations the builder rejects late, ignores silently, or builds into a model that does not load."""
    quantized = build.precision in ("int4", "int8")
    if not quantized:
        for field in ("block_size", "accuracy_level", "is_symmetric", "algo", "mixed_precision", "nodes_to_exclude",
                      "op_types_to_quantize"):
            if field in origin:
                raise QuantOptionError(origin[field], f"applies to int4/int8 weights only; precision is "
                                                      f"{build.precision}")
    tied = ties_embeddings(model_config)
    lm_head = build.mixed_precision.get("last_matmul")
    if build.shared_embeddings and tied is False:
        raise QuantOptionError(origin["shared_embeddings"], "this model does not tie its embeddings "
                                                            "(tie_word_embeddings is false): sharing them would "
                                                            "export a broken model")
    if build.algo in POST_BUILD:
        algo = build.algo
        if build.precision != "int4":
            raise QuantOptionError(origin["algo"], f"{algo} quantizes to int4: set precision int4")
        if build.mixed_precision:
            raise QuantOptionError(origin["mixed_precision"], f"{algo} quantizes every MatMul to int4; mixed "
                                                              f"precision is a builder algorithm option "
                                                              f"(default/rtn/k_quant); keep layers unquantized "
                                                              f"with nodes_to_exclude")
        if algo == "hqq" and "is_symmetric" in origin and build.is_symmetric:
            raise QuantOptionError(origin["is_symmetric"], "hqq is asymmetric (zero points); remove it")
        if algo == "gptq" and "Gather" in (build.op_types_to_quantize or []):
            raise QuantOptionError(origin["op_types_to_quantize"], "gptq quantizes MatMul weights only")
    if build.precision == "int8" and "Gather" in (build.op_types_to_quantize or []):
        raise QuantOptionError(origin["op_types_to_quantize"], "int8 precision never quantizes the embedding Gather "
                                                               "(GatherBlockQuantized is 4-bit only): the builder "
                                                               "would ignore it; remove Gather")
    if "linear_attn" in build.mixed_precision and model_config is not None and not _has_linear_attention(model_config):
        raise QuantOptionError(origin["mixed_precision"], f"linear_attn selects nothing on "
                                                          f"{_architecture(model_config)} (no linear-attention "
                                                          f"layers); use last_matmul or mixed_layers")
    if (build.precision == "int4" and lm_head == "int8" and build.algo == "default" and tied
            and build.shared_embeddings is not False):
        raise QuantOptionError(origin["mixed_precision"], "an int8 LM head with the default algorithm on a model "
                                                          "that ties its embeddings builds a model that does not "
                                                          "load; add extra_options.shared_embeddings: false (the "
                                                          "embedding gets its own copy) or use algo_config rtn or "
                                                          "k_quant")
    if (build.precision == "int4" and not build.is_symmetric and build.algo == "default" and tied
            and build.shared_embeddings is not False):
        raise QuantOptionError(origin["is_symmetric"], "asymmetric int4 with the default algorithm on a model that "
                                                       "ties its embeddings builds a model that does not load; add "
                                                       "extra_options.algo_config: rtn (or k_quant), or "
                                                       "extra_options.shared_embeddings: false")


def _architecture(model_config: dict) -> str:
    return (model_config.get("architectures") or [model_config.get("model_type", "this model")])[0]


def _has_linear_attention(model_config: dict) -> bool:
    layer_types = model_config.get("layer_types") or model_config.get("text_config", {}).get("layer_types") or []
    return any("linear" in str(t) for t in layer_types)


