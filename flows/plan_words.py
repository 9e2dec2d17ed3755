"""What a run will build and when it promotes, in words: `grove validate`, `grove stages` and
`--resolved` name the build candidates (a search's, the default ladder's rungs included) and the
gate's rules with their values, so what is said is what runs (flows/config/candidates.py,
tasks/promote.py)."""

from __future__ import annotations

from typing import Any

from grove.settings import BuildSettings, PromotionSettings, RunConfig
from tasks.build_onnx.search import METRICS, tolerance_words


def build_words(build: BuildSettings) -> str:
    """One build in a few words: precision, then what differs from the builder's defaults."""
    parts = [build.precision]
    if build.precision in ("int4", "int8"):
        parts.append(f"block {build.block_size}")
        parts.append("symmetric" if build.is_symmetric else "zero points")
        if build.algo != "default":
            parts.append(build.algo)
        parts += [f"{where} {kind}" for where, kind in build.mixed_precision.items()]
    parts.append(build.execution_provider)
    return " ".join(parts)


def build_plan(cfg: RunConfig) -> dict[str, Any]:
    """The candidates build_onnx may ship, in build order, and how one is chosen."""
    if cfg.search is not None:
        search = cfg.search
        candidates = [c.name for c in search.candidates]
        metric = search.tolerance_metric
        # eval_loss and kl (data without a label): the words of the search's verdict (tasks/build_onnx/search.py)
        within = f"within {search.tolerance_points:g} accuracy points of the PyTorch model it is built from" \
            if metric == "accuracy" else tolerance_words(search.tolerance, metric)
        best = "most accurate" if metric == "accuracy" else f"lowest {METRICS[metric][0]}"
        rule = (f"built in this order; the first {within} ships (else the {best})" if search.early_stop else
                f"all built; the smallest {within} ships (else the {best})")
        return {"candidates": candidates, "rule": rule, "key": "grove.quantization_search"}
    if cfg.build is not None:
        return {"candidates": [build_words(cfg.build)], "rule": "the one build ships", "key": "passes (ModelBuilder)"}
    return {"candidates": [], "rule": "no ONNX build", "key": "passes"}


def _pts(fraction: float) -> str:
    return f"{fraction * 100:g} points"


def promotion_rules(gate: PromotionSettings | None, fine_tuned: bool, accuracy: bool = True) -> list[str]:
    """The gate's rules with their values, in the order tasks/promote.py checks them: the accuracy
    rules where accuracy is measured (a label column, not free-text answers) and judged on, else the
    teacher-forced eval loss or KL rule of its tolerance_metric."""
    if gate is None:
        return []
    rules = [f"{gate.metric} >= {gate.min:g} (min)"]
    accuracy = accuracy and gate.tolerance_metric == "accuracy"
    if accuracy:
        rules.append(f"shipped accuracy at most {_pts(gate.max_drop_from_fine_tuned)} below the model it was built "
                     f"from (max_drop_from_fine_tuned)")
    elif gate.tolerance_metric == "eval_loss":
        rules.append(f"shipped eval loss at most {gate.max_loss_increase_from_fine_tuned:g} nats per token above "
                     f"the model it was built from (max_loss_increase_from_fine_tuned)")
    elif gate.tolerance_metric == "kl":
        rules.append(f"shipped mean KL from the model it was built from at most {gate.max_kl_from_fine_tuned:g} "
                     f"(max_kl_from_fine_tuned)")
    if accuracy and fine_tuned:
        rules.append(f"shipped accuracy at least {_pts(gate.min_gain_over_base)} above the base model "
                     f"(min_gain_over_base)")
    rules.append(f"{gate.metric} at most {gate.max_drop:g} below the current {gate.model_name} (max_drop)")
    return rules


def _accuracy_measured(cfg: RunConfig) -> bool:
    return bool(cfg.evaluate.label_col) and cfg.evaluate.answer == "label"


def plan_of(cfg: RunConfig) -> dict[str, Any]:
    """The plan as `--resolved` prints it beside the settings."""
    return {"build": build_plan(cfg),
            "promotion": {"model_name": cfg.promotion.model_name if cfg.promotion else None,
                          "rules": promotion_rules(cfg.promotion, cfg.train is not None, _accuracy_measured(cfg))}}


def plan_lines(cfg: RunConfig) -> list[str]:
    """Two lines: what build_onnx builds and ships, and when the result becomes current."""
    build = build_plan(cfg)
    if build["candidates"]:
        names = " -> ".join(build["candidates"]) if len(build["candidates"]) > 1 else build["candidates"][0]
        lines = [f"build:   {names}: {build['rule']} ({build['key']})"]
    else:
        lines = ["build:   no ONNX build"]
    if cfg.promotion is None:
        lines.append("promote: no promotion (grove.promotion)")
    else:
        lines.append(f"promote: {cfg.promotion.model_name} becomes current if "
                     + "; ".join(promotion_rules(cfg.promotion, cfg.train is not None, _accuracy_measured(cfg)))
                     + " (grove.promotion)")
    return lines
