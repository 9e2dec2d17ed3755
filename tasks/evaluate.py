"""Stage 4, evaluate: eval loss, perplexity and task accuracy, base model vs fine-tuned.

With free-text answers (grove.evaluate.answer: text) there is no accuracy: the first
generation_rows eval rows are answered greedily and scored by exact match and chrF
(grove/generation.py), every row kept in generations.jsonl.

The fine-tuned model is the full-precision base with the adapter merged in: exactly what
merge_adapters produces (for QLoRA too, which merges into the unquantized base).
"""

from __future__ import annotations

import json
import logging
import math

from grove.engines import HfEngine, eos_ids_of
from grove.generation import aggregates, text_scores, write_generations
from grove.lm_head import labelled_logits
from grove.models import load_causal_lm, load_tokenizer, model_config, model_folder, resolve_device
from grove.scoring import answer_token_counts, generate_answers, new_tokens, prompts_and_labels, summarize
from grove.settings import EvalSettings, ModelSettings
from grove.standard_tasks import pytorch_scores
from grove.teacher_forcing import REFERENCE_FILE, save_reference, top_log_probs
from grove.stage import ArtifactRef, StageFailed, current_run, grove_stage, open_artifact, output_dir
from grove.textdata import answer_of, read_jsonl

log = logging.getLogger("grove.evaluate")


def forward_pass(model, examples: list[dict], batch_size: int,
                 reference: list | None = None) -> tuple[float | None, list[list[int]]]:
    """Token-weighted mean loss over the eval examples (labels as in the training corpus), and
    the greedy (argmax) next-token prediction at every labelled position of every example (-1
    at the others: the LM head runs only where a label is, grove/lm_head.py; the answer check
    needs the answer's positions, which a completion-only corpus labels). With a `reference`
    list, appends each batch's top log-probabilities at those positions (grove/teacher_forcing.py:
    what the shipped ONNX model is compared with)."""
    import torch

    device = next(model.parameters()).device
    total_loss, total_tokens, argmax = 0.0, 0, []
    for start in range(0, len(examples), batch_size):
        batch = examples[start: start + batch_size]
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in batch], device=device)
        labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in batch], device=device)
        mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in batch],
                            device=device)
        shifted = labels[:, 1:]
        keep = shifted != -100
        with torch.no_grad():
            logits = labelled_logits(model, {"input_ids": ids, "attention_mask": mask}, keep)
            if logits is None:  # a model that cannot be split: every position
                logits = model(input_ids=ids, attention_mask=mask).logits.float()[:, :-1][keep]
        total_loss += torch.nn.functional.cross_entropy(logits, shifted[keep], reduction="sum").item()
        total_tokens += int(keep.sum())
        if reference is not None:
            reference.append(top_log_probs(logits))
        predicted = torch.full(ids.shape, -1, dtype=torch.long, device=device)
        predicted[:, :-1][keep] = logits.argmax(-1)
        argmax += [row[: len(e["input_ids"])].tolist() for row, e in zip(predicted, batch)]
    return (total_loss / total_tokens if total_tokens else None), argmax


def proven_by_forward_pass(examples, argmax, prompts, labels, tokenizer, eos_ids,
                           max_new_tokens: int, whole: bool = False) -> dict[int, str]:
    """Rows whose greedy answer the forward pass already proves correct.

    If the argmax after the prompt reproduces every answer token and then eos, greedy
    generation would emit exactly the label and stop: no need to generate it again, as
    long as the answer fits in max_new_tokens (a longer one is cut short when generated,
    as the ONNX model's is). Every other row is generated for real.
    """
    proven = {}
    for index, (example, prompt, label) in enumerate(zip(examples, prompts, labels)):
        ids, n = example["input_ids"], len(prompt)
        if ids[:n] != prompt or not ids or ids[-1] not in eos_ids or len(ids) - 1 - n > max_new_tokens:
            continue
        if argmax[index][n - 1: len(ids) - 1] == ids[n:] and \
                answer_of(tokenizer.decode(ids[n:-1], skip_special_tokens=True), whole) == label:
            proven[index] = label
    return proven


