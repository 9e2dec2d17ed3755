"""Placement: each group of adjacent stages runs on the Prefect work pool `grove.placement` names.

Built on Prefect deployments: `grove deploy` creates, for every pool a placement names, the pool
(process type when missing) and a deployment `grove-stages/<pool>` of `run_stages`, the flow of
one stage group. The parent flow (`grove-optimize`, wherever it runs) walks the same pipeline as
a one-pool run; when a stage must run (no stored entry, or forced by --from-stage) it starts its
whole group on that group's pool with `run_deployment` and waits. Prefect links the child flow
run to the parent (the UI shows it under the parent run). Only artifact references travel, as
JSON parameters one way and as a small document in the store the other way; the artifacts
themselves move through the s3:// store (flows/config refuses a placement without one).

Why deployments and not Prefect's infrastructure-bound flows (`@kubernetes(work_pool=...)`,
`bind_flow_to_infrastructure`): calling a bound flow starts a worker inside the caller, so the
caller's machine must be able to launch the pool's infrastructure, and a process pool would run
the stage on the caller's machine; it also ships the flow as a pickled bundle through storage
configured per pool (`prefect work-pool storage configure`), a beta feature in Prefect 3.9.
Deployments work with every pool type, including process pools served by their own workers,
and run the code installed where the worker runs. A worker whose code differs from the parent's
is refused (each stage's code version travels with the group), so a stale GPU image fails fast.

Machine facts (grove/machine_facts.py: library versions, device, `train.processes: auto`, the
benchmark's machine) are part of each stage's key and are resolved where the stage runs, never
where the config is parsed: the parent needs none of its pools' hardware. Each child run stores
its machine's profile as `machines/<pool>.json`; the parent computes a pool's keys from the
profile stored there (no profile yet: the group is dispatched) and takes what a child returns by
stage name. A profile is trusted only while it is current: taken under the pool's present setup
(its base job template and the stage deployment's job variables, e.g. the image) and less than a
day old; otherwise the group is dispatched and the child keys its stages on its own machine.

Caching: a group whose stages are all stored is never dispatched (the parent takes the entries
from the store, as a one-pool run does), so a cached rerun starts no child run at all. Retries:
each stage's task retries inside the child as in a one-pool run; a child run that crashed
(its worker or machine died) is started again on the same pool, up to the group's largest
`retries`; entries stored before the crash are reused by the new child.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from prefect import flow

from grove.settings import RunConfig
from grove.stage import DEFAULT_RETRIES, STAGES, ArtifactRef, RunContext, StageRecord

GROUP_FLOW = "grove-stages"
ENTRYPOINT = "flows/placement.py:run_stages"
RECORDS = "placed"  # store folder of the records each child run leaves for its parent
MACHINES = "machines"  # store folder of each pool's machine profile, left by its child runs
POLL_SECONDS = 1.0  # how often the parent asks whether a child run has finished
# A pool's profile older than this is not trusted: its group is dispatched once (a child run that
# finds its entries costs seconds) and the child stores a fresh one. A day: a nightly run refreshes.
PROFILE_MAX_AGE_S = 24 * 3600


class GroupDone(Exception):
    """Raised in a child run at the first stage after its group: the rest is another pool's."""


def groups(placement: dict[str, str]) -> list[tuple[str, tuple[str, ...]]]:
    """Adjacent stages on the same pool, in pipeline order: [(pool, stages), ...]."""
    found: list[tuple[str, tuple[str, ...]]] = []
    for stage in STAGES:
        pool = placement[stage]
        if found and found[-1][0] == pool:
            found[-1] = (pool, found[-1][1] + (stage,))
        else:
            found.append((pool, (stage,)))
    return found


def pools(placement: dict[str, str]) -> list[str]:
    return sorted(set(placement.values()))


CRASH_AUTOMATION = "grove: crash silent flow runs"
# Prefect's flow runs send a heartbeat every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (180 by default);
# three missed in a row mark the run Crashed, and the parent starts its group again.
DEFAULT_CRASH_AFTER = 3 * 180


def ensure_crash_automation(within_seconds: float = DEFAULT_CRASH_AFTER) -> bool:
    """Prefect's zombie-flow automation: a child run whose machine died stops sending heartbeats
    and would stay Running forever; this marks it Crashed so the parent can retry its group.
    One per Prefect server (by name); True when created or replaced now."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        existing = Automation.read(name=CRASH_AUTOMATION)
    except ValueError:
        existing = None
    if existing is not None:
        if existing.trigger.within == timedelta(seconds=within_seconds):
            return False
        existing.delete()  # another crash delay asked for: replaced
    Automation(
        name=CRASH_AUTOMATION,
        description="Grove placement: a flow run silent for this long lost its machine",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=within_seconds)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {within_seconds:.0f} s: its machine went away")],
    ).create()
    return True


def deployment_name(pool: str) -> str:
    return f"{GROUP_FLOW}/{pool}"


def code_versions() -> dict[str, str]:
    """Each stage's code version as this process has it (what its cache keys are made of)."""
    from tasks.benchmark import benchmark
    from tasks.build_onnx.stage import build_onnx
    from tasks.evaluate import evaluate
    from tasks.load_data import load_data
    from tasks.merge_adapters import merge_adapters
    from tasks.template_corpus import template_corpus
    from tasks.train import train

    stages = (load_data, template_corpus, train, evaluate, merge_adapters, build_onnx, benchmark)
    return {stage.stage_name: stage.code_version for stage in stages}


