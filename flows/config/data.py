"""data_configs -> DataSettings and CorpusSettings: where the rows are, and how they become text."""

from __future__ import annotations

import hashlib
import re
import string
from dataclasses import dataclass
from typing import Any

from flows.config.errors import ConfigError, did_you_mean, validate
from flows.config.fates import known_keys, sift
from flows.config.olive import STRATEGIES, DataConfig, LoadParams, ParamsConfig06, PreProcessParams
from flows.config.sources import DATA_FORMATS, Sources, file_columns, format_of
from grove.settings import CorpusSettings, DataSettings

LOADERS = (None, "huggingface_dataset")
PRE_PROCESSORS = (None, "text_generation_huggingface_pre_process")


@dataclass
class Data:
    """One data config, read: its files and its text rendering."""

    name: str
    where: str
    files: list[str]
    split: str
    pre: PreProcessParams
    pre_where: str
    format: str  # from data_name; each listed file's suffix must agree
    template: str
    cols: list[str]
    label_col: str | None


def data_configs(raw: Any, sources: Sources, warn) -> dict[str, Data]:
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise ConfigError("data_configs", "must be a list of data configs")
    found: dict[str, Data] = {}
    for index, item in enumerate(raw):
        where = f"data_configs[{index}]"
        item = sift("data_configs[]", item, where, warn) if isinstance(item, dict) else item
        spec = validate(DataConfig, item, where, known_keys("data_configs[]"))
        where = f"data_configs.{spec.name}"
        if spec.type != "HuggingfaceContainer":
            raise ConfigError(f"{where}.type", f"unsupported data container {spec.type!r}; use HuggingfaceContainer")
        if spec.params_config is not None:
            load_where, pre_where = f"{where}.params_config", f"{where}.params_config.component_kwargs.pre_process_data"
            params = validate(ParamsConfig06, sift("load_dataset", spec.params_config, load_where, warn), load_where,
                              known_keys("load_dataset"))
            pre_raw = (params.component_kwargs or {}).get("pre_process_data") or {}
            load = LoadParams(**params.model_dump(exclude={"component_kwargs"}))
        else:
            load_where, load_raw = _params_level(spec.load_dataset_config, f"{where}.load_dataset_config")
            pre_where, pre_raw = _params_level(spec.pre_process_data_config, f"{where}.pre_process_data_config")
            if load_raw is None:
                raise ConfigError(f"{where}.load_dataset_config", "is required")
            load = validate(LoadParams, sift("load_dataset", load_raw, load_where, warn), load_where,
                            known_keys("load_dataset"))
        pre = validate(PreProcessParams, sift("pre_process", pre_raw or {}, pre_where, warn), pre_where,
                       known_keys("pre_process"))
        if load.type not in LOADERS:
            raise ConfigError(f"{load_where}.type", f"unsupported loader {load.type!r}; Grove loads data files "
                                                    f"(huggingface_dataset)")
        if pre.type not in PRE_PROCESSORS:
            raise ConfigError(f"{pre_where}.type", f"unsupported pre-processing {pre.type!r}; Grove builds a "
                                                   f"text-generation corpus (text_generation_huggingface_pre_process)")
        if load.data_name not in DATA_FORMATS:
            raise ConfigError(f"{load_where}.data_name", f"unsupported data_name {load.data_name!r}: Grove reads "
                                                         f"local or fsspec files with data_name json, csv or parquet "
                                                         f"(hub datasets cannot be fetched here)")
        files = sources.data_files(load.data_files, load.data_dir, load.subset, load_where)
        _check_format(load.data_name, files, f"{load_where}.data_name", sources)
        template, cols, label = _rendering(pre, pre_where, files[0])
        found[spec.name] = Data(spec.name, where, files, load.split, pre, pre_where, DATA_FORMATS[load.data_name],
                                template, cols, label)
    return found


FORMAT_NAMES = {"json": "JSON", "csv": "CSV", "parquet": "parquet"}


def _check_format(data_name: str, files: list[str], at: str, sources: Sources) -> None:
    """data_name and each listed file's extension name one format: a .jsonl file under data_name
    parquet would otherwise be read by its extension, against what the config says."""
    wanted = DATA_FORMATS[data_name]
    for path in files:
        if "://" in path and not sources.list_remote_data:
            continue  # not listed yet (deploy-time checks): the run checks it
        suffix = path.rsplit(".", 1)[-1].lower()
        found = DATA_FORMATS.get(suffix)
        if found is not None and found != wanted:
            raise ConfigError(at, f"{data_name!r}, but {path} is {FORMAT_NAMES[found]} by its .{suffix} extension; "
                                  f"set data_name {found}, or give {FORMAT_NAMES[wanted]} files")


def _params_level(raw: dict | None, where: str) -> tuple[str, dict | None]:
    """Olive accepts options under `params` or directly in the section (`type` next to either)."""
    if raw is None:
        return where, None
    if "params" in raw:
        extra = set(raw) - {"params", "type"}
        if extra:
            raise ConfigError(f"{where}.{sorted(extra)[0]}", "unexpected next to `params`; put it inside `params`")
        return f"{where}.params", {**raw["params"], **({"type": raw["type"]} if "type" in raw else {})}
    return where, raw