def measure(model, tokenizer, rows, examples, settings: EvalSettings, label: str, budget: int,
            reference: list | None = None) -> dict:
    loss, argmax = forward_pass(model, examples, settings.batch_size, reference)
    if loss is not None and not math.isfinite(loss):  # a NaN compares as within every bound downstream
        raise StageFailed(f"the {label} model's eval loss is {loss}: its weights hold NaN or inf (a training that "
                          f"diverged: lower the learning rate), so it cannot be scored or shipped")
    result = {"eval_loss": round(loss, 4) if loss is not None else None,
              "perplexity": round(math.exp(loss), 3) if loss is not None and loss < 50 else None}
    if settings.label_col:
        eos_ids = eos_ids_of(tokenizer, model.config)
        engine = HfEngine(model, tokenizer.pad_token_id, eos_ids)
        text = settings.answer == "text"
        scored = rows[: settings.generation_rows] if text else rows
        prompts, labels = prompts_and_labels(scored, settings.text_template, settings.label_col, tokenizer)
        proven = proven_by_forward_pass(examples, argmax, prompts, labels, tokenizer, eos_ids,
                                        budget, whole=text)
        run = current_run()
        progress = (lambda done, total: run.on_progress("evaluate", done, total, {"model": label})) \
            if run.on_progress else None
        answers = generate_answers(engine, tokenizer, prompts, budget, settings.batch_size,
                                   progress, known=proven, whole=text)
        result.update({"generation": text_scores(answers, labels)} if text else summarize(answers, labels))
        result["rows_proven_by_forward_pass"] = len(proven)
    return result


def warn_of_long_answers(lengths: list[int], budget: int) -> None:
    """Free-text answers longer than a max_new_tokens the config set are cut short when generated,
    by every model alike: exact match cannot be reached and chrF is capped, which reads as a weak
    model. (Left unset, the budget is sized from these answers.)"""
    longer = [n for n in lengths if n > budget]
    if longer:
        log.warning("%d of %d eval answers are longer than grove.evaluate.max_new_tokens=%d (up to %d tokens): "
                    "every model's answer to them is cut short, so exact match cannot be reached there; "
                    "raise max_new_tokens, or leave it unset to size it from the answers",
                    len(longer), len(lengths), budget, max(longer))


@grove_stage("evaluate", tags=("gpu",))
def evaluate(settings: EvalSettings, data: ArtifactRef, corpus: ArtifactRef, model: ModelSettings,
             adapter: ArtifactRef | None = None) -> dict:
    """Scores the base model and (when there is an adapter) the fine-tuned one; stores metrics.json."""
    from peft import PeftModel

    device = resolve_device(current_run().device)
    rows = read_jsonl(open_artifact(data), "eval")[: settings.max_rows]
    examples = read_jsonl(open_artifact(corpus), "eval")[: settings.max_rows]
    folder = model_folder(model)
    tokenizer = load_tokenizer(folder, model.trust_remote_code)
    base = load_causal_lm(folder, device, model.trust_remote_code).eval()
    lengths = answer_token_counts(settings, rows, tokenizer)
    budget = new_tokens(settings, lengths, model_config(model))
    warn_of_long_answers(lengths, budget)
    # the model the shipped ONNX model is built from is the teacher-forcing reference
    reference: list = []
    metrics = {"base": measure(base, tokenizer, rows, examples, settings, "base", budget,
                               reference if adapter is None else None)}
    if settings.lm_eval:
        metrics["base"]["lm_eval"] = pytorch_scores(settings.lm_eval, base, tokenizer, settings.batch_size)
    if adapter is not None:
        # merged into the base's weights: the model merge_adapters stores, and no LoRA branch per
        # projection on every forward (the base was scored above, so its weights may change)
        tuned = PeftModel.from_pretrained(base, open_artifact(adapter) / "adapter").merge_and_unload().eval()
        metrics["fine_tuned"] = measure(tuned, tokenizer, rows, examples, settings, "fine-tuned", budget, reference)
        if settings.lm_eval:
            metrics["fine_tuned"]["lm_eval"] = pytorch_scores(settings.lm_eval, tuned, tokenizer, settings.batch_size)
    generated = {name: m.pop("generation") for name, m in metrics.items() if "generation" in m}
    if generated:
        write_generations(output_dir(), generated)
        for name, scores in generated.items():
            metrics[name]["generation"] = aggregates(scores)
    (output_dir() / "metrics.json").write_text(json.dumps(metrics, indent=1))
    save_reference(output_dir() / REFERENCE_FILE, reference)
    return {name: {k: m.get(k) for k in ("accuracy", "eval_loss", "perplexity", "per_label", "generation", "lm_eval")
                   if k in m or k not in ("generation", "lm_eval")} for name, m in metrics.items()}