def _record_json(record: StageRecord) -> dict[str, Any]:
    body = dataclasses.asdict(record)
    body["ref"] = record.ref.model_dump(mode="json") if record.ref else None
    return body


def _record(body: dict[str, Any]) -> StageRecord:
    ref = ArtifactRef.model_validate(body["ref"]) if body.get("ref") else None
    return StageRecord(**{**body, "ref": ref})


def pool_setup(pool: str) -> str | None:
    """A digest of how Prefect starts this pool's child runs: the pool's type and base job template
    and the stage deployment's job variables (the image of a docker or kubernetes pool, its env).
    A new image rolled out by changing either gives a new digest. None: the API cannot say."""
    import hashlib
    import json

    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            work_pool = client.read_work_pool(pool)
            deployment = client.read_deployment_by_name(deployment_name(pool))
    except Exception:  # no server, no such pool or deployment yet: nothing to compare with
        return None
    setup = {"type": work_pool.type, "template": work_pool.base_job_template,
             "job_variables": deployment.job_variables}
    return hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:16]


def profile_is_current(profile: dict[str, Any], setup: str | None, now: float) -> bool:
    """Whether a pool's stored profile still describes its machines: taken under the pool's present
    setup (when known) and younger than PROFILE_MAX_AGE_S (a process pool's machines can be
    upgraded in place, which no setup shows)."""
    if setup is not None and profile.get("pool_setup") != setup:
        return False
    return now - float(profile.get("written_at", 0)) < PROFILE_MAX_AGE_S


class PoolMachines:
    """RunContext.machine_of for a placed run's parent (and its plan): each stage's pool's profile
    as its last child run stored it, read once per run; None for a pool that has not reported,
    or whose profile is no longer current (its setup changed, or it is too old): that pool's
    groups are dispatched and the child keys them on its own machine."""

    def __init__(self, store, placement: dict[str, str]):
        self.store, self.placement = store, placement
        self.profiles: dict[str, dict[str, Any] | None] = {}
        self.setups: dict[str, str | None] = {}

    def __call__(self, stage: str) -> dict[str, Any] | None:
        import time

        pool = self.placement[stage]
        if pool not in self.profiles:
            profile = self.store.get_json(f"{MACHINES}/{pool}.json")
            current = profile is not None and profile_is_current(profile, self.setup(pool), time.time())
            self.profiles[pool] = {**profile, "pool": pool} if current else None
        return self.profiles[pool]

    def setup(self, pool: str) -> str | None:
        """pool_setup, asked of the API once per run: the profile check and the dispatch of the
        pool's groups compare with the same value."""
        if pool not in self.setups:
            self.setups[pool] = pool_setup(pool)
        return self.setups[pool]


