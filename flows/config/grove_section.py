"""Grove's own `grove` section of the run config (everything Olive has no key for)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from flows.config.errors import Strict
from grove.settings import MAX_KL, MAX_LOSS_INCREASE, PromotionSettings

PRECISIONS = Literal["int4", "int8", "fp16", "fp32", "bf16"]
BLOCK_SIZES = Literal[16, 32, 64, 128, 256]


class GroveCandidate(Strict):
    """One variant of a quantization search: the ModelBuilder keys it sets (the rest: defaults)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    precision: PRECISIONS = "int4"
    int4_block_size: BLOCK_SIZES = 32
    int4_accuracy_level: Literal[0, 1, 2, 3, 4] | None = None
    int4_is_symmetric: bool | None = None
    int4_op_types_to_quantize: list[Literal["MatMul", "Gather"]] | None = None
    extra_options: dict[str, Any] = Field(default_factory=dict)


class GroveSearch(Strict):
    enabled: bool = Field(True, description="false: no search, not even the default one (the build as written)")
    candidates: Literal["builtin", "ladder"] | list[GroveCandidate] = Field(
        "builtin", description="the variants to build, or 'builtin' for Grove's list, or 'ladder' for the "
                               "default search's short list")
    early_stop: bool | None = Field(None, description="stop at the first candidate within tolerance "
                                                      "(default: true for 'ladder', else false)")
    tolerance_metric: Literal["auto", "accuracy", "eval_loss", "kl"] = Field(
        "auto", description="what 'within tolerance' measures: accuracy (needs a label column), eval_loss or kl "
                            "(teacher-forced, any data); auto: accuracy with a label, else eval_loss")
    tolerance_points: float = Field(2.0, ge=0, le=100, description="accuracy points below the merged PyTorch model")
    max_loss_increase: float = Field(MAX_LOSS_INCREASE, ge=0, description="eval_loss: nats per labelled token "
                                                                          "above the merged PyTorch model's")
    max_kl: float = Field(MAX_KL, ge=0, description="kl: mean KL(merged || candidate) over the labelled tokens")


class GroveEval(Strict):
    max_new_tokens: int | None = Field(None, gt=0, description="tokens generated after each prompt; unset: 8 for "
                                                               "a label, and for answer: text the longest eval "
                                                               "answer's tokens and half again (at least 8 more, at "
                                                               "most 512 and half the model's context)")
    batch_size: int = Field(16, gt=0)
    max_rows: int | None = Field(None, gt=0, description="evaluate at most this many eval rows")
    answer: Literal["label", "text"] = Field(
        "label", description="what the template's trailing column holds: a label (accuracy, per label; the "
                             "ladder and the gate judge on it) or free text (no label: exact match and chrF "
                             "of greedy answers on generation_rows rows)")
    generation_rows: int = Field(16, gt=0, description="answer: text: eval rows answered greedily and scored, "
                                                       "per model (base, fine-tuned, ONNX)")
    lm_eval_tasks: list[str] = Field([], description="lm-evaluation-harness tasks run on the base, fine-tuned "
                                                     "and shipped ONNX models (needs lm-eval installed)")
    lm_eval_include: str | None = Field(None, description="a folder of lm-eval task YAML files and their data "
                                                          "(lm-eval's include_path); part of the keys")
    lm_eval_limit: int | None = Field(100, gt=0, description="at most this many documents per lm-eval task")


