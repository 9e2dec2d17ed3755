"""QLoRA training throughput on one GPU: the Olive recipe's shape against Grove's own setup.

One process: builds a Phi-3-mini-shaped model with random weights (hidden 3072, 32 layers,
32 heads, intermediate 8192, vocab 32064), saves it once, loads it 4-bit (bitsandbytes nf4,
double quant, bf16 compute) and trains LoRA r=64 on o_proj,qkv_proj with the HF Trainer:

  (a) recipe:  peft prepare_model_for_kbit_training, batch 1 x 512 (Olive's `join` blocks)
  (b) grove:   tasks/train/cuda_setup.py as the train stage runs it on CUDA (no fp32 upcast,
               padding-free packing, Liger kernels), same model and examples

then one lever at a time (rows of `levers`), and the loss of the first 50 steps of Grove's
setup against the plain setup (upcast, padded batches, HF cross-entropy) on the same examples
in the same order. Prints one JSON object (also written to --out) and a line per run on stderr.

    python3 bench/gpu_train_throughput.py --out $OUT/train_throughput.json
    python3 bench/gpu_train_throughput.py --tiny   # code path check on a CPU (no timings)

Tokens/s counts the tokens that carry a label (padding excluded), over the timed steps after
the warm-up steps, each step ended with torch.cuda.synchronize().
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.train.cuda_setup import (  # noqa: E402
    PackingCollator,
    apply_liger,
    compile_layers,
    liger_available,
)
from bench.train_variants import prepare_quantized, uncompile_layers  # noqa: E402

PHI3_MINI = dict(hidden_size=3072, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=8192, vocab_size=32064, max_position_embeddings=4096)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=128, vocab_size=512, max_position_embeddings=4096)
STARTED = time.monotonic()


def say(*parts):
    print(f"[{time.monotonic() - STARTED:7.1f}s]", *parts, file=sys.stderr, flush=True)


def save_report(report: dict, out: str | None, final: bool = False) -> None:
    """Writes the JSON report to `out` after every run (partial results survive a call cut
    short); the final one is printed too."""
    text = json.dumps(report, indent=1)
    if final:
        print(text)
    if out:
        Path(out).write_text(text)


# ---- data: the same examples for every run -------------------------------------------------------
def make_examples(n: int, vocab: int, low: int, high: int, seed: int = 0) -> list[dict]:
    """Variable-length examples with something to learn: a random motif repeated (copying)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(low, high)
        motif = [rng.randrange(3, vocab - 100) for _ in range(rng.randint(8, 48))]
        ids = [1] + (motif * (length // len(motif) + 1))[: length - 1]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def join_blocks(examples: list[dict], block: int) -> list[dict]:
    """Olive's `join`: examples concatenated and cut into full blocks (attention crosses examples)."""
    ids = [t for e in examples for t in e["input_ids"]]
    return [{"input_ids": ids[i:i + block], "labels": ids[i:i + block]} for i in range(0, len(ids) - block + 1, block)]


class ListDataset:
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


class PadCollator:
    """The plain setup: pad to the batch's longest example, attention_mask, padded labels ignored."""

    def __init__(self, pad_id):
        self.pad_id = pad_id

    def __call__(self, batch):
        import torch

        width = max(len(e["input_ids"]) for e in batch)
        return {
            "input_ids": torch.tensor([e["input_ids"] + [self.pad_id] * (width - len(e["input_ids"])) for e in batch]),
            "labels": torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in batch]),
            "attention_mask": torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"]))
                                            for e in batch]),
        }


# ---- the model -------------------------------------------------------------------------------------
def build_random_model(folder: Path, shape: dict, device: str) -> None:
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = Phi3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    gc.collect()


def load_4bit(folder: Path, device: str):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = torch.bfloat16 if device == "cuda" else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=compute,
                                                 device_map={"": device}, attn_implementation="sdpa")
    model.config.use_cache = False  # a cache would also turn off the packed-sequence mask
    return model


def downcast(model, dtype) -> int:
    """Undo prepare_model_for_kbit_training's fp32 upcast (lossless: the values came from bf16)."""
    n = 0
    for param in model.parameters():
        if param.dtype == __import__("torch").float32:
            param.data = param.data.to(dtype)
            n += 1
    return n


