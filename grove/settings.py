"""Typed settings each stage receives: built once by flows/config/ from the run config.

Each stage's settings object is part of that stage's cache key, so it holds only what
changes the stage's output (no paths of the artifact store, no display options).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSettings(Frozen):
    """The base model: a local HF folder (the bundled model is converted to one)."""

    name: str  # what the user wrote: a folder, or grove:<bundled name>
    bundled: str | None = None  # the bundled model's name, when name is grove:<...>
    path: str | None = None  # local HF folder (None for a bundled model until converted)
    trust_remote_code: bool = False
    content_sha256: str  # of the weights/config files, or of the bundled GGUF
    # Olive's input_model adapter_path: a peft adapter folder the train stage starts from
    # (trained further) instead of a fresh LoRA; its digest keys every stage after it.
    adapter_path: str | None = None
    adapter_sha256: str | None = None


class DataSettings(Frozen):
    name: str
    files: list[str]
    format: Literal["json", "csv", "parquet"]
    split: str = "train"
    eval_files: list[str] | None = None
    eval_size: float = 0.3
    seed: int = 42
    text_cols: list[str]
    text_template: str
    label_col: str | None = None
    max_samples: int | None = None
    content_sha256: str  # contents of every data file: editing one byte changes every key


class CorpusSettings(Frozen):
    text_template: str
    text_cols: list[str]
    corpus_strategy: Literal["join", "join-random", "line-by-line"] = "join"
    source_max_len: int = 1024
    pad_to_max_len: bool = True
    completion_only_loss: bool = False
    label_col: str | None = None
    # Olive's pre-process add_special_tokens: bos/eos around each row (the Olive join recipe).
    add_special_tokens: bool = True
    # Olive's pre-process random_seed: join-random shuffles the rows with it before joining.
    random_seed: int = 42
    # An eval data config with its own pre-processing: its template renders the eval rows
    # (None: the train template).
    eval_text_template: str | None = None
    eval_label_col: str | None = None


# TrainingArguments a CPU cannot honour: the Trainer refuses fp16 there, and bf16 autocast and
# tf32 have no effect the run would want. Config checks warn about them where the training
# machine is known; the train stage turns them off (a placed stage learns its machine only there).
CPU_OFF_FLAGS = ("fp16", "bf16", "tf32")


def cpu_training_args(args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """training_args as a CPU training can honour them, and what was changed, by argument name:
    the mixed-precision flags dropped (false ones silently: what the CPU does anyway) and a paged
    optimizer (CUDA only) replaced by adamw_torch."""
    kept, changed = dict(args), {}
    for flag in CPU_OFF_FLAGS:
        if kept.pop(flag, False):
            changed[flag] = f"turned off: training runs on the CPU, which has no {flag} mixed precision; it trains in float32"
    optim = str(kept.get("optim", ""))
    if optim.startswith("paged_"):
        changed["optim"] = f"{optim}: paged optimizers need CUDA and training runs on the CPU; using adamw_torch"
        kept["optim"] = "adamw_torch"
    return kept, changed


class TrainSettings(Frozen):
    method: Literal["lora", "qlora"]
    r: int = 64
    alpha: float = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None
    modules_to_save: list[str] | None = None  # peft: trained in full and saved with the adapter
    # Olive's LoRA torch_dtype: the dtype the (non-quantized) base is loaded in; QLoRA's
    # compute_dtype: bitsandbytes' compute dtype. None: Grove's per-device default.
    torch_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    double_quant: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    training_args: dict[str, Any] = {}
    seed: int = 42
    top_layers: int | None = None  # LoRA only in the top N decoder layers (Grove option)
    # Grove's training setup on CUDA (tasks/train/cuda_setup.py; a CPU trains as before)
    kernels: Literal["liger", "none"] = "liger"
    packing: bool = True
    compile: bool = False
    # data-parallel training processes (torchrun + DDP); auto: one per GPU of the machine that
    # trains, resolved there (grove/machine_facts.py; the resolved count is a fact of the key)
    processes: int | Literal["auto"] = 1
    nodes: int = 1  # machines of one torchrun job (c10d rendezvous, tasks/train/nodes.py); processes on each


class LmEvalSettings(Frozen):
    """lm-evaluation-harness tasks run on each model (grove.evaluate.lm_eval_*)."""

    tasks: list[str]
    include_path: str | None = None  # lm-eval's include_path: the user's own task files
    include_sha256: str | None = None  # the include folder's files: an edited task is a new key
    builtin: bool = True  # whether a task is lm-eval's own (else its index, ~14k tasks, is not built)
    limit: int | None = 100  # documents per task


LABEL_NEW_TOKENS = 8  # a label is a word or two
FREE_TEXT_NEW_TOKENS = 512  # the most a free-text answer gets when max_new_tokens is left unset


class EvalSettings(Frozen):
    text_template: str
    max_new_tokens: int | None = None  # None: new_tokens() sizes it
    batch_size: int = 16
    max_rows: int | None = None
    label_col: str | None = None  # the template's trailing column: the answer the model is asked for
    answer: Literal["label", "text"] = "label"  # label_col is a label (accuracy) or free text (exact match, chrF)
    generation_rows: int = 16  # answer text: rows answered greedily per model
    lm_eval: LmEvalSettings | None = None

    def new_tokens(self, answer_tokens: list[int], context: int | None) -> int:
        """max_new_tokens as set; unset, 8 for a label and, for free text, room for the longest
        eval answer (its token count) with half again to spare, at least 8 more: a fixed 8 cut
        most free-text answers short, for every model alike. At most 512, and half the model's
        context (onnxruntime-genai refuses a max_length beyond it)."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.answer != "text" or not answer_tokens:
            return LABEL_NEW_TOKENS
        longest = max(answer_tokens)
        return min(longest + max(8, longest // 2), FREE_TEXT_NEW_TOKENS, context // 2 if context else FREE_TEXT_NEW_TOKENS)


class BuildSettings(Frozen):
    """One ONNX build: the builder's precision and its weight-only quantization choices.

    Built and checked by flows/config/build.py (flows/config/build_rules.py holds the rules);
    tasks/build_onnx/quantization.py:builder_options turns it into the builder's KEY=VALUE options.
    """

    precision: Literal["int4", "int8", "fp16", "fp32", "bf16"] = "int4"
    block_size: int = 32  # MatMulNBits block size (16/32/64/128/256)
    accuracy_level: int | None = None  # MatMulNBits compute type (None: the builder's default, 4 on CPU)
    is_symmetric: bool = True  # int4/int8 (True) or uint4/uint8 with zero points (False)
    # How weights are rounded: the builder's default/rtn/k_quant, or "hqq"/"gptq": an fp32 build
    # quantized afterwards by onnxruntime's MatMulNBitsQuantizer (Grove's options).
    algo: Literal["default", "rtn", "k_quant", "hqq", "gptq"] = "default"
    mixed_precision: dict[str, Literal["int4", "int8"]] = {}  # selector -> type, e.g. last_matmul: int8
    nodes_to_exclude: list[str] = []  # node names kept unquantized, e.g. /lm_head/MatMul
    op_types_to_quantize: list[Literal["MatMul", "Gather"]] | None = None  # None: the builder's default
    shared_embeddings: bool | None = None  # None: the builder's default (whether the model ties them)
    extra_options: dict[str, str] = {}  # any other builder option, checked against the installed builder
    execution_provider: Literal["cpu", "cuda"] = "cpu"


class Candidate(Frozen):
    """One quantization variant of a search."""

    name: str
    build: BuildSettings


# Label-free tolerances (grove/teacher_forcing.py), measured on the bundled tone data against the
# 2-point accuracy rule: bench/quality_calibration.py, bench/results/quality_calibration.json.
# Every candidate within 2 points rose at most 0.010 in eval loss, every one outside at least 0.033.
MAX_LOSS_INCREASE = 0.02  # teacher-forced eval loss (nats per labelled token) above the merged model's
# KL did not separate them (0.025 outside, 0.026 within): at 0.02 it passes no model the accuracy
# rule fails, and fails the ladder's first rung, which that rule passes.
MAX_KL = 0.02  # mean KL(merged || shipped) over the labelled tokens
TOLERANCE_METRICS = ("accuracy", "eval_loss", "kl")


class SearchSettings(Frozen):
    """Build every candidate, keep the smallest within tolerance of the merged PyTorch model."""

    candidates: list[Candidate]
    # What "within tolerance" measures: task accuracy (needs a label column), or teacher-forced
    # eval loss or KL from the merged model (any data); resolved from auto by flows/config/build.py.
    tolerance_metric: Literal["accuracy", "eval_loss", "kl"] = "accuracy"
    tolerance_points: float = 2.0  # accuracy points (percent) below the merged PyTorch model
    max_loss_increase: float = MAX_LOSS_INCREASE
    max_kl: float = MAX_KL
    # Build the candidates in order and stop at the first within tolerance (the default search's
    # ladder: most likely to pass first, then ever more precise) instead of building them all.
    early_stop: bool = False

    @property
    def tolerance(self) -> float:
        """The bound in the tolerance metric's unit."""
        return {"accuracy": self.tolerance_points, "eval_loss": self.max_loss_increase,
                "kl": self.max_kl}[self.tolerance_metric]


class BenchmarkSettings(Frozen):
    # The hardware measured on is a machine fact of the benchmark's key (grove/machine_facts.py):
    # timings from one machine are never a cache hit on another.
    prompts: int = 3
    max_new_tokens: int = 32
    warmup: int = 1
    repeats: int = 2


# Gate metrics a promotion can use: (stage, path in that stage's summary). Higher is better.
PROMOTION_METRICS = {
    "onnx_accuracy": ("build_onnx", "accuracy"),
    "fine_tuned_accuracy": ("evaluate", "fine_tuned.accuracy"),
    "onnx_decode_tokens_per_s": ("benchmark", "onnx.decode_tokens_per_s"),
    # grove.evaluate.answer: text (chrF 0-100, exact match a fraction)
    "onnx_chrf": ("build_onnx", "generation.chrf"),
    "onnx_exact_match": ("build_onnx", "generation.exact_match"),
    "fine_tuned_chrf": ("evaluate", "fine_tuned.generation.chrf"),
    "fine_tuned_exact_match": ("evaluate", "fine_tuned.generation.exact_match"),
    # teacher-forced top-1 agreement with the merged PyTorch model: needs no label column
    "onnx_token_agreement": ("build_onnx", "token_agreement"),
}


class PromotionSettings(Frozen):
    """The quality gate a new model passes to become its name's current model."""

    model_name: str
    metric: str = "onnx_accuracy"  # a name in PROMOTION_METRICS
    min: float = 0.0  # the new model's metric must be at least this
    max_drop: float = 0.02  # and not more than this below the current model's
    # Accuracy rules (fractions, 0.02 = 2 points), checked whatever the gate metric:
    # the shipped model within this of the model it was built from (the merged fine-tune) ...
    max_drop_from_fine_tuned: float = 0.02
    # ... and, when there is a fine-tune, at least this above the base model.
    min_gain_over_base: float = 0.05
    # Which drop-from-fine-tuned rule applies: accuracy (the two above), or, with no label column,
    # the teacher-forced eval loss or KL of the shipped model against the model it was built from.
    tolerance_metric: Literal["accuracy", "eval_loss", "kl"] = "accuracy"
    max_loss_increase_from_fine_tuned: float = MAX_LOSS_INCREASE
    max_kl_from_fine_tuned: float = MAX_KL


class RetrySettings(Frozen):
    """How often a failed stage is tried again (transient errors only) and how long to wait."""

    retries: int
    delay_seconds: float


class RunConfig(Frozen):
    """The whole validated run."""

    name: str
    artifact_root: str
    aws_credentials_block: str | None = None  # prefect-aws AwsCredentials block for s3:// roots
    output_dir: str
    retries: dict[str, RetrySettings] = {}
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 42
    checkpoint_steps: int = 25  # training checkpoints every N steps (0: none); not part of any key
    model: ModelSettings
    data: DataSettings
    corpus: CorpusSettings
    train: TrainSettings | None
    evaluate: EvalSettings
    merge: bool
    build: BuildSettings | None
    search: SearchSettings | None = None  # grove.quantization_search: several builds, one kept
    benchmark: BenchmarkSettings
    promotion: PromotionSettings | None = None
    placement: dict[str, str] = {}  # stage -> Prefect work pool (grove.placement); {}: all in the flow's process
    # What build_onnx ships: a merged int4 model, or one int4 base (stored once per base model and
    # build options) plus this run's LoRA adapter in onnxruntime-genai's format.
    ship: Literal["merged", "adapter"] = "merged"
