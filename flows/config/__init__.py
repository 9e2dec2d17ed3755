"""The run config: Olive run configs (both dialects) plus Grove's own `grove` section -> RunConfig.

Validated once, at the door, before any work starts; everything downstream receives the typed
`RunConfig` built here, never the raw dict. Every problem is a one-line `ConfigError` naming the
key path (e.g. `passes.lora.config.lora_r`) and, for a typo, the closest valid key. What Grove
does with each Olive key is one table: flows/config/fates.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import yaml

from flows.config.checks import check_run_config
from flows.config.build import adapter_base_build, build_settings, default_search, execution_provider, search_settings
from flows.config.data import corpus_settings, data_configs, data_settings
from flows.config.errors import ConfigError, Warnings, check_keys, did_you_mean, validate
from flows.config.lm_eval import lm_eval_settings
from flows.config.fates import known_keys, sift
from flows.config.grove_section import GrovePlacement, GroveSection
from flows.config.input_model import check_systems, model_settings
from flows.config.overrides import apply_overrides, blame, parse_override
from flows.config.olive import TOP_KEYS, Engine, PassLevel
from flows.config.plausible import check_training
from flows.config.promotion import promotion_settings
from flows.config.ship import check_adapter_ship
from flows.config.training import lora_pass, train_settings, training_argument_names
from grove.settings import BenchmarkSettings, EvalSettings, RetrySettings, RunConfig
from grove.stage import STAGES

__all__ = ["ConfigError", "Engine", "GroveSection", "load_config", "config_as_run", "read_config_file",
           "parse_config", "build_settings",
           "check_from_stage", "training_argument_names"]
DEFAULT_ARTIFACT_ROOT = ".grove-cache"  # with neither grove.artifact_root nor engine.cache_dir, under the cwd
SUPPORTED_PASSES = ("LoRA", "QLoRA", "MergeAdapterWeights", "ModelBuilder")
ENGINE_KEYS = set(known_keys("engine"))


def load_config(path: str | Path, base_dir: Path | None = None, list_remote_data: bool = True,
                warnings: list[str] | None = None, overrides: list[str] | None = None,
                here: Iterable[str] | None = None) -> RunConfig:
    """Read a JSON or YAML run config and validate all of it (`warnings` collects every warning).
    `overrides`: `key.path=value` from the command line, set on the file's keys before validation
    (flows/config/overrides.py); an error they cause says so.

    Data locations are listed and their files hashed here, at the start of every run.
    `list_remote_data=False` (deploy-time checks) leaves s3:// locations to the run: the
    machine deploying may not hold the keys the worker has. `here`: the stages this machine
    runs, whose hardware and runtimes are checked (default: every stage, none for a placed
    config, whose parent only dispatches; a placed child names its group)."""
    path = Path(path)
    raw = read_config_file(path)
    applied = None
    try:
        if overrides:
            applied = apply_overrides(raw, [parse_override(text) for text in overrides])
            raw = applied.raw
        config = parse_config(raw, base_dir=base_dir or Path.cwd(), config_dir=path.parent.resolve(),
                              list_remote_data=list_remote_data, warnings=warnings)
        # what the machine must offer, and every data file read through, before any work
        if here is None:
            here = () if config.placement else STAGES
        return check_run_config(config, raw, str(path), on_this_machine=list_remote_data, here=frozenset(here),
                                warn=Warnings(warnings))
    except ConfigError as exc:
        exc = blame(exc, applied)
        raise ConfigError(exc.path, exc.message, exc.source or str(path)) from None


def read_config_file(path: str | Path) -> Any:
    """The config file as written (JSON or YAML), or a ConfigError saying why it cannot be read."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError("", f"{path} is a folder; --config takes a run config file (JSON or YAML)")
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # an editor's byte-order mark is not JSON
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError("", f"{path}:{line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); "
                              f"save the config as UTF-8") from None
    try:
        raw = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError("", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                          str(path)) from exc
    except yaml.YAMLError as exc:
        raise ConfigError("", f"invalid YAML: {exc}", str(path)) from exc
    return raw


def config_as_run(path: str | Path, overrides: list[str] | None = None) -> Any:
    """The raw config a run validated: the file with the command line's overrides set (already
    checked by load_config), as `grove diff` compares two runs' settings."""
    raw = read_config_file(path)
    return apply_overrides(raw, [parse_override(text) for text in overrides]).raw if overrides else raw


LM_EVAL_KEYS = ("lm_eval_tasks", "lm_eval_include", "lm_eval_limit")  # -> EvalSettings.lm_eval


