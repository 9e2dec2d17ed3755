"""grove.promotion -> PromotionSettings: the quality gate a new model passes to become current."""

from __future__ import annotations

import re

from flows.config.errors import ConfigError, did_you_mean
from flows.config.grove_section import GrovePromotion
from grove.settings import PROMOTION_METRICS, PromotionSettings


def promotion_settings(section: GrovePromotion, name: str, has_builder: bool,
                        has_merge: bool) -> PromotionSettings | None:
    where = "grove.promotion"
    if not section.enabled:
        return None
    if not section.model_fields_set:  # defaults only: fit them to the passes instead of refusing
        if not (has_builder or has_merge):
            return None
        if not has_builder:
            section = section.model_copy(update={"metric": "fine_tuned_accuracy"})
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
                             min_gain_over_base=section.min_gain_over_base)