# ---- one run ---------------------------------------------------------------------------------------
def run(base, name: str, rows, collator, batch: int, steps: int, warmup: int, device: str, *, upcast: bool,
        dropout: float = 0.1, lr: float = 2e-4, seed: int = 0, record_losses: bool = False) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    say(f"run {name}: batch {batch}, {steps} steps")
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    prepare_quantized(base, upcast=upcast)
    torch.manual_seed(seed)
    lora = LoraConfig(r=64, lora_alpha=64, lora_dropout=dropout, target_modules=["o_proj", "qkv_proj"],
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    marks: list[tuple[float, int]] = []
    counted: list = []
    losses: list = []

    class Timing(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), len(counted)))

    class Counting(Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            counted.append((inputs["labels"] != -100).sum())
            result = super().compute_loss(model, inputs, *args, **kwargs)
            if record_losses:
                losses.append((result[0] if isinstance(result, tuple) else result).detach())
            return result

    args = TrainingArguments(output_dir=f"/tmp/grove-bench-{name}", per_device_train_batch_size=batch,
                             max_steps=steps, learning_rate=lr, lr_scheduler_type="constant", logging_steps=1000,
                             report_to="none", save_strategy="no", disable_tqdm=True, bf16=device == "cuda",
                             use_cpu=device == "cpu", seed=seed, data_seed=seed, remove_unused_columns=False,
                             dataloader_num_workers=0, max_grad_norm=0.3)
    trainer = Counting(model=model, args=args, train_dataset=ListDataset(rows), data_collator=collator,
                       callbacks=[Timing()])
    result: dict = {"name": name, "batch": batch, "steps": steps}
    try:
        started = time.perf_counter()
        trainer.train()
        result["wall_s"] = round(time.perf_counter() - started, 2)
        tokens = [int(t) for t in counted]
        result["tokens_per_step"] = round(sum(tokens) / len(tokens), 1)
        if len(marks) > warmup + 1:
            (t0, _), (t1, _) = marks[warmup], marks[-1]
            timed = sum(tokens[warmup + 1:len(marks)])
            result["tokens_per_s"] = round(timed / (t1 - t0), 1)
            result["step_s"] = round((t1 - t0) / (len(marks) - 1 - warmup), 4)
        if device == "cuda":
            result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        if record_losses:
            result["losses"] = [float(x) for x in losses]
        say(f"  -> {json.dumps({k: v for k, v in result.items() if k != 'losses'})}")
    except torch.OutOfMemoryError as exc:
        result["error"] = f"out of memory: {str(exc).splitlines()[0][:200]}"
        say("  -> OOM")
    finally:
        trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
        del trainer
        model.unload()  # the LoRA layers go; the 4-bit base stays loaded for the next run
        del model
        base.__dict__.pop("peft_config", None)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return result


def remove_liger(model, originals: dict) -> None:
    """Undo liger-kernel's instance patches (bound forward methods) and module-level rope."""
    for module in model.modules():
        for attr in ("forward", "extra_repr", "_get_name"):
            module.__dict__.pop(attr, None)
    from transformers.models.phi3 import modeling_phi3

    for key, value in originals.items():
        setattr(modeling_phi3, key, value)


def join_suite(opts, base, device, blocks512, blocks1024, examples, pad, pack, steps, warmup, do, report):
    """The recipe's layout (join blocks): the plain setup and Grove's, 50 steps each, same blocks."""
    import torch

    n = opts.compare_steps
    do("recipe_upcast_b1x512_join", blocks512, pad, 1, 24 if not opts.tiny else 3, 6 if not opts.tiny else 1,
       device, upcast=True)
    do("plain_upcast_b8x1024_join", blocks1024, pad, 8, n, 5, device, upcast=True, dropout=0.0,
       record_losses=True, need=40)
    compute = torch.bfloat16 if device == "cuda" else torch.float32
    report["downcast_params"] = downcast(base, compute)
    do("noupcast_b8x1024_join", blocks1024, pad, 8, steps, warmup, device, upcast=False)
    do("noupcast_4x2048_join", join_blocks(examples, 2 * len(blocks1024[0]["input_ids"])), pad, 4, steps, warmup,
       device, upcast=False)
    if device != "cuda" or not liger_available():
        report["liger"] = "not available" if device == "cuda" else "cpu run"
        do("grove_b8x1024_join", blocks1024, pad, 8, n, 5, device, upcast=False, dropout=0.0, record_losses=True)
        return
    from transformers.models.phi3 import modeling_phi3

    originals = {"apply_rotary_pos_emb": modeling_phi3.apply_rotary_pos_emb}
    apply_liger(base, fused_cross_entropy=True, rms_norm=False, swiglu=False, rope=False)
    do("liger_flce_b8x1024_join", blocks1024, pad, 8, steps, warmup, device, upcast=False)
    remove_liger(base, originals)
    apply_liger(base)
    do("grove_b8x1024_join", blocks1024, pad, 8, n, 5, device, upcast=False, dropout=0.0, record_losses=True)
    do("liger_dropout0.1_b8x1024_join", blocks1024, pad, 8, steps, warmup, device, upcast=False)
    do("liger_b12x1024_join", blocks1024, pad, 12, steps, warmup, device, upcast=False)
    do("liger_4x2048_join", join_blocks(examples, 2 * len(blocks1024[0]["input_ids"])), pad, 4, steps, warmup,
       device, upcast=False)
    # packed line-by-line examples through flex attention (block-sparse document mask) instead of SDPA's dense mask
    try:
        base.set_attn_implementation("flex_attention")
        do("liger_packed_b16_flex", examples, pack, 16, steps + 4, warmup + 4, device, upcast=False, need=90)
    except Exception as exc:  # noqa: BLE001
        report["runs"]["liger_packed_b16_flex"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        base.set_attn_implementation("sdpa")
    compile_layers(base)
    do("liger_compile_b8x1024_join", blocks1024, pad, 8, steps + 4, warmup + 4, device, upcast=False, need=100)
    uncompile_layers(base)
    torch._dynamo.reset()
    remove_liger(base, originals)
    compile_layers(base)
    do("noupcast_compile_b8x1024_join", blocks1024, pad, 8, steps + 4, warmup + 4, device, upcast=False, need=100)
    uncompile_layers(base)


def packed_suite(opts, base, device, blocks512, blocks1024, examples, pad, pack, steps, warmup, do, report, skip):
    import torch

    # --- 1: with the fp32 upcast (the recipe, the anchor and the plain loss curve) --------------
    do("recipe_upcast_b1x512_join", blocks512, pad, 1, 24 if not opts.tiny else 3, 6 if not opts.tiny else 1,
       device, upcast=True)
    do("upcast_b8x1024_join", blocks1024, pad, 8, steps, warmup, device, upcast=True)
    do("plain_upcast_padded_b8", examples, pad, 8, opts.compare_steps, 3, device, upcast=True, dropout=0.0,
       record_losses=True, need=60)
    compute = torch.bfloat16 if device == "cuda" else torch.float32
    report["downcast_params"] = downcast(base, compute)

    # --- 2: no upcast, one lever at a time ------------------------------------------------------
    do("noupcast_b8x1024_join", blocks1024, pad, 8, steps, warmup, device, upcast=False)
    do("noupcast_padded_b16", examples, pad, 16, steps, warmup, device, upcast=False)
    do("noupcast_packed_b16", examples, pack, 16, steps, warmup, device, upcast=False)
    do("noupcast_packed_b32", examples, pack, 32, steps, warmup, device, upcast=False)

    # --- 3: Liger kernels, then torch.compile ------------------------------------------------------
    if device == "cuda" and liger_available():
        from transformers.models.phi3 import modeling_phi3

        originals = {"apply_rotary_pos_emb": modeling_phi3.apply_rotary_pos_emb}
        apply_liger(base, fused_cross_entropy=True, rms_norm=False, swiglu=False, rope=False)
        do("packed_b16_liger_flce", examples, pack, 16, steps, warmup, device, upcast=False)
        remove_liger(base, originals)
        apply_liger(base)
        do("grove_default_packed_b16_liger", examples, pack, 16, steps, warmup, device, upcast=False)
        do("grove_compare_packed_b8_liger", examples, pack, 8, opts.compare_steps, 3, device, upcast=False,
           dropout=0.0, record_losses=True, need=40)
        do("packed_b32_liger", examples, pack, 32, steps, warmup, device, upcast=False)
        do("packed_b48_liger", examples, pack, 48, steps, warmup, device, upcast=False)
        do("b8x1024_join_liger", blocks1024, pad, 8, steps, warmup, device, upcast=False)
        do("b16x1024_join_liger", blocks1024, pad, 16, steps, warmup, device, upcast=False)
        if "compile" not in skip:
            compile_layers(base)
            do("packed_b16_liger_compile", examples, pack, 16, steps + 4, warmup + 4, device, upcast=False,
               need=120)
            uncompile_layers(base)
            torch._dynamo.reset()
        remove_liger(base, originals)
    else:
        report["liger"] = "not available" if device == "cuda" else "cpu run"
        do("grove_compare_packed_b8", examples, pack, 8, opts.compare_steps, 3, device, upcast=False,
           dropout=0.0, record_losses=True)
    if device == "cuda" and "compile" not in skip:
        compile_layers(base)
        do("noupcast_packed_b16_compile", examples, pack, 16, steps + 4, warmup + 4, device, upcast=False,
           need=120)
        uncompile_layers(base)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny model (CPU code path check)")
    parser.add_argument("--budget-s", type=float, default=540, help="stop starting runs after this")
    parser.add_argument("--compare-steps", type=int, default=50)
    parser.add_argument("--skip", default="", help="comma-separated run names to skip")
    parser.add_argument("--suite", default="join", choices=["join", "packed"],
                        help="join: Olive's join blocks (the recipe's data layout, Grove's default compared "
                             "there); packed: line-by-line examples, padded vs packed")
    opts = parser.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() and not opts.tiny else "cpu"
    shape = TINY if opts.tiny else PHI3_MINI
    vocab = shape["vocab_size"]
    skip = set(filter(None, opts.skip.split(",")))
    report: dict = {"command": " ".join([Path(sys.executable).name] + sys.argv), "device": device,
                    "shape": shape, "runs": {}}
    if device == "cuda":
        import bitsandbytes
        import peft
        import transformers

        report["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                              "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__,
                              "gpu": torch.cuda.get_device_name(0)}
        try:
            import liger_kernel

            report["versions"]["liger_kernel"] = getattr(liger_kernel, "__version__", "?")
        except ImportError:
            pass

    folder = Path("/tmp/grove-phi3-random" if not opts.tiny else "/tmp/grove-phi3-tiny")
    if not (folder / "config.json").exists():
        say("building the random model")
        build_random_model(folder, shape, device)
    say("loading 4-bit")
    base = load_4bit(folder, device)
    say(f"loaded: {torch.cuda.memory_allocated() / 2**30:.2f} GiB" if device == "cuda" else "loaded")

    high = 1024
    examples = make_examples(4000 if not opts.tiny else 200, vocab, 64, high)
    if opts.tiny:
        examples = make_examples(200, vocab, 8, 64)
        high = 64
    blocks512 = join_blocks(examples, 512 if not opts.tiny else 32)
    blocks1024 = join_blocks(examples, high)
    pad = PadCollator(0)
    pack = PackingCollator(0, high)
    steps, warmup = (14, 4) if not opts.tiny else (3, 1)
    runs = report["runs"]

    def left() -> float:
        return opts.budget_s - (time.monotonic() - STARTED)

    def do(name, *a, need=30, **k):
        if name in skip:
            return None
        if left() < need:
            say(f"skipping {name}: {left():.0f} s left")
            runs[name] = {"name": name, "skipped": "time budget"}
            return None
        try:
            runs[name] = run(base, name, *a, **k)
        except Exception as exc:  # noqa: BLE001 - a lever that fails is a result too
            import traceback

            traceback.print_exc()
            runs[name] = {"name": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        save_report(report, opts.out)
        return runs[name]

    if opts.suite == "join":
        join_suite(opts, base, device, blocks512, blocks1024, examples, pad, pack, steps, warmup, do, report)
    else:
        packed_suite(opts, base, device, blocks512, blocks1024, examples, pad, pack, steps, warmup, do, report, skip)
    runs = report["runs"]
    # --- summary ------------------------------------------------------------------------------------
    if opts.suite == "join":
        plain = compare = runs.get("plain_upcast_b8x1024_join", {})
        compare = grove = runs.get("grove_b8x1024_join", {})
    else:
        plain = runs.get("plain_upcast_padded_b8", {})
        compare = runs.get("grove_compare_packed_b8_liger") or runs.get("grove_compare_packed_b8") or {}
        grove = runs.get("grove_default_packed_b16_liger") or runs.get("noupcast_packed_b16") or {}
    recipe = runs.get("recipe_upcast_b1x512_join", {})
    summary = {}
    if plain.get("losses") and compare.get("losses"):
        a, b = plain["losses"], compare["losses"]
        n = min(len(a), len(b))
        diffs = [abs(x - y) for x, y in zip(a[:n], b[:n])]
        summary["loss_compare"] = {"steps": n, "max_abs_diff": max(diffs),
                                   "max_rel_diff": max(d / abs(x) for d, x in zip(diffs, a[:n]) if x),
                                   "plain_first_last": [a[0], a[n - 1]], "grove_first_last": [b[0], b[n - 1]]}
    if recipe.get("tokens_per_s") and grove.get("tokens_per_s"):
        summary["recipe_tokens_per_s"] = recipe["tokens_per_s"]
        summary["grove_tokens_per_s"] = grove["tokens_per_s"]
        summary["grove_peak_gib"] = grove.get("peak_gib")
        summary["ratio"] = round(grove["tokens_per_s"] / recipe["tokens_per_s"], 2)
    best = max((r for r in runs.values() if r.get("tokens_per_s") and (r.get("peak_gib") or 0) <= 40),
               key=lambda r: r["tokens_per_s"], default=None)
    if best:
        summary["best_under_40gib"] = {k: best.get(k) for k in ("name", "tokens_per_s", "peak_gib")}
    report["summary"] = summary
    report["seconds"] = round(time.monotonic() - STARTED, 1)
    save_report(report, opts.out, final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
