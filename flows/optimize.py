"""The Grove flow: an Olive recipe as seven cached Prefect tasks.

`pipeline` is the DAG and nothing else; `optimize` is the Prefect flow around it
(validate, open the store, run the stages, publish the final model and report);
`plan` walks the same DAG without running anything, to say which stages would hit
the cache and why the others would not.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from prefect import flow

from flows.compare import flat_settings, run_metrics, shipped_name
from flows.config import ConfigError, check_from_stage, load_config  # noqa: F401 - cli imports check_from_stage here
from flows.config import config_as_run
from flows.report import publish
from flows.runs import RunLog
from flows.ui import PrefectArtifacts, name_flow_run
from tasks.benchmark import benchmark
from tasks.build_onnx.stage import build_onnx, search_quantization
from tasks.evaluate import evaluate
from tasks.load_data import load_data
from tasks.merge_adapters import merge_adapters
from tasks.promote import already_current, promote
from grove.settings import RunConfig
from grove.result_storage import prefect_result_storage
from grove.stage import ArtifactRef, RunContext, StageRecord, stage_run
from grove.store import ArtifactStore
from tasks.template_corpus import template_corpus
from tasks.train import train

# Display hooks (progress bars) set by the CLI; a deployment run has none.
observers: ContextVar[dict[str, Any]] = ContextVar("grove_observers", default={})


def display_hooks() -> dict[str, Any]:
    """The CLI's hooks. The flow reads them through this function, never the ContextVar itself:
    a served flow is pickled by value, and a ContextVar cannot be pickled."""
    return dict(observers.get())


def pipeline(cfg: RunConfig) -> dict[str, ArtifactRef | None]:
    """load -> template -> train -> evaluate -> merge -> build ONNX -> benchmark."""
    data = load_data(cfg.data)
    corpus = template_corpus(cfg.corpus, data, cfg.model)
    adapter = train(cfg.train, corpus, cfg.model) if cfg.train else None
    scores = evaluate(cfg.evaluate, data, corpus, cfg.model, adapter)
    merged = merge_adapters(cfg.model, adapter) if cfg.merge else None
    shipped = adapter if cfg.ship == "adapter" else None  # base + adapter instead of a merged model
    if cfg.search:  # several candidate builds, one kept (grove.quantization_search)
        onnx = search_quantization(cfg.search, cfg.evaluate, cfg.benchmark, cfg.model, merged, data, scores,
                                   adapter=shipped, corpus=corpus)
    else:
        onnx = build_onnx(cfg.build, cfg.evaluate, cfg.model, merged, data, adapter=shipped, corpus=corpus,
                          scores=scores) if cfg.build else None
    bench = benchmark(cfg.benchmark, cfg.evaluate, cfg.model, merged, onnx, data)
    return {"load_data": data, "template_corpus": corpus, "train": adapter, "evaluate": scores,
            "merge_adapters": merged, "build_onnx": onnx, "benchmark": bench}


@flow(name="grove-optimize")
def optimize(config: str, from_stage: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run an Olive run config (JSON/YAML path) as Grove's seven cached stages, then promote
    the new model if it passes the config's quality gate. `overrides`: `key.path=value` set on
    the config's keys (`grove run ... key=value`), recorded in the run record."""
    check_from_stage(from_stage)
    cfg = load_config(config, overrides=overrides)
    name_flow_run(cfg.name)
    store = ArtifactStore(cfg.artifact_root, cfg.aws_credentials_block)
    store.check_writable()
    hooks = display_hooks()
    # the config as run, by key path (grove diff), with any secret the store's access knows taken out
    settings = {key: store.access.scrub(value)
                for key, value in flat_settings(config_as_run(config, overrides)).items()}
    run_log = RunLog(store, cfg.name, config, from_stage, overrides=list(overrides or []), settings=settings)
    show_start, show_end = hooks.pop("on_stage_start", None), hooks.pop("on_stage_end", None)

    def stage_started(stage: str) -> None:
        run_log.started_stage(stage)
        if show_start:
            show_start(stage)

    def stage_ended(record: StageRecord) -> None:
        run_log.add(record)
        if show_end:
            show_end(record)

    context = RunContext(store=store, model_name=cfg.name, device=cfg.device, credentials_block=cfg.aws_credentials_block,
                         checkpoint_steps=cfg.checkpoint_steps,
                         from_stage=from_stage, retries=cfg.retries,
                         result_storage=prefect_result_storage(store), on_stage_start=stage_started,
                         on_stage_end=stage_ended, publisher=PrefectArtifacts(cfg.name), **hooks)
    if cfg.placement:  # each stage group on its work pool, as child flow runs
        from flows.placement import Dispatcher, PoolMachines

        context.machine_of = PoolMachines(store, cfg.placement)  # keys from the pools' machine facts
        context.route = Dispatcher(config, cfg, context, context.machine_of, overrides).route
    try:
        with stage_run(context):
            refs = pipeline(cfg)
            promotion = None
            if cfg.promotion is not None:
                # Tags cost a concurrency-slot round trip (~2 s of a cached rerun here); a model that
                # is current already moves nothing, like a cache hit, which also runs untagged.
                tags = set() if already_current(store, cfg.promotion, refs) else \
                    {"grove", "stage:promote", f"model:{cfg.name}"}
                promotion = promote.with_options(tags=tags)(cfg.promotion, refs, run_log.run_id, config)
        run_log.promotion = promotion
        summaries = {stage: ref.summary for stage, ref in refs.items() if ref is not None}
        run_log.metrics, run_log.shipped = run_metrics(summaries), shipped_name(summaries)
        result = publish(cfg, refs, context.records, store, promotion, run_log.run_id)
    except BaseException as exc:
        run_log.finish("failed", store.access.scrub(f"{type(exc).__name__}: {exc}"))
        raise
    run_log.finish("completed")
    return {**result, "run_id": run_log.run_id}


def plan(config: str, from_stage: str | None = None, overrides: list[str] | None = None,
         loaded: RunConfig | None = None) -> list[StageRecord]:
    """Which stages a run would take from the cache, and why the others would run (`loaded`: the
    config already read with these overrides)."""
    check_from_stage(from_stage)
    cfg = loaded or load_config(config, overrides=overrides)
    store = ArtifactStore(cfg.artifact_root, cfg.aws_credentials_block)
    store.exists()  # an unreachable or denied store: one line now, not retried lookups
    context = RunContext(store=store, device=cfg.device, from_stage=from_stage, dry_run=True)
    if cfg.placement:
        from flows.placement import PoolMachines

        context.machine_of = PoolMachines(store, cfg.placement)
    with stage_run(context):
        pipeline(cfg)
    return context.records
