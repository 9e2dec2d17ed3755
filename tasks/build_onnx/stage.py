"""Stage 6, build_onnx: onnxruntime-genai's model builder, in-process, then prove the result loads.

A build that does not load and generate is a failed stage, never a success (the builder
can exit cleanly yet write an invalid model). The ONNX model's task accuracy is measured
on the same eval split as the PyTorch models: this is where int4 loses accuracy.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from grove.engines import OnnxEngine, eos_ids_of
from grove.models import load_tokenizer, model_config, model_folder
from tasks.build_onnx import quantization
from tasks.build_onnx.base import onnx_base
from tasks.build_onnx.builder import run_builder
from tasks.build_onnx.quantization import builder_options
from grove.generation import aggregates, text_scores, write_generations
from grove.scoring import answer_token_counts, generate_answers, new_tokens, summarize
from grove.served import ADAPTER_FILE
from grove.teacher_forcing import REFERENCE_FILE, load_reference, score_engine
from grove.shipped import ShippedModel, prompt_spec, write_shipped_files
from tasks.build_onnx.search import candidate_row, select_candidate, within_tolerance
from tasks.build_onnx.ship import ship_adapter
from grove.standard_tasks import NO_ADAPTER, onnx_scores
from grove.settings import BenchmarkSettings, BuildSettings, EvalSettings, ModelSettings, SearchSettings
from grove.stage import (ArtifactRef, StageFailed, current_run, grove_stage, open_artifact, output_dir,
                         pending_ref, task_run_name)
from grove.store import folder_bytes
from grove.textdata import encode, prompt_and_answer, read_jsonl

log = logging.getLogger("grove.build_onnx")


def smoke_test(engine: OnnxEngine, tokenizer) -> str:
    """Load-and-generate check: a model that cannot produce tokens fails the stage."""
    prompt = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prompt = [tokenizer.bos_token_id] + prompt
    tokens = engine.generate_timed(prompt, 4).tokens
    if len(tokens) != 4:
        raise StageFailed(f"the built ONNX model generated {len(tokens)} tokens instead of 4")
    return tokenizer.decode(tokens)


def decode_speed(engine: OnnxEngine, prompts: list[list[int]], speed: BenchmarkSettings) -> float | None:
    """Median decode tokens/s over the prompts (every new token forced), as the benchmark stage
    measures it, in this process: a search compares candidates with each other."""
    import statistics

    for _ in range(speed.warmup):
        engine.generate_timed(prompts[0], speed.max_new_tokens)
    rates = []
    for _ in range(speed.repeats):
        for prompt in prompts:
            times = engine.generate_timed(prompt, speed.max_new_tokens).token_times
            if len(times) > 1 and times[-1] > times[0]:
                rates.append((len(times) - 1) / (times[-1] - times[0]))
    return round(statistics.median(rates), 2) if rates else None


def build_settings_summary(build: BuildSettings) -> dict:
    return {"precision": build.precision, "block_size": build.block_size, "accuracy_level": build.accuracy_level,
            "algo": build.algo, "mixed_precision": build.mixed_precision, "nodes_to_exclude": build.nodes_to_exclude,
            "shared_embeddings": build.shared_embeddings, "execution_provider": build.execution_provider}


@grove_stage("build_onnx")
def build_onnx(build: BuildSettings, evaluation: EvalSettings, model: ModelSettings,
               merged: ArtifactRef | None, data: ArtifactRef, speed: BenchmarkSettings | None = None,
               candidate: bool = False, adapter: ArtifactRef | None = None, corpus: ArtifactRef | None = None,
               scores: ArtifactRef | None = None) -> dict:
    """Builds model/ (ONNX + genai_config.json + tokenizer), loads it, scores it; stores onnx_eval.json.

    With the eval `corpus` (template_corpus) it scores the model teacher-forced on any data (eval
    loss, perplexity) and, with evaluate's `scores`, against the PyTorch model it was built from
    (token agreement, KL): grove/teacher_forcing.py; stores onnx_teacher_forced.json.

    With `adapter` (grove.ship: adapter) it stores no model: the base with LoRA slots is the
    stored entry for the base model and build options (built on its first use), and the run's
    LoRA weights are stored as adapter.onnx_adapter; what is scored is that base + adapter.

    As a search candidate (`candidate`), a model that does not build or load is stored as a
    failed candidate (its builder.log and the error) instead of failing the run, and decode
    tokens/s is measured with `speed`.
    """
    source = open_artifact(merged) if merged is not None else model_folder(model)
    target = output_dir() / "model"
    options = builder_options(build, model.trust_remote_code)
    summary = {**build_settings_summary(build), "builder_options": options[:-2]}
    tokenizer = load_tokenizer(source, model.trust_remote_code)
    calibration = None
    if build.algo == "gptq":  # calibrated on training rows, never on the eval split it is scored on
        calibration = [encode(tokenizer, *prompt_and_answer(evaluation.text_template, evaluation.label_col, r))[0]
                       for r in read_jsonl(open_artifact(data), "train")[: quantization.CALIBRATION_ROWS]]
    started = time.monotonic()
    adapter_file = None
    if adapter is not None:
        run = current_run()
        target, base = onnx_base(build, model, run.store, forced=run.forced("build_onnx"))
        summary.update(base=base, adapter=ship_adapter(open_artifact(adapter) / "adapter", target, base, output_dir()),
                       build_seconds=round(time.monotonic() - started, 2), size_bytes=folder_bytes(target))
        adapter_file = output_dir() / ADAPTER_FILE
    try:
        printed = None if adapter is not None else \
            run_builder(source, target, build, model.trust_remote_code, calibration)
    except Exception as exc:  # noqa: BLE001 - the builder's own rejection
        if not candidate:
            raise
        (output_dir() / "builder.log").write_text(f"{type(exc).__name__}: {exc}")
        return {**summary, "loaded": False, "error": f"the builder failed: {type(exc).__name__}: {exc}"[:500],
                "build_seconds": round(time.monotonic() - started, 2)}
    if printed is not None:
        (output_dir() / "builder.log").write_text(printed)
        summary.update(build_seconds=round(time.monotonic() - started, 2), size_bytes=folder_bytes(target))
    try:
        engine = OnnxEngine(target, eos_ids_of(tokenizer), adapter=adapter_file)
        sample = smoke_test(engine, tokenizer)
    except Exception as exc:  # noqa: BLE001 - any load/generate failure fails the build
        message = f"the builder wrote a model that does not load or generate ({exc}); builder options: {options}"
        if not candidate:
            raise StageFailed(message) from exc
        shutil.rmtree(target, ignore_errors=True)  # keep the record, not the broken model
        return {**summary, "loaded": False, "error": message[:500]}
    if build.execution_provider not in engine.device_type:
        raise RuntimeError(f"the model was built for the {build.execution_provider} execution provider but "
                           f"onnxruntime-genai runs it on {engine.device_type}")
    summary.update(loaded=True, device_type=engine.device_type, sample=sample)
    if corpus is not None:
        scoring_started = time.monotonic()
        examples = read_jsonl(open_artifact(corpus), "eval")[: evaluation.max_rows]
        reference = load_reference(open_artifact(scores) / REFERENCE_FILE) if scores is not None else None
        forced = score_engine(engine, examples, evaluation.batch_size, reference,
                              tokenizer.pad_token_id or 0)
        forced["teacher_forced_seconds"] = round(time.monotonic() - scoring_started, 2)
        (output_dir() / "onnx_teacher_forced.json").write_text(json.dumps(forced, indent=1))
        summary.update(forced)
    rows = read_jsonl(open_artifact(data), "eval")
    if evaluation.label_col:
        run = current_run()
        progress = (lambda done, total: run.on_progress("build_onnx", done, total, {"model": "onnx"})) \
            if run.on_progress else None
        # scored as a user runs the shipped folder (grove/shipped.py), not through Grove's own tokenizing
        text = evaluation.answer == "text"
        scored = rows[: evaluation.max_rows][: evaluation.generation_rows if text else None]
        lengths = answer_token_counts(evaluation, rows[: evaluation.max_rows], tokenizer)
        budget = new_tokens(evaluation, lengths, model_config(model))  # as evaluate's
        spec = prompt_spec(evaluation.text_template, evaluation.label_col, budget, tokenizer, whole_answer=text)
        # the prompt template travels with what is shipped: the model, or the adapter (the stored
        # base is shared by every adapter and never written to)
        write_shipped_files(output_dir() if adapter is not None else target, spec)
        shipped = ShippedModel(target, engine, spec)
        prompts = [shipped.encode(r) for r in scored]
        trained_on = [encode(tokenizer, prompt_and_answer(evaluation.text_template, evaluation.label_col, r)[0],
                             eos=False)[0] for r in scored]
        answers = generate_answers(engine, shipped, prompts, budget, evaluation.batch_size,
                                   progress, whole=text)
        references = [str(r[evaluation.label_col]).strip() for r in scored]
        scores = {"generation": text_scores(answers, references)} if text else summarize(answers, references)
        # rows whose shipped prompt ids differ from the training tokenization (expected: 0)
        scores["prompts_unlike_training"] = sum(a != b for a, b in zip(prompts, trained_on))
        if scores["prompts_unlike_training"]:  # seen: a tokenizer.json onnxruntime-genai reads otherwise
            log.warning("%d of %d prompts encode differently through onnxruntime-genai's tokenizer than in "
                        "training: the ONNX scores measure the tokenizer, not the model (check tokenizer.json "
                        "in %s)", scores["prompts_unlike_training"], len(prompts), target)
        if text:
            write_generations(output_dir(), {"onnx": scores["generation"]})
            scores["generation"] = aggregates(scores["generation"])
            summary["generation"] = scores["generation"]
        else:
            summary.update(accuracy=scores["accuracy"], per_label=scores["per_label"])
        (output_dir() / "onnx_eval.json").write_text(json.dumps(scores, indent=1))
        summary["prompts_unlike_training"] = scores["prompts_unlike_training"]
    if evaluation.lm_eval:  # general ability as shipped (each candidate of a search too)
        summary["lm_eval"] = NO_ADAPTER if adapter_file else onnx_scores(evaluation.lm_eval, target)
    if speed is not None and rows:
        prompts = [encode(tokenizer, prompt_and_answer(evaluation.text_template, evaluation.label_col, r)[0],
                          eos=False)[0] for r in rows[: speed.prompts]]
        summary["decode_tokens_per_s"] = decode_speed(engine, prompts, speed)
    return summary


def search_quantization(search: SearchSettings, evaluation: EvalSettings, speed: BenchmarkSettings,
                        model: ModelSettings, merged: ArtifactRef | None, data: ArtifactRef,
                        scores: ArtifactRef, adapter: ArtifactRef | None = None,
                        corpus: ArtifactRef | None = None) -> ArtifactRef:
    """Builds and scores every candidate (each its own cached build_onnx task), keeps one; with
    early_stop, builds them in order only until one is within tolerance. With `adapter`
    (grove.ship: adapter) each candidate is a base with LoRA slots, scored with the adapter on it.

    The candidates run one after another, not concurrently: on a small CPU machine
    concurrent builds would measure each other's load, not their own decode speed.
    Returns the kept candidate's reference, its summary extended with the whole table.
    """
    tuned = {} if scores.pending else scores.summary.get("fine_tuned") or scores.summary.get("base") or {}
    metric = search.tolerance_metric
    baseline = tuned.get("accuracy" if metric == "accuracy" else "eval_loss")
    refs = []
    for candidate in search.candidates:
        with task_run_name(f"build_onnx[{candidate.name}]"):
            refs.append(build_onnx(candidate.build, evaluation, model, merged, data, speed, True, adapter=adapter,
                                   corpus=corpus, scores=scores))
        if search.early_stop and (refs[-1].pending or scores.pending or
                                  within_tolerance(candidate_row(candidate.name, refs[-1].summary),
                                                   baseline, search.tolerance, metric)):
            break  # planning stops at the first candidate: whether it passes is not known yet
    if scores.pending or any(ref.pending for ref in refs):  # planning: nothing to choose from yet
        return pending_ref("build_onnx")
    rows = [candidate_row(c.name, ref.summary, ref.key) for c, ref in zip(search.candidates, refs)]
    selection = select_candidate(rows, baseline, search.tolerance, metric)
    if selection.chosen is None:
        raise StageFailed("no quantization candidate built a model that loads:\n" +
                          "\n".join(f"  {r['name']}: {r['reason']}" for r in selection.rows))
    chosen = refs[[r["name"] for r in rows].index(selection.chosen)]
    table = {"baseline_accuracy": tuned.get("accuracy"), "baseline_eval_loss": tuned.get("eval_loss"),
             "baseline": "merged PyTorch model (evaluate: fine_tuned)",
             "scored": "base + adapter, as served" if adapter is not None else "merged model",
             "tolerance_metric": metric, "tolerance": search.tolerance,
             "tolerance_points": search.tolerance_points, "chosen": selection.chosen,
             "within_tolerance": selection.within_tolerance, "verdict": selection.verdict,
             "candidates": selection.rows, "early_stop": search.early_stop,
             "not_built": [c.name for c in search.candidates[len(refs):]]}
    return chosen.model_copy(update={"summary": {**chosen.summary, "candidate": selection.chosen, "search": table}})
