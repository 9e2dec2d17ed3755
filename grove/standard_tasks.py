"""Standard benchmarks (grove.evaluate.lm_eval_tasks) through lm-evaluation-harness.

The PyTorch models are scored as evaluate holds them (lm-eval's `hf` model around the loaded
model), the shipped ONNX folder through lm-eval's own onnxruntime-genai backend (0.4.13):
what fine-tuning and quantization cost in general ability, on the same tasks and documents.
Seeds are fixed, so a rerun scores the same documents the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from grove.settings import LmEvalSettings

# grove.ship: adapter: lm-eval's onnxruntime-genai backend loads a model folder, never an adapter
NO_ADAPTER = "not run: lm-eval's onnxruntime-genai backend cannot load an adapter (grove.ship: adapter)"


def run_tasks(settings: LmEvalSettings, model: Any, model_args: dict[str, Any] | None = None) -> dict[str, dict]:
    """{task: {metric: value}}: lm-eval's numbers without their standard errors and filters."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(settings.tasks),
                                  limit=settings.limit, task_manager=TaskManager(include_path=settings.include_path,
                                                                       include_defaults=settings.builtin),
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    return {task: {name.split(",")[0]: round(float(value), 4) for name, value in result.items()
                   if "," in name and "_stderr" not in name and isinstance(value, (int, float))}
            for task, result in out["results"].items()}


def pytorch_scores(settings: LmEvalSettings, model, tokenizer, batch_size: int) -> dict[str, dict]:
    from lm_eval.models.huggingface import HFLM

    return run_tasks(settings, HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size))


def onnx_scores(settings: LmEvalSettings, folder: Path) -> dict[str, dict]:
    return run_tasks(settings, "onnxruntime-genai", {"pretrained": str(folder)})
