"""grove.promotion -> PromotionSettings: the quality gate a new model passes to become current."""

from __future__ import annotations

import re

from flows.config.errors import ConfigError, did_you_mean
from flows.config.grove_section import GrovePromotion
from grove.settings import PROMOTION_METRICS, PromotionSettings


def default_metric(has_builder: bool, has_label: bool) -> str:
    """The gate metric when none is written: the shipped ONNX model's accuracy, or its teacher-forced
    agreement without a label; without a build, the merged model's accuracy, or chrF (free text)."""
    if has_builder:
        return "onnx_accuracy" if has_label else "onnx_token_agreement"
    return "fine_tuned_accuracy" if has_label else "fine_tuned_chrf"


def promotion_settings(section: GrovePromotion, name: str, has_builder: bool,
                        has_merge: bool, has_label: bool = True) -> PromotionSettings | None:
    """`has_label`: the eval data has a label column, so accuracies are measured; without one the
    gate judges the shipped model by teacher-forced eval loss (or KL) and token agreement."""
    where = "grove.promotion"
    if not section.enabled:
        return None
    written = section.model_fields_set  # before any default is filled in (a copy's update counts as set)
    if not written and not (has_builder or has_merge):  # defaults only, nothing to promote: no gate
        return None
    if "metric" not in written:  # the default fits the passes and the data instead of being refused
        section = section.model_copy(update={"metric": default_metric(has_builder, has_label)})
    elif not has_label and section.metric.endswith("_accuracy"):
        raise ConfigError(f"{where}.metric", f"{section.metric} needs a label column (the data's text_template "
                                             f"ending with it); without one use onnx_token_agreement "
                                             f"(with a ModelBuilder pass)")
    metric = section.tolerance_metric if section.tolerance_metric != "auto" else \
        "accuracy" if has_label else "eval_loss"
    if metric == "accuracy" and not has_label:
        raise ConfigError(f"{where}.tolerance_metric", "accuracy needs a label column (the data's text_template "
                                                       "ending with it); use eval_loss or kl")
    if section.metric not in PROMOTION_METRICS:
        raise ConfigError(f"{where}.metric", f"unknown gate metric {section.metric!r}"
                                             f"{did_you_mean(section.metric, PROMOTION_METRICS)}; "
                                             f"metrics are: {', '.join(PROMOTION_METRICS)}")
    stage = PROMOTION_METRICS[section.metric][0]
    if stage in ("build_onnx", "benchmark") and section.metric.startswith("onnx") and not has_builder:
        raise ConfigError(f"{where}.metric", f"{section.metric} needs a ModelBuilder pass; use "
                                             f"fine_tuned_accuracy or add one")
    if not (has_builder or has_merge):
        raise ConfigError(where, "promotion needs a model to promote (a MergeAdapterWeights or ModelBuilder "
                                 "pass); set grove.promotion.enabled to false")
    model_name = section.model_name or name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", model_name):
        at = f"{where}.model_name" if section.model_name else "grove.name"
        raise ConfigError(at, f"{model_name!r} cannot name a model in the store: use letters, digits, '.', '_' "
                              f"and '-' (set grove.promotion.model_name)")
    return PromotionSettings(model_name=model_name, metric=section.metric, min=section.min,
                             max_drop=section.max_drop, max_drop_from_fine_tuned=section.max_drop_from_fine_tuned,
                             min_gain_over_base=section.min_gain_over_base, tolerance_metric=metric,
                             max_loss_increase_from_fine_tuned=section.max_loss_increase_from_fine_tuned,
                             max_kl_from_fine_tuned=section.max_kl_from_fine_tuned)
