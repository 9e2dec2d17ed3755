"""Stage 6, build_onnx: onnxruntime-genai's model builder, in-process, then prove the result loads.

A build that does not load and generate is a failed stage, never a success (the builder
can exit cleanly yet write an invalid model). The ONNX model's task accuracy is measured
on the same eval split as the PyTorch models: this is where int4 loses accuracy.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import time
from pathlib import Path

from tasks.engines import OnnxEngine, eos_ids_of
from tasks.models import load_tokenizer, model_folder
from tasks.scoring import task_accuracy
from tasks.settings import BuildSettings, EvalSettings, ModelSettings
from tasks.stage import ArtifactRef, StageFailed, current_run, grove_stage, open_artifact, output_dir
from tasks.store import folder_bytes
from tasks.textdata import read_jsonl

log = logging.getLogger("grove.build_onnx")


def builder_options(build: BuildSettings, trust_remote_code: bool) -> list[str]:
    """KEY=VALUE options for the builder: block size, accuracy level, then the user's extras."""
    options = {"block_size": str(build.block_size)}
    if build.accuracy_level is not None:
        options["accuracy_level"] = str(build.accuracy_level)
    options.update(build.extra_options)
    options["hf_token"] = "false"  # never reach for a hub
    options["hf_remote"] = "true" if trust_remote_code else "false"
    return [f"{k}={v}" for k, v in options.items()]


def run_builder(source: Path, target: Path, build: BuildSettings, trust_remote_code: bool) -> str:
    """Runs create_model in-process; returns what the builder printed (kept in the artifact)."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    printed = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="grove-builder-cache-") as cache, \
            contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        options = parse_extra_options(str(source), str(source), str(target), build.precision,
                                      build.execution_provider, cache,
                                      builder_options(build, trust_remote_code))
        create_model(str(source), str(source), str(target), build.precision, build.execution_provider,
                     cache, **options)
    return printed.getvalue()


def smoke_test(engine: OnnxEngine, tokenizer) -> str:
    """Load-and-generate check: a model that cannot produce tokens fails the stage."""
    prompt = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prompt = [tokenizer.bos_token_id] + prompt
    tokens = engine.generate_timed(prompt, 4).tokens
    if len(tokens) != 4:
        raise StageFailed(f"the built ONNX model generated {len(tokens)} tokens instead of 4")
    return tokenizer.decode(tokens)


@grove_stage("build_onnx")
def build_onnx(build: BuildSettings, evaluation: EvalSettings, model: ModelSettings,
               merged: ArtifactRef | None, data: ArtifactRef) -> dict:
    """Builds model/ (ONNX + genai_config.json + tokenizer), loads it, scores it; stores onnx_eval.json."""
    source = open_artifact(merged) if merged is not None else model_folder(model)
    target = output_dir() / "model"
    started = time.monotonic()
    printed = run_builder(source, target, build, model.trust_remote_code)
    build_seconds = time.monotonic() - started
    (output_dir() / "builder.log").write_text(printed)
    tokenizer = load_tokenizer(source, model.trust_remote_code)
    try:
        engine = OnnxEngine(target, eos_ids_of(tokenizer))
        sample = smoke_test(engine, tokenizer)
    except Exception as exc:  # noqa: BLE001 - any load/generate failure fails the build
        raise StageFailed(f"the builder wrote a model that does not load or generate ({exc}); "
                           f"builder options: {builder_options(build, model.trust_remote_code)}") from exc
    if build.execution_provider not in engine.device_type:
        raise RuntimeError(f"the model was built for the {build.execution_provider} execution provider but "
                           f"onnxruntime-genai runs it on {engine.device_type}")
    summary = {"precision": build.precision, "block_size": build.block_size,
               "accuracy_level": build.accuracy_level, "execution_provider": build.execution_provider,
               "device_type": engine.device_type, "build_seconds": round(build_seconds, 2), "sample": sample,
               "size_bytes": folder_bytes(target)}
    if evaluation.label_col:
        rows = read_jsonl(open_artifact(data), "eval")[: evaluation.max_rows]
        run = current_run()
        progress = (lambda done, total: run.on_progress("build_onnx", done, total, {"model": "onnx"})) \
            if run.on_progress else None
        scores = task_accuracy(engine, tokenizer, rows, evaluation.text_template, evaluation.label_col,
                               evaluation.max_new_tokens, evaluation.batch_size, progress)
        (output_dir() / "onnx_eval.json").write_text(json.dumps(scores, indent=1))
        summary.update(accuracy=scores["accuracy"], per_label=scores["per_label"])
    return summary
