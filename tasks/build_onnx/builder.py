"""onnxruntime-genai's model builder, in-process: what the build_onnx stage and the adapter base share.

Its own module (not the stage's) so that the adapter base's cache key (tasks/build_onnx/base.py)
covers how a model is built and nothing of the stage around it (scoring, search, shipping).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

from grove.settings import BuildSettings
from tasks.build_onnx import quantization
from tasks.build_onnx.quantization import builder_options, builder_precision, calibration_quantize


def run_builder(source: Path, target: Path, build: BuildSettings, trust_remote_code: bool,
                calibration: list[list[int]] | None = None, extra: list[str] = ()) -> str:
    """Runs create_model in-process (then HQQ or GPTQ for those algorithms, GPTQ on the
    `calibration` token ids); returns what the builder printed. `extra`: more KEY=VALUE
    options (nodes_to_exclude lists are joined)."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    printed = io.StringIO()
    precision = builder_precision(build)
    with tempfile.TemporaryDirectory(prefix="grove-builder-cache-") as cache, \
            contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        options = parse_extra_options(str(source), str(source), str(target), precision,
                                      build.execution_provider, cache,
                                      merge_options(builder_options(build, trust_remote_code), extra))
        create_model(str(source), str(source), str(target), precision, build.execution_provider,
                     cache, **options)
        if build.algo in quantization.POST_BUILD:
            calibration_quantize(target, build, calibration)
    return printed.getvalue()


def merge_options(options: list[str], extra: list[str]) -> list[str]:
    merged = dict(option.split("=", 1) for option in options)
    for key, value in (option.split("=", 1) for option in extra):
        merged[key] = f"{merged[key]},{value}" if key == "nodes_to_exclude" and key in merged else value
    return [f"{k}={v}" for k, v in merged.items()]