class GroveBenchmark(Strict):
    prompts: int = Field(3, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    warmup: int = Field(1, ge=0)
    repeats: int = Field(2, gt=0)


class GroveTrain(Strict):
    """Grove's QLoRA/LoRA training setup on CUDA (a CPU trains as before): measured on one H200,
    bench/gpu_train_throughput.py. Each is part of the train stage's cache key."""

    kernels: Literal["liger", "none"] = Field(
        "liger", description="liger: Liger kernels (fused RMSNorm/SwiGLU/RoPE, chunked linear+cross-entropy)")
    packing: bool = Field(True, description="line-by-line corpora: pack each batch's examples into rows "
                                            "without cross-example attention instead of padding")
    compile: bool = Field(False, description="torch.compile each decoder layer")
    processes: int | Literal["auto"] = Field(
        "auto", description="data-parallel training processes (torchrun + DDP); auto: one per GPU when "
                            "training on CUDA, else 1. Each process takes per_device_train_batch_size examples")
    nodes: int = Field(1, ge=1, strict=True, description="machines of one torchrun job (c10d rendezvous; "
                                                         "`processes` on each): tasks/train/nodes.py")


class GroveBuild(Strict):
    cuda_graph: bool = Field(True, description="CUDA builds: enable_cuda_graph in genai_config.json "
                                               "(unless the ModelBuilder's extra_options set it)")
    cuda_block_size: BLOCK_SIZES = Field(
        128, description="CUDA int4 builds whose ModelBuilder pass sets no block size, for models whose hidden "
                         "and intermediate sizes it divides (else the builder's 32)")


class GroveRetry(Strict):
    retries: int = Field(ge=0, le=20)
    delay_seconds: float = Field(10, ge=0)


class GrovePromotion(Strict):
    enabled: bool = Field(True, description="after benchmark, make the new model current if it passes the gate")
    model_name: str | None = Field(None, description="the name models are promoted under (default: grove.name)")
    metric: str = Field("onnx_accuracy", description="gate metric (PROMOTION_METRICS); unwritten, it fits the "
                                                     "config (flows/config/promotion.py default_metric): without "
                                                     "a ModelBuilder pass fine_tuned_accuracy, without a label "
                                                     "onnx_token_agreement or fine_tuned_chrf")
    min: float = Field(0.0, description="the new model's metric must be at least this")
    max_drop: float = Field(0.02, ge=0, description="and not more than this below the current model's")
    max_drop_from_fine_tuned: float = Field(
        PromotionSettings.model_fields["max_drop_from_fine_tuned"].default, ge=0,
        description="the shipped model's accuracy at most this below the model it was built from")
    min_gain_over_base: float = Field(
        PromotionSettings.model_fields["min_gain_over_base"].default,
        description="the shipped model's accuracy at least this above the base model's (with a fine-tune)")
    tolerance_metric: Literal["auto", "accuracy", "eval_loss", "kl"] = Field(
        "auto", description="which drop-from-fine-tuned rule applies: accuracy (max_drop_from_fine_tuned, "
                            "min_gain_over_base), eval_loss or kl; auto: accuracy with a label, else eval_loss")
    max_loss_increase_from_fine_tuned: float = Field(
        MAX_LOSS_INCREASE, ge=0, description="eval_loss: the shipped model's teacher-forced eval loss at most "
                                             "this above the model it was built from")
    max_kl_from_fine_tuned: float = Field(
        MAX_KL, ge=0, description="kl: mean KL(model it was built from || shipped model) at most this")


class GrovePlacement(Strict):
    """Which Prefect work pool runs each stage (flows/placement.py): adjacent stages on one pool run
    as one child flow run there. Not part of any key: placement never changes an artifact."""

    default: str = Field(min_length=1, description="the work pool of every stage not listed in `stages`")
    stages: dict[str, str] = Field({}, description="stage -> work pool, e.g. train: gpu")


class GroveSection(Strict):
    name: str | None = Field(None, min_length=1)  # "" would silently fall back to workflow_id or grove-model
    artifact_root: str | None = None
    aws_credentials_block: str | None = None
    retries: dict[str, GroveRetry] = {}
    device: Literal["auto", "cpu", "cuda"] = "auto"
    completion_only_loss: bool = False
    lora_top_layers: int | None = Field(None, gt=0)
    seed: int = 42
    checkpoint_steps: int = Field(25, ge=0, strict=True, description="training checkpoints every N steps; 0: none")
    evaluate: GroveEval = Field(default_factory=GroveEval)
    benchmark: GroveBenchmark = Field(default_factory=GroveBenchmark)
    train: GroveTrain = Field(default_factory=GroveTrain)
    build: GroveBuild = Field(default_factory=GroveBuild)
    promotion: GrovePromotion = Field(default_factory=GrovePromotion)
    # None: the ladder search when the ModelBuilder pass is a plain CPU int4 build
    quantization_search: GroveSearch | None = None
    placement: GrovePlacement | None = None
    ship: Literal["merged", "adapter"] = Field("merged", description="merged model, or int4 base + LoRA adapter")