def _rendering(pre: PreProcessParams, where: str, first_file: str) -> tuple[str, list[str], str | None]:
    """The text template, its columns (checked against the first local file) and the label column."""
    if pre.dataset_type != "corpus":
        raise ConfigError(f"{where}.dataset_type", f"unsupported dataset_type {pre.dataset_type!r}; Grove "
                                                   f"builds a training corpus (dataset_type: corpus)")
    cols = [pre.text_cols] if isinstance(pre.text_cols, str) else list(pre.text_cols or [])
    template = pre.text_template
    if template is None:
        if len(cols) != 1:
            raise ConfigError(f"{where}.text_template", "is required unless exactly one text column is given")
        template = "{" + cols[0] + "}"
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"{where}.text_template", f"is not a valid template: {exc}") from None
    for field in fields:
        if not re.fullmatch(r"\w+", field):
            raise ConfigError(f"{where}.text_template", f"placeholder {{{field}}} must be a plain column name")
    if not cols:
        cols = list(dict.fromkeys(fields))
    for field in fields:
        if field not in cols:
            raise ConfigError(f"{where}.text_template", f"uses {{{field}}} but text_cols lists only {cols}")
    columns = file_columns(first_file)
    if columns == []:
        raise ConfigError(f"{where}.text_cols", f"{first_file} holds no records to read column {cols[0]!r} from "
                                                f"(an empty file?)")
    if columns is not None:
        for col in cols:
            if col not in columns:
                raise ConfigError(f"{where}.text_cols", f"column {col!r} is not in {first_file}"
                                                        f"{did_you_mean(col, columns)}; it has {columns}")
    match = re.search(r"\{(\w+)\}\s*$", template)
    label = match.group(1) if match and template[: match.start()].strip() else None
    if label and label in fields[:-1]:  # every score would measure copying, not answering
        raise ConfigError(f"{where}.text_template", f"uses the answer column {{{label}}} in the prompt too, before "
                                                    f"its end: the model would be shown the answer it is asked for")
    return template, cols, label


def data_settings(train: Data, eval_data: Data | None, eval_size: float, seed: int, sources: Sources) -> DataSettings:
    # a remote location not listed yet (deploy-time checks) has no suffix to check: data_name says
    every = train.files + (eval_data.files if eval_data else [])
    listed = [f for f in every if sources.list_remote_data or "://" not in f]
    formats = {format_of(f, train.where) for f in listed} or {train.format}
    if len(formats) > 1:
        raise ConfigError(f"{train.where}.load_dataset_config", f"the data files mix formats {sorted(formats)}; "
                                                                f"one location must hold one format")
    digests = [sources.digest(f) for f in every]
    return DataSettings(
        name=train.name, files=train.files, format=formats.pop(), split=train.split,
        eval_files=eval_data.files if eval_data else None, eval_size=eval_size, seed=seed,
        text_cols=train.cols, text_template=train.template, label_col=train.label_col,
        max_samples=train.pre.max_samples,
        content_sha256=hashlib.sha256("".join(digests).encode()).hexdigest(),
    )


def corpus_settings(train: Data, eval_data: Data | None, completion_only_loss: bool) -> CorpusSettings:
    pre, where = train.pre, train.pre_where
    strategy = _one_of(pre, "corpus_strategy", "strategy", where)
    if strategy is not None and strategy not in STRATEGIES:
        raise ConfigError(f"{where}.{'strategy' if pre.strategy else 'corpus_strategy'}",
                          f"unsupported strategy {strategy!r}; Grove builds {', '.join(STRATEGIES)} corpora")
    given = {"corpus_strategy": strategy, "source_max_len": _one_of(pre, "source_max_len", "max_seq_len", where),
             "add_special_tokens": pre.add_special_tokens, "random_seed": pre.random_seed}
    # an eval data config with its own pre-processing renders the eval rows its own way
    own_eval = eval_data is not None and eval_data.template != train.template
    return CorpusSettings(
        text_template=train.template, text_cols=train.cols, pad_to_max_len=pre.pad_to_max_len,
        completion_only_loss=completion_only_loss, label_col=train.label_col,
        eval_text_template=eval_data.template if own_eval else None,
        eval_label_col=eval_data.label_col if own_eval else None,
        **{k: v for k, v in given.items() if v is not None},  # unset: CorpusSettings' defaults
    )


def _one_of(pre: PreProcessParams, olive06: str, olive013: str, where: str):
    """The 0.6 and the 0.13 name of one option: either, or both when they agree."""
    a, b = getattr(pre, olive06), getattr(pre, olive013)
    if a is not None and b is not None and a != b:
        raise ConfigError(f"{where}.{olive013}", f"conflicts with {olive06} ({a!r} vs {b!r}); give one of them")
    return a if a is not None else b