def parse_config(raw: Any, base_dir: Path, config_dir: Path | None = None, list_remote_data: bool = True,
                 warnings: list[str] | None = None) -> RunConfig:
    from flows.config.sources import Sources

    warn = Warnings(warnings)
    # dialect: older Olive configs put engine keys at the top level
    if not isinstance(raw, dict):
        raise ConfigError("", "the config must be a JSON object")
    raw = sift("top", dict(raw), "", warn)
    check_keys(raw, TOP_KEYS | ENGINE_KEYS, "")
    engine_raw = dict(raw.get("engine") or {})
    for key in ENGINE_KEYS & set(raw):
        engine_raw.setdefault(key, raw.pop(key))

    # schema: each section validated, warned and refused keys taken out (flows/config/fates.py)
    engine = validate(Engine, sift("engine", engine_raw, "engine", warn), "engine", known_keys("engine"))
    grove = validate(GroveSection, raw.get("grove") or {}, "grove")
    sources = Sources(base_dir, config_dir or base_dir, grove.aws_credentials_block, list_remote_data)
    systems = check_systems(raw.get("systems") or {}, engine, warn)
    model = model_settings(raw.get("input_model"), sources, warn)
    data = data_configs(raw.get("data_configs"), sources, warn)
    passes = _passes(raw.get("passes"), warn)

    # per-stage settings
    lora, merges, builders = _pass_order(passes)
    name = grove.name or raw.get("workflow_id") or engine.output_name or "grove-model"
    train, train_data, eval_data, eval_size = None, next(iter(data.values()), None), None, 0.3
    if lora:
        _, (kind, cfg, where) = lora
        spec = lora_pass(kind, cfg, where, warn)
        train_data, eval_data, eval_size = _train_data(spec, where, data)
        train = train_settings(kind, spec, where, grove, warn, model.adapter_path)
        train = check_training(train, f"{where}.training_args", model, grove.device, grove.placement is not None,
                               list_remote_data, warn)
    elif model.adapter_path is not None:
        raise ConfigError("input_model.adapter_path", "needs a LoRA or QLoRA pass: Grove trains further from "
                                                      "the adapter (to ship it as it is, merge it into the base "
                                                      "yourself and name the merged folder as the model)")
    elif not data:
        raise ConfigError("data_configs", "at least one data config is needed (Grove evaluates on its eval split)")
    data_s = data_settings(train_data, eval_data, eval_size, grove.seed, sources)
    corpus = corpus_settings(train_data, eval_data, grove.completion_only_loss)
    if grove.evaluate.answer == "text":
        if not (corpus.eval_label_col or corpus.label_col):
            raise ConfigError("grove.evaluate.answer", "is text, but the data's text_template does not end with "
                                                       "the answer column (e.g. '...### JSON:\n{json}'): there "
                                                       "is no answer to generate and compare")
        data_s = data_s.model_copy(update={"label_col": None})  # free text: no label to count, search or gate on
    provider = execution_provider(engine.execution_providers, systems)
    build = build_settings(builders[1][1], builders[1][2], provider, model, grove.build, warn) if builders else None
    search_section = default_search(grove.quantization_search, builders[1][1] if builders else None, build)
    if grove.ship == "adapter" and build is not None and search_section is None:
        build = adapter_base_build(builders[1][1], build, model)
    search = search_settings(search_section, build, model, data_s) if search_section else None
    if grove.ship == "adapter":
        check_adapter_ship(train, lora[1][2] if lora else None, build,
                           builders[1][2] if builders else None, search, ConfigError)
    for stage in grove.retries:
        if stage not in STAGES:
            raise ConfigError(f"grove.retries.{stage}", f"unknown stage{did_you_mean(stage, STAGES)}; "
                                                        f"stages are: {', '.join(STAGES)}")
    config = RunConfig(
        name=name,
        placement=placement_of(grove.placement, sources.storage(grove.artifact_root or engine.cache_dir
                                                                 or DEFAULT_ARTIFACT_ROOT)),
        artifact_root=sources.storage(grove.artifact_root or engine.cache_dir or DEFAULT_ARTIFACT_ROOT),
        aws_credentials_block=grove.aws_credentials_block,
        output_dir=sources.storage(engine.output_dir or "grove-output"),
        retries={stage: RetrySettings(**r.model_dump()) for stage, r in grove.retries.items()},
        device=grove.device,
        seed=grove.seed,
        checkpoint_steps=grove.checkpoint_steps,
        model=model,
        data=data_s,
        corpus=corpus,
        train=train,
        evaluate=EvalSettings(**grove.evaluate.model_dump(exclude=set(LM_EVAL_KEYS)),
                              lm_eval=lm_eval_settings(grove.evaluate, sources),
                              text_template=corpus.eval_text_template or data_s.text_template,
                              label_col=corpus.eval_label_col or corpus.label_col),
        merge=bool(merges) and grove.ship == "merged",  # an adapter ships unmerged
        ship=grove.ship,
        build=build,
        search=search,
        benchmark=BenchmarkSettings(**grove.benchmark.model_dump()),  # its machine: a fact of its key
        promotion=promotion_settings(grove.promotion, name, bool(builders), bool(merges),
                                     grove.evaluate.answer == "label" and bool(corpus.eval_label_col or data_s.label_col)),
    )
    return config


