"""Grove's built-in candidate list for a quantization search (`"candidates": "builtin"`).

Kept apart from the stage's code on purpose: build_onnx's cache key covers that code, while a
change to this list changes only the candidates' settings (part of each candidate's key
anyway), so editing the list rebuilds only new variants.
"""

from __future__ import annotations

from typing import Any

from flows.config.build_rules import check_build, ties_embeddings
from grove.settings import BuildSettings


def builtin_candidates(precision_default: BuildSettings, model_config: dict | None) -> list[tuple[str, BuildSettings]]:
    """int4 variants from small to large, int8 as the accurate fallback (and fp16 on CUDA). hqq and gptq are not
    in it: on the bundled SmolLM2 here, hqq scored 0.008 and gptq did not finish in 20 minutes
    (README: Quantization: options and search; measured in bench/README.md).

    An int8 LM head on a tied-embedding model gets shared_embeddings=false only where the
    default algorithm needs it (see check_build)."""
    base = {"execution_provider": precision_default.execution_provider,
            "extra_options": precision_default.extra_options}
    tied = bool(ties_embeddings(model_config))
    variants: list[tuple[str, dict[str, Any]]] = [
        ("int4-b32", {}),
        ("int4-b32-acc1", {"accuracy_level": 1}),
        ("int4-b16", {"block_size": 16}),
        ("int4-kquant-b32", {"algo": "k_quant"}),
        ("int4-kquant-b16", {"algo": "k_quant", "block_size": 16}),
        ("int4-kquant-int8-head", {"algo": "k_quant", "mixed_precision": {"last_matmul": "int8"}}),
        ("int4-kquant-mixed", {"algo": "k_quant", "mixed_precision": {"last_matmul": "int8", "mixed_layers": "int8"}}),
        ("int4-kquant-b16-mixed", {"algo": "k_quant", "block_size": 16,
                                   "mixed_precision": {"last_matmul": "int8", "mixed_layers": "int8"}}),
        # rtn with zero points (uint4): builds in ~5 s where k_quant takes 40-75 s, and kept the
        # bundled fine-tune's accuracy best (bench/README.md: The quantization search)
        ("int4-rtn-asym-mixed", {"algo": "rtn", "is_symmetric": False,
                                 "mixed_precision": {"last_matmul": "int8", "mixed_layers": "int8"}}),
        ("int4-rtn-asym-b16-mixed", {"algo": "rtn", "is_symmetric": False, "block_size": 16,
                                     "mixed_precision": {"last_matmul": "int8", "mixed_layers": "int8"}}),
        ("int4-kquant-fp32-head", {"algo": "k_quant", "nodes_to_exclude": ["/lm_head/MatMul"]}),
        ("int8", {"precision": "int8"}),
    ]
    if precision_default.execution_provider == "cuda":  # CUDA runs fp16 weights natively: the last resort
        variants.append(("fp16", {"precision": "fp16"}))
    if tied:  # unshared: the embedding keeps a 4-bit copy of its own, the head gets 8 bits
        variants.append(("int4-kquant-mixed-unshared", {"algo": "k_quant", "shared_embeddings": False,
                                                        "op_types_to_quantize": ["MatMul", "Gather"],
                                                        "mixed_precision": {"last_matmul": "int8",
                                                                            "mixed_layers": "int8"}}))
    result = []
    for name, fields in variants:
        build = BuildSettings(**{**base, **fields})
        check_build(build, {k: k for k in fields}, model_config)
        result.append((name, build))
    return result


# The default search (no grove.quantization_search in the config, a plain CPU int4 build): built in
# this order, stopping at the first within tolerance. First an rtn build (seconds, where k_quant
# takes a minute) with zero points, block 16, an int8 LM head and int8 sensitive layers: it kept
# the bundled fine-tune's accuracy exactly at 25% of the fp32 size, where the same at block 32
# (21.5%, faster decode) lost 2.5 points and k_quant at block 16 lost 1.7; then int8, the
# accurate fallback (bench/README.md: The default run).
LADDER = ("int4-rtn-asym-b16-mixed", "int8")


# The default search of a plain CUDA int4 build, scored as served on CUDA. The builder's default int4
# (symmetric, its default rounding, a 4-bit LM head shared with the embedding) lost 10 points on the
# bundled fine-tune there, with exactly the answers the same weights gave on the CPU: fp16 io, the
# CUDA kernels, CUDA graphs and the accuracy level changed nothing (bench/results/h200/precision_probe.json).
# rtn with zero points, an int8 head and int8 sensitive layers at block 32 kept the PyTorch model's
# accuracy there (0.883 vs 0.858, 102.6 MB, 20% of fp32) and at block 16 lost 3.3 points; then int8
# (0.858, 195 MB) and fp16 (0.858, 261 MB).
CUDA_LADDER = ("int4-rtn-asym-mixed", "int4-rtn-asym-b16-mixed", "int8", "fp16")


def ladder_names(execution_provider: str) -> tuple[str, ...]:
    return CUDA_LADDER if execution_provider == "cuda" else LADDER


def ladder_candidates(precision_default: BuildSettings, model_config: dict | None) -> list[tuple[str, BuildSettings]]:
    by_name = dict(builtin_candidates(precision_default, model_config))
    return [(name, by_name[name]) for name in ladder_names(precision_default.execution_provider)]
