"""A ModelBuilder pass (and grove.quantization_search) -> BuildSettings / SearchSettings: the one
place the builder's options are read from a config; flows/config/build_rules.py checks them."""

from __future__ import annotations

from typing import Any

from flows.config.build_rules import QuantOptionError, parse_build
from flows.config.errors import ConfigError, Warnings, validate
from flows.config.fates import known_keys, sift
from flows.config.grove_section import GroveBuild, GroveCandidate, GroveSearch
from flows.config.input_model import accelerator_providers
from flows.config.olive import ModelBuilderPass, QLoraPass
from grove.settings import BuildSettings, Candidate, DataSettings, ModelSettings, SearchSettings


def execution_provider(engine_providers: list[str] | None, systems: dict) -> str:
    """cuda when the engine or a system's accelerator names the CUDA execution provider, or an
    accelerator is a gpu that names none (Olive then picks CUDAExecutionProvider)."""
    eps = list(engine_providers or [])
    for system in systems.values():
        for acc in (system.get("accelerators") or (system.get("config") or {}).get("accelerators") or []):
            eps = eps or accelerator_providers(acc)
    return "cuda" if any("CUDA" in str(ep) for ep in eps) else "cpu"


def build_settings(pass_config: dict[str, Any], where: str, provider: str, model: ModelSettings,
                   grove: GroveBuild | None = None, warn=None) -> BuildSettings:
    """What Grove builds for a ModelBuilder pass's options (`where`: its key path) on `provider`,
    with Grove's per-provider defaults (grove.build). Public: benches build Grove's defaults."""
    grove = grove or GroveBuild()
    pass_config = sift("passes.ModelBuilder", pass_config, where, warn or Warnings())
    spec = validate(ModelBuilderPass, pass_config, where, known_keys("passes.ModelBuilder"),
                    elsewhere={"LoRA/QLoRA pass": QLoraPass})
    inherited = {}
    if provider == "cuda" and "enable_cuda_graph" not in spec.extra_options and spec.enable_cuda_graph is None:
        # measured on an H200 (Phi-3-mini shape, int4): CUDA graphs lift batch-1 decode ~30%
        inherited["enable_cuda_graph"] = "true" if grove.cuda_graph else "false"
    if provider == "cuda" and _block_size_unset(spec) and _divides_model(grove.cuda_block_size, model):
        # measured on an H200 (Phi-3-mini shape): block 128 decodes ~8% faster than 32 in a 8% smaller
        # model; on the bundled SmolLM2 it scored 0.758 against 32's 0.733
        # (bench/README.md: Training throughput and decode speed)
        spec = spec.model_copy(update={"int4_block_size": grove.cuda_block_size})
    return _checked(spec, provider, model, where, inherited)


def _block_size_unset(spec: ModelBuilderPass) -> bool:
    return (spec.precision == "int4" and "int4_block_size" not in spec.model_fields_set
            and "block_size" not in spec.extra_options)


def _divides_model(block_size: int, model: ModelSettings) -> bool:
    """Whether the block size divides the model's hidden and intermediate sizes: k_quant fails
    to build on a partial block (seen: SmolLM2's 960 with block 128)."""
    from grove.models import model_config

    config = model_config(model) or {}
    sizes = [config.get(key) for key in ("hidden_size", "intermediate_size")]
    return all(isinstance(size, int) and size % block_size == 0 for size in sizes)


def _checked(spec: ModelBuilderPass | GroveCandidate, provider: str, model: ModelSettings, where: str,
             inherited: dict[str, str] | None = None) -> BuildSettings:
    from grove.models import model_config

    raw = spec.model_dump()
    raw["extra_options"] = {**(inherited or {}), **spec.extra_options}
    try:
        return parse_build(raw, set(spec.model_fields_set), provider, model_config(model))
    except QuantOptionError as exc:
        raise ConfigError(f"{where}.{exc.path}", exc.message) from None


def search_settings(search: GroveSearch, build: BuildSettings | None, model: ModelSettings,
                    data: DataSettings) -> SearchSettings:
    """grove.quantization_search: the candidates, each checked like a ModelBuilder pass."""
    where = "grove.quantization_search"
    if build is None:
        raise ConfigError(where, "needs a ModelBuilder pass (the candidates are its variants)")
    metric = search.tolerance_metric if search.tolerance_metric != "auto" else \
        "accuracy" if data.label_col else "eval_loss"
    if metric == "accuracy" and not data.label_col:
        raise ConfigError(f"{where}.tolerance_metric", "accuracy needs a label column: the data's text_template "
                                                       "must end with it (e.g. '...{tone}') and grove.evaluate.answer be "
                                                       "label; or use eval_loss or kl "
                                                       "(teacher-forced, any data)")
    if search.candidates in ("builtin", "ladder"):
        from flows.config.candidates import builtin_candidates, ladder_candidates
        from grove.models import model_config

        pairs = (builtin_candidates if search.candidates == "builtin" else ladder_candidates)(
            build, model_config(model))
    else:
        pairs, seen = [], set()
        for index, candidate in enumerate(search.candidates):
            at = f"{where}.candidates[{index}]"
            if candidate.name in seen:
                raise ConfigError(f"{at}.name", f"duplicate candidate name {candidate.name!r}")
            seen.add(candidate.name)
            pairs.append((candidate.name, _checked(candidate, build.execution_provider, model, at,
                                                   inherited=build.extra_options)))
        if not pairs:
            raise ConfigError(f"{where}.candidates", "lists no candidates; give some or write \"builtin\"")
    early_stop = search.candidates == "ladder" if search.early_stop is None else search.early_stop
    return SearchSettings(candidates=[Candidate(name=n, build=b) for n, b in pairs], tolerance_metric=metric,
                          tolerance_points=search.tolerance_points, max_loss_increase=search.max_loss_increase,
                          max_kl=search.max_kl, early_stop=early_stop)


def plain_int4(builder_body: dict | None, build: BuildSettings | None) -> bool:
    """A ModelBuilder pass that sets only `precision: int4`: Grove picks its quantization."""
    if build is None or build.precision != "int4":
        return False
    return not set((builder_body or {}).keys()) - {"precision", "type"}


def default_search(section: GroveSearch | None, builder_body: dict | None,
                   build: BuildSettings | None) -> GroveSearch | None:
    """The search a config asks for; without one, the ladder (early stop) for a plain int4 build, on
    either provider (its own rungs, scored as served there): the builder's default int4 lost 16
    points on the bundled model on the CPU and 10 on CUDA. With a label the rungs are judged by
    accuracy, without one by teacher-forced eval loss (grove/teacher_forcing.py)."""
    if section is not None:
        return section if section.enabled else None
    if not plain_int4(builder_body, build):
        return None
    return GroveSearch(candidates="ladder")


def adapter_base_build(builder_body: dict | None, build: BuildSettings, model: ModelSettings) -> BuildSettings:
    """grove.ship: adapter with the search turned off: on a plain int4 pass the base is the
    provider's ladder's first rung (the builder's default int4 lost 16 points on the bundled model
    on the CPU and 10 on CUDA)."""
    if not plain_int4(builder_body, build):
        return build
    from flows.config.candidates import ladder_candidates
    from grove.models import model_config

    return ladder_candidates(build, model_config(model))[0][1]