class Dispatcher:
    """The parent side: RunContext.route for a placed run."""

    def __init__(self, config: str, cfg: RunConfig, context: RunContext, machines: PoolMachines,
                 overrides: list[str] | None = None):
        # the child's worker reads the same file: absolute, as its working folder may differ
        self.config = config if "://" in config else str(Path(config).resolve())
        self.cfg, self.context, self.machines = cfg, context, machines
        self.overrides = list(overrides or [])  # the child applies them to the file as the parent did
        self.groups = groups(cfg.placement)
        self.results: dict[str, StageRecord] = {}  # stage -> what a child run did
        self.dispatched: set[int] = set()
        self.versions = code_versions()

    def route(self, stage: str, stored: ArtifactRef | None) -> StageRecord:
        """Every stage of a placed run is its pool's: found in the store for the key the pool's
        facts give (a hit, as in a one-pool run), or run there by the group's child run."""
        if stage in self.results:
            return self.results[stage]
        if stored is not None:
            return StageRecord(stage, "cached", ref=stored)
        index = next(i for i, (_, stages) in enumerate(self.groups) if stage in stages)
        if index in self.dispatched:
            raise RuntimeError(f"{stage}: the {self.groups[index][0]} pool's run did not return it")
        self.dispatched.add(index)
        for record in self.dispatch(*self.groups[index]):
            self.results[record.stage] = record
        if stage not in self.results:
            raise RuntimeError(f"{stage}: the {self.groups[index][0]} pool's run did not return it")
        return self.results[stage]

    def dispatch(self, pool: str, stages: tuple[str, ...]) -> list[StageRecord]:
        from prefect.deployments import run_deployment

        # upstream artifacts by stage: the child's keys for them are its machine's, not ours
        given = {r.stage: r.ref.model_dump(mode="json") for r in self.context.records if r.ref is not None}
        parameters = {"config": self.config, "stages": list(stages), "given": given, "pool": pool,
                      "setup_digest": self.machines.setup(pool),
                      "from_stage": self.context.from_stage, "code": {s: self.versions[s] for s in stages},
                      "overrides": self.overrides}
        attempts = 1 + max(self._retries(stage) for stage in stages)
        label = "+".join(stages)
        for attempt in range(1, attempts + 1):
            child = run_deployment(deployment_name(pool), parameters=parameters, poll_interval=POLL_SECONDS,
                                   flow_run_name=f"{self.cfg.name}: {label} on {pool}",
                                   tags=["grove", f"pool:{pool}", f"model:{self.cfg.name}"])
            state = child.state
            if state is not None and state.is_completed():
                break
            kind = state.type.value if state is not None else "UNKNOWN"
            if kind in ("CRASHED", "CANCELLED") and attempt < attempts:
                continue  # the machine, not the stage, failed: start the group again on the same pool
            message = state.message if state is not None else ""
            raise RuntimeError(f"stages {label} on work pool {pool}: child run {child.id} ended {kind}: {message}")
        store = self.context.store
        body = store.get_json(f"{RECORDS}/{child.id}.json")
        if body is None:
            raise RuntimeError(f"stages {label} on work pool {pool}: child run {child.id} left no records in "
                               f"{store.root}/{RECORDS}")
        store.remove(f"{RECORDS}/{child.id}.json")
        return [_record(r) for r in body]

    def _retries(self, stage: str) -> int:
        retry = self.cfg.retries.get(stage)
        return retry.retries if retry else DEFAULT_RETRIES[stage][0]


@flow(name=GROUP_FLOW)
def run_stages(config: str, stages: list[str], given: dict[str, dict[str, Any]], from_stage: str | None = None,
               code: dict[str, str] | None = None, overrides: list[str] | None = None,
               pool: str | None = None, setup_digest: str | None = None) -> dict[str, Any]:
    """Run one group of adjacent stages of a placed run on this work pool (started by the parent
    flow through run_deployment); upstream artifacts are the references in `given`, by stage, and
    the config is the parent's file with the parent's command-line `overrides` set again. This
    machine's profile is stored for the parent (machines/<pool>.json) before any stage runs, with
    the digest of the pool's setup the parent dispatched under (`setup_digest`) and the time."""
    import time

    from prefect.runtime import flow_run

    from flows.config import load_config
    from flows.optimize import pipeline
    from flows.ui import PrefectArtifacts
    from grove.machine_facts import this_machine
    from grove.result_storage import prefect_result_storage
    from grove.stage import stage_run
    from grove.store import ArtifactStore

    mine = code_versions()
    stale = sorted(s for s, version in (code or {}).items() if mine.get(s) != version)
    if stale:
        raise ValueError(f"this worker's Grove code differs from the parent run's for {', '.join(stale)}: "
                         f"deploy the same Grove version on every pool")
    # the machine checks of this group's stages only
    cfg = load_config(config, overrides=overrides, here=stages)
    store = ArtifactStore(cfg.artifact_root, cfg.aws_credentials_block)
    if pool is not None:
        store.put_json(f"{MACHINES}/{pool}.json", {**this_machine(), "pool_setup": setup_digest,
                                                    "written_at": time.time()})
    refs = {stage: ArtifactRef.model_validate(ref) for stage, ref in given.items()}

    def route(stage: str, stored: ArtifactRef | None) -> StageRecord | None:
        if stage in stages:
            return None
        if stage in refs:
            return StageRecord(stage, "given", ref=refs[stage])
        raise GroupDone(stage)

    context = RunContext(store=store, model_name=cfg.name, device=cfg.device,
                         credentials_block=cfg.aws_credentials_block, checkpoint_steps=cfg.checkpoint_steps,
                         from_stage=from_stage, retries=cfg.retries, result_storage=prefect_result_storage(store),
                         route=route, publisher=PrefectArtifacts(cfg.name),
                         machine_of=lambda stage: this_machine() if stage in stages else None)
    with stage_run(context):
        try:
            pipeline(cfg)
        except GroupDone:
            pass
    records = [_record_json(r) for r in context.records if r.stage in stages]
    store.put_json(f"{RECORDS}/{flow_run.get_id()}.json", records)
    return {"stages": stages, "ran": [r["stage"] for r in records if r["status"] == "ran"]}