def placement_of(placement: GrovePlacement | None, artifact_root: str) -> dict[str, str]:
    """grove.placement as stage -> work pool for every stage ({} without one)."""
    if placement is None:
        return {}
    for stage, pool in placement.stages.items():
        if stage not in STAGES:
            raise ConfigError(f"grove.placement.stages.{stage}", f"unknown stage{did_you_mean(stage, STAGES)}; "
                                                                 f"stages are: {', '.join(STAGES)}")
        if not pool.strip():
            raise ConfigError(f"grove.placement.stages.{stage}", "names no work pool")
    if not artifact_root.startswith(("s3://", "s3a://")):
        raise ConfigError("grove.placement", f"stages on several work pools pass their artifacts through the store, "
                                             f"which must be s3:// (grove.artifact_root); have {artifact_root}")
    return {stage: placement.stages.get(stage, placement.default) for stage in STAGES}


def check_from_stage(from_stage: str | None, where: str = "from_stage", source: str | None = None) -> None:
    """--from-stage / a deployment's from_stage: one of the stages (the one check, used everywhere)."""
    if from_stage is not None and from_stage not in STAGES:
        raise ConfigError(where, f"unknown stage {from_stage!r}{did_you_mean(from_stage, STAGES)}; stages are: "
                                 f"{', '.join(STAGES)}", source)


def _passes(raw: Any, warn) -> list[tuple[str, tuple[str, dict, str]]]:
    if not raw:
        raise ConfigError("passes", "at least one pass is needed")
    if not isinstance(raw, dict):
        raise ConfigError("passes", "must be a mapping of pass name to pass config")
    result = []
    for name, item in raw.items():
        where = f"passes.{name}"
        if not isinstance(item, dict) or "type" not in item:
            raise ConfigError(where, "each pass needs a `type`")
        kind = item["type"]
        if kind not in SUPPORTED_PASSES:
            raise ConfigError(f"{where}.type", f"unsupported pass type {kind!r}{did_you_mean(kind, SUPPORTED_PASSES)}"
                                               f"; Grove runs {', '.join(SUPPORTED_PASSES)}")
        item = sift("passes.*", item, where, warn)
        if "config" in item:  # older dialect: options under `config`
            level = validate(PassLevel, item, where, known_keys("passes.*"))
            body, where = dict(level.config or {}), f"{where}.config"
        else:
            body = {k: v for k, v in item.items() if k != "type"}
        if kind == "MergeAdapterWeights":
            check_keys(sift(f"passes.{kind}", body, where, warn), (), where)
        result.append((name, (kind, body, where)))
    return result


def _pass_order(passes):
    found = {kind: [(n, p) for n, p in passes if p[0] in kinds] for kind, kinds in
             (("LoRA/QLoRA", ("LoRA", "QLoRA")), ("MergeAdapterWeights", ("MergeAdapterWeights",)),
              ("ModelBuilder", ("ModelBuilder",)))}
    for kind, entries in found.items():
        if len(entries) > 1:
            raise ConfigError(f"passes.{entries[1][0]}", f"only one {kind} pass is supported per run")
    lora, merges, builders = (next(iter(found[k]), None) for k in found)
    order = [n for n, _ in passes]
    if merges and not lora:
        raise ConfigError(f"passes.{merges[0]}", "MergeAdapterWeights needs a LoRA or QLoRA pass before it")
    if lora and builders and order.index(builders[0]) < order.index(lora[0]):
        raise ConfigError(f"passes.{builders[0]}", "ModelBuilder must come after the LoRA/QLoRA pass")
    if lora and builders and not merges:
        raise ConfigError("passes", "a ModelBuilder after LoRA/QLoRA needs a MergeAdapterWeights pass between them")
    return lora, merges, builders


def _train_data(spec, where: str, data: dict):
    """The pass's train and eval data configs, and the held-out size when there is no eval config."""
    train_name = spec.train_data_config
    if train_name is None:
        if not data:
            raise ConfigError(f"{where}.train_data_config", "is required (no data_configs defined)")
        train_name = next(iter(data))
    for key, ref in (("train_data_config", train_name), ("eval_data_config", spec.eval_data_config)):
        if ref is not None and ref not in data:
            raise ConfigError(f"{where}.{key}", f"refers to data config {ref!r}, which does not exist"
                                                f"{did_you_mean(ref, data)}; have: {', '.join(data) or 'none'}")
    eval_data = data[spec.eval_data_config] if spec.eval_data_config else None
    if eval_data is not None and eval_data.name == train_name:
        eval_data = None
    eval_size = spec.eval_dataset_size if spec.eval_dataset_size is not None else 0.3
    if eval_size >= 1 and eval_size != int(eval_size):
        raise ConfigError(f"{where}.eval_dataset_size", "must be a fraction below 1 or a whole number of rows")
    return data[train_name], eval_data, eval_size
