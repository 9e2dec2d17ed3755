"""What every stage shares: the cache key, the artifact reference, the Prefect task options.

A stage is a plain function decorated with `@grove_stage("name")`. It receives its typed
settings and references to upstream artifacts, writes its files into `output_dir()`, and
returns a small summary dict. The decorator does the rest, once for all stages:

- the cache key (grove/cache.py): sha256 of the stage name, the source of the stage's module
  and of every project module it imports, its settings and the content digests (never the
  paths or timestamps) of its upstream artifacts (together: the settings key), and the facts of
  the machine that runs it (grove/machine_facts.py: library versions, device, dtype);
- the store: a complete entry for that key is a hit; otherwise the stage runs and its
  folder is stored with the manifest written last; the manifest records the settings it ran with;
- Prefect: each stage is a task whose cache key is the same key and whose result is the
  small `ArtifactRef`, so a cached rerun moves kilobytes.
- checkpoints: a long stage (train) may store checkpoints under its own key
  (`current_stage_key()`) while it runs; they are dropped once its entry is stored.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import shutil
import tempfile
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from pydantic import BaseModel

from grove.cache import code_digest, machine_key, settings_record, stage_key
from grove.machine_facts import differences, stage_facts, this_machine
from grove.store import ArtifactStore, Entry
from grove.store.artifacts import recording_reads

STAGES = ("load_data", "template_corpus", "train", "evaluate", "merge_adapters", "build_onnx", "benchmark")


# Retries per stage unless the config's grove.retries says otherwise: (retries, delay seconds).
# Every stage moves files through the store, so each gets at least one retry for a dropped
# connection; training gets a longer pause (it resumes from its last checkpoint).
DEFAULT_RETRIES = {"load_data": (2, 5), "template_corpus": (1, 5), "train": (1, 30), "evaluate": (1, 10),
                   "merge_adapters": (1, 10), "build_onnx": (1, 10), "benchmark": (1, 10)}


def worth_retrying(exc: BaseException) -> bool:
    """Only errors another try can fix: not a bad config, a missing input, a denied store."""
    from grove.store import StoreError

    if isinstance(exc, StoreError):
        return exc.transient
    return not isinstance(exc, (ValueError, TypeError, KeyError, AttributeError, NotImplementedError,
                                MissingStageError, StageFailed, FileNotFoundError, PermissionError))


class StageFailed(RuntimeError):
    """A stage's own check failed (e.g. a built model that does not load): a retry gives
    the same answer, so none is made."""


class MissingStageError(RuntimeError):
    """--from-stage S needs every stage before S stored already."""


class ArtifactRef(BaseModel):
    """What a stage returns: where its output is stored and what it found, never the model."""

    stage: str
    key: str
    digest: str  # of the manifest: names exactly this stored artifact
    content: str = ""  # of the files alone: what downstream cache keys depend on
    uri: str
    size_bytes: int = 0
    summary: dict[str, Any] = {}

    def key_form(self) -> dict[str, str]:
        """How downstream keys see this artifact: by its contents, not its location or time."""
        return {"artifact": self.stage, "content": self.content}

    @property
    def pending(self) -> bool:
        """A placeholder used while planning: this stage has not run yet."""
        return self.digest.startswith("pending:")


@dataclass
class StageRecord:
    stage: str
    status: str  # ran | cached | hit | miss (the last two when planning)
    seconds: float = 0.0
    reason: str = ""
    ref: ArtifactRef | None = None


class Publisher(Protocol):
    """What a run shows beside its results (flows/ui.py: the Prefect UI's tables and progress).

    The flow hands one to the stages through the RunContext, so no stage imports display code:
    a stage's key covers every module it imports (grove/cache.py), and showing a result can
    never change it, so an edit to the display must not rerun a stage. Called inside the
    stage's task run (the UI lists the artifacts under it); a failure to show is the
    publisher's to swallow."""

    def stage_summary(self, stage: str, summary: dict[str, Any]) -> None: ...

    def training_started(self) -> None: ...

    def training_step(self, step: int, total: int) -> None: ...

    def training_ended(self, log_history: list[dict[str, Any]]) -> None: ...


@dataclass
class RunContext:
    """Per-run state the stages need that is not part of any cache key."""

    store: ArtifactStore
    model_name: str = "grove"  # in task tags and UI artifact keys
    device: str = "auto"
    credentials_block: str | None = None  # where s3:// keys come from (env when None)
    checkpoint_steps: int = 0  # a stage that checkpoints (train) does so every N steps; 0: never
    from_stage: str | None = None
    dry_run: bool = False
    records: list[StageRecord] = field(default_factory=list)
    result_storage: Any = None  # a saved Prefect storage block; None when planning
    retries: dict[str, Any] = field(default_factory=dict)  # stage -> RetrySettings from the config
    on_stage_start: Callable[[str], None] | None = None
    on_stage_end: Callable[[StageRecord], None] | None = None
    # progress inside a stage: (stage, done, total, details), e.g. training steps and loss
    on_progress: Callable[[str, int, int, dict], None] | None = None
    publisher: Publisher | None = None  # the Prefect UI's artifacts (set by the flow); None: nothing shown
    # placement (flows/placement.py): asked (stage, its stored ref or None) before a stage runs;
    # a record means the stage ran (or was found) on another work pool, None that it runs here
    route: Callable[[str, "ArtifactRef | None"], StageRecord | None] | None = None
    # the profile (grove/machine_facts.py) of the machine that runs a stage, whose facts are in
    # its key: None for this machine; a placed run's asks its pools' (None back: not known yet)
    machine_of: Callable[[str], dict[str, Any] | None] | None = None

    def machine_for(self, stage: str) -> dict[str, Any] | None:
        return self.machine_of(stage) if self.machine_of else this_machine()

    def forced(self, stage: str) -> bool:
        return self.from_stage is not None and STAGES.index(stage) >= STAGES.index(self.from_stage)


_run: ContextVar[RunContext | None] = ContextVar("grove_run", default=None)
_task_run_name: ContextVar[str | None] = ContextVar("grove_task_run_name", default=None)
_output: ContextVar[Path | None] = ContextVar("grove_stage_output", default=None)
_key: ContextVar[str | None] = ContextVar("grove_stage_key", default=None)


@contextlib.contextmanager
def stage_run(context: RunContext) -> Iterator[RunContext]:
    token = _run.set(context)
    try:
        yield context
    finally:
        _run.reset(token)


@contextlib.contextmanager
def task_run_name(name: str) -> Iterator[None]:
    """Names the Prefect task run of the stage called inside (e.g. one search candidate)."""
    token = _task_run_name.set(name)
    try:
        yield
    finally:
        _task_run_name.reset(token)


def pending_ref(stage: str) -> ArtifactRef:
    """A placeholder used while planning: this stage's output is not known yet."""
    return ArtifactRef(stage=stage, key="", digest=f"pending:{stage}", uri="")


def current_run() -> RunContext:
    context = _run.get()
    if context is None:
        raise RuntimeError("stages run inside a flow run (flows/optimize.py sets up the run context)")
    return context


def output_dir() -> Path:
    """The folder the running stage writes its outputs to; stored when the stage returns."""
    path = _output.get()
    if path is None:
        raise RuntimeError("output_dir() is only available inside a running stage")
    return path


def current_stage_key() -> str:
    """The running stage's cache key (what its checkpoints are stored under)."""
    key = _key.get()
    if key is None:
        raise RuntimeError("current_stage_key() is only available inside a running stage")
    return key


def open_artifact(ref: ArtifactRef) -> Path:
    """A local folder with an upstream stage's files (read-only: they may be hard links)."""
    store = current_run().store
    entry = store.by_digest(ref.digest, ref.stage, ref.key)  # exactly what the upstream stage returned
    if entry is None:
        raise RuntimeError(f"artifact {ref.stage}/{ref.key} is missing or damaged in {store.root}; "
                           f"rerun with --from-stage {ref.stage}")
    return store.materialize(entry)


def _ref(entry: Entry, store: ArtifactStore) -> ArtifactRef:
    return ArtifactRef(stage=entry.stage, key=entry.key, digest=entry.digest, content=entry.content,
                       uri=store.entry_uri(entry.stage, entry.key), size_bytes=entry.size_bytes,
                       summary=entry.manifest["meta"].get("summary", {}))


# ---- the decorator ---------------------------------------------------------------------------------
def grove_stage(name: str, tags: tuple[str, ...] = ()):
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}")

    def decorate(fn: Callable[..., dict[str, Any]]):
        signature = inspect.signature(fn)
        version = code_digest(fn.__module__)

        def params_of(args, kwargs) -> dict[str, Any]:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return dict(bound.arguments)

        def keys_of(params: dict[str, Any], machine: dict[str, Any] | None) -> tuple[str | None, str, dict | None]:
            """(key, settings key, facts) of this stage for these parameters on `machine`: the
            store's, Prefect's and the plan's key. No machine (a pool that has not reported its
            facts yet): no key."""
            settings = stage_key(name, version, params)
            if machine is None:
                return None, settings, None
            facts = stage_facts(name, current_run().device, params, machine)
            return machine_key(settings, facts), settings, facts

        def key_here(params: dict[str, Any]) -> str:
            """The key when the stage runs in this process: this machine's facts."""
            return keys_of(params, this_machine())[0]

        def run_stage(*args, **kwargs) -> ArtifactRef:
            run = current_run()
            params = params_of(args, kwargs)
            key, settings_key, facts = keys_of(params, this_machine())
            if not run.forced(name):
                entry = run.store.lookup(name, key)
                if entry is not None:  # stored already (e.g. by a run with another Prefect database)
                    ref = _ref(entry, run.store)
                    return ref.model_copy(update={"summary": {**ref.summary, "_reused": True}})
            out = Path(tempfile.mkdtemp(prefix=f"grove-{name}-"))
            token, key_token = _output.set(out), _key.set(key)
            try:
                with recording_reads() as opened:
                    summary = fn(*args, **kwargs) or {}
                if run.publisher is not None:
                    run.publisher.stage_summary(name, summary)
                meta = {"summary": summary, "code_version": version, "settings": settings_record(params),
                        "settings_key": settings_key, "machine": facts,
                        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        # every stored entry the stage opened (upstream artifacts, the shared
                        # adapter-ship base): gc keeps what a kept entry names here
                        "uses": sorted(opened.values(), key=lambda u: (u["stage"], u["key"], u["digest"]))}
                # --from-stage: the new result replaces the entry (else the first writer's stands)
                stored = run.store.put_dir(name, key, out, meta, replace=run.forced(name))
                ref = _ref(stored, run.store)
                _drop_checkpoints(run.store, name, key)
                return ref
            finally:
                _output.reset(token)
                _key.reset(key_token)
                shutil.rmtree(out, ignore_errors=True)

        run_stage.__signature__ = signature  # Prefect reads parameters from it
        run_stage.__name__ = run_stage.__qualname__ = name
        from prefect import task

        prefect_task = task(
            run_stage,
            name=name,
            cache_key_fn=lambda _context, parameters: key_here(parameters),
            persist_result=True,
            result_serializer="json",
            retry_jitter_factor=0.5,
            retry_condition_fn=lambda _task, _run, state: worth_retrying(_exception_of(state)),
            tags=["grove", f"stage:{name}", *tags],
        )

        @functools.wraps(fn)
        def call(*args, **kwargs) -> ArtifactRef:
            run = current_run()
            params = params_of(args, kwargs)
            machine = run.machine_for(name)
            key, settings_key, facts = keys_of(params, machine)
            upstream = [v for v in params.values() if isinstance(v, ArtifactRef) and v.pending]
            entry = None if run.forced(name) or upstream or key is None else run.store.lookup(name, key)
            # an unknown key (its pool's facts not reported yet) is the child run's to check
            if run.from_stage and not run.forced(name) and entry is None and key is not None and not run.dry_run:
                raise MissingStageError(
                    f"--from-stage {run.from_stage} reuses the stages before it, but {name} has no stored "
                    f"entry for this config in {run.store.root}; run without --from-stage (or from {name})")
            if run.dry_run:
                return _plan(run, name, key, entry, upstream, settings_key, facts, machine)
            if run.on_stage_start:
                run.on_stage_start(name)
            started = time.monotonic()
            routed = run.route(name, _ref(entry, run.store) if entry is not None else None) if run.route else None
            if routed is not None:
                run.records.append(routed)
                if run.on_stage_end:
                    run.on_stage_end(routed)
                return routed.ref
            retry = run.retries.get(name)
            retries, delay = (retry.retries, retry.delay_seconds) if retry else DEFAULT_RETRIES[name]
            options = {"refresh_cache": entry is None, "retries": retries, "retry_delay_seconds": delay}
            if run.result_storage:
                options["result_storage"] = run.result_storage
            if _task_run_name.get():
                options["task_run_name"] = _task_run_name.get()
            # Tags make the graph readable (stage, model) and let a concurrency limit on `gpu`
            # hold the model-heavy stages to one at a time. A hit does no work: without tags
            # Prefect skips its concurrency-slot calls (one API round trip each, most of a cached
            # rerun's time), and a cached train never queues behind another run's training.
            options["tags"] = set() if entry is not None else \
                {"grove", f"stage:{name}", f"model:{run.model_name}", *tags}
            state = prefect_task.with_options(**options)(*args, return_state=True, **kwargs)
            ref: ArtifactRef = state.result()
            cached = state.name == "Cached" or ref.summary.get("_reused", False)
            ref = ref.model_copy(update={"summary": {k: v for k, v in ref.summary.items() if k != "_reused"}})
            record = StageRecord(name, "cached" if cached else "ran", time.monotonic() - started,
                                 reason=_task_run_name.get() or "", ref=ref)
            run.records.append(record)
            if run.on_stage_end:
                run.on_stage_end(record)
            return ref

        call.task = prefect_task
        call.stage_name = name
        call.code_version = version
        return call

    return decorate


