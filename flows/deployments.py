"""Deployments: check prefect.yaml before `prefect deploy`, and serve the flow on a schedule.

Checked before anything is created: each deployment's entrypoint is Grove's flow, its
parameters are ones the flow takes, its config validates, its from_stage exists, and its
crons and timezones parse. Errors name the place (`prefect.yaml: deployments[1].schedules[0].cron`).
"""

from __future__ import annotations

import difflib
import inspect
import zoneinfo
from pathlib import Path
from typing import Any

import yaml

from flows.config import ConfigError, check_from_stage, load_config

ENTRYPOINT = "flows/optimize.py:optimize"
WORK_POOL = "grove-process"


def flow_parameters() -> list[str]:
    from flows.optimize import optimize

    return list(inspect.signature(optimize.fn).parameters)


def check_schedule(cron: str, timezone: str, where: str, source: str) -> None:
    from prefect.schedules import validate_cron_string

    try:
        validate_cron_string(cron)
    except ValueError as exc:
        raise ConfigError(f"{where}.cron", f"{exc} (five fields: minute hour day month weekday)", source) from None
    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{where}.timezone", f"unknown timezone {timezone!r} (e.g. UTC, Europe/Paris)",
                          source) from None


def check_parameters(parameters: dict[str, Any], where: str, source: str, base_dir: Path) -> None:
    known = flow_parameters()
    for name in parameters:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}.{name}", f"unknown parameter{hint}; the flow takes: {', '.join(known)}",
                              source)
    if "config" not in parameters:
        raise ConfigError(f"{where}.config", "is required: the run config the deployment runs", source)
    check_from_stage(parameters.get("from_stage"), f"{where}.from_stage", source)
    overrides = parameters.get("overrides")
    if overrides is not None and (not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides)):
        raise ConfigError(f"{where}.overrides", "must be a list of \"key.path=value\" strings", source)
    config = Path(parameters["config"])
    # s3:// data is listed when each run starts, by the worker that holds the keys
    load_config(config if config.is_absolute() else base_dir / config, list_remote_data=False,
                overrides=overrides)


def check_prefect_yaml(path: Path) -> list[dict[str, Any]]:
    """The deployments of prefect.yaml, each checked; raises ConfigError on the first problem."""
    source = str(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError("", f"cannot read: {exc}", source) from None
    deployments = (spec or {}).get("deployments") or []
    if not deployments:
        raise ConfigError("deployments", "no deployments declared", source)
    for index, deployment in enumerate(deployments):
        where = f"deployments[{index}]"
        if deployment.get("entrypoint") != ENTRYPOINT:
            raise ConfigError(f"{where}.entrypoint", f"must be {ENTRYPOINT} (Grove's flow)", source)
        check_parameters(deployment.get("parameters") or {}, f"{where}.parameters", source, path.parent)
        for number, schedule in enumerate(deployment.get("schedules") or []):
            if "cron" in schedule:
                check_schedule(str(schedule["cron"]), schedule.get("timezone", "UTC"),
                               f"{where}.schedules[{number}]", source)
    return deployments


def placement_pools(deployments: list[dict[str, Any]], base_dir: Path) -> list[str]:
    """Every work pool the deployments' configs place a stage group on."""
    from flows.placement import pools

    found: set[str] = set()
    for deployment in deployments:
        config = Path(deployment["parameters"]["config"])
        cfg = load_config(config if config.is_absolute() else base_dir / config, list_remote_data=False,
                          overrides=deployment["parameters"].get("overrides"))
        found.update(pools(cfg.placement) if cfg.placement else ())
    return sorted(found)


def with_group_deployments(path: Path, group_pools: list[str]) -> str:
    """prefect.yaml plus a deployment of the stage-group flow on each placement pool (as YAML)."""
    from flows.placement import ENTRYPOINT as GROUP_ENTRYPOINT, GROUP_FLOW

    spec = yaml.safe_load(path.read_text())
    spec["deployments"] = list(spec["deployments"]) + [
        {"name": pool, "description": f"Grove stage groups placed on work pool {pool} ({GROUP_FLOW})",
         "entrypoint": GROUP_ENTRYPOINT, "tags": ["grove", "placement"], "work_pool": {"name": pool}}
        for pool in group_pools]
    return yaml.safe_dump(spec, sort_keys=False)


def serve(config: str, cron: str, timezone: str, name: str, from_stage: str | None = None) -> None:
    """Serve the flow with a cron schedule from this process (flow.serve: no work pool needed)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from flows.optimize import optimize

    parameters = {"config": str(Path(config).resolve()) if "://" not in config else config}
    if from_stage:
        parameters["from_stage"] = from_stage
    check_schedule(cron, timezone, "--cron", "grove serve")
    check_parameters(parameters, "parameters", "grove serve", Path.cwd())
    # By module path: the runner then imports flows.optimize by name in the run's process,
    # instead of pickling a copy of the flow loaded from its file.
    optimize.serve(name=name, schedules=[Cron(cron, timezone=timezone)], parameters=parameters,
                   tags=["grove"], description=f"Grove: {config} on {cron} ({timezone})",
                   entrypoint_type=EntrypointType.MODULE_PATH)