def _exception_of(state) -> BaseException:
    try:
        state.result(raise_on_failure=True)
    except BaseException as exc:  # noqa: BLE001 - the failure we are asked about
        return exc
    return RuntimeError("no exception")


def _drop_checkpoints(store: ArtifactStore, name: str, key: str) -> None:
    """Once the stage's entry is stored its checkpoints are dead weight; failing to drop
    them must not fail the stage."""
    try:
        store.drop_checkpoints(name, key)
    except Exception as exc:  # noqa: BLE001 - clean-up only
        import logging

        logging.getLogger("grove.store").warning("could not drop the checkpoints of %s/%s: %s", name, key, exc)


def _plan(run: RunContext, name: str, key: str | None, entry: Entry | None, upstream: list[ArtifactRef],
          settings_key: str, facts: dict | None, machine: dict | None) -> ArtifactRef:
    if entry is not None:
        ref = _ref(entry, run.store)
        run.records.append(StageRecord(name, "hit", reason="stored entry for this key", ref=ref))
        return ref
    if run.forced(name):
        reason = f"forced by --from-stage {run.from_stage}"
    elif upstream:
        reason = f"upstream {', '.join(sorted({u.stage for u in upstream}))} will run"
    elif key is None:
        reason = ("its work pool's machine facts are not known here (no child run there so far, or the "
                  "pool's setup changed or its profile is over a day old since the last one)")
    else:
        reason = _other_machine(run.store, name, settings_key, facts, (machine or {}).get("pool")) or \
            "no stored entry for this key (config, data, model or stage code changed, or first run)"
    run.records.append(StageRecord(name, "miss", reason=reason))
    return ArtifactRef(stage=name, key=key or "", digest=f"pending:{name}", uri="")


def _other_machine(store: ArtifactStore, name: str, settings_key: str, facts: dict, pool: str | None) -> str:
    """When the same settings are stored for other machine facts: how those facts differ
    (the newest such entry), e.g. "stored for transformers 5.16.0 on cuda; this machine has
    transformers 5.17.0 on cpu". Only a plan's miss pays for the listing."""
    same = [e for e in store.entries(name) if e.manifest["meta"].get("settings_key") == settings_key
            and e.manifest["meta"].get("machine") is not None]
    if not same:
        return ""
    newest = max(same, key=lambda e: e.manifest["meta"].get("created", ""))
    return differences(newest.manifest["meta"]["machine"], facts,
                       f"work pool {pool}" if pool else "this machine")
