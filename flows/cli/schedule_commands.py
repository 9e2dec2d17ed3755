"""`grove serve` and `grove deploy`: the flow on a schedule, from this process or as Prefect deployments."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from flows.cli.app import FROM_STAGE, app, console
from flows.cli.errors import clean_errors


@app.command()
def serve(config: str = typer.Option(..., "--config", "-c", help="Run config (path or URL) the schedule runs."),
          cron: str = typer.Option("0 2 * * *", help="When to run (cron, five fields)."),
          timezone: str = typer.Option("UTC", help="Timezone of the cron schedule."),
          name: str = typer.Option("grove-nightly", help="Deployment name."),
          from_stage: Optional[str] = FROM_STAGE) -> None:
    """Serve the flow on a schedule from this process (no work pool needed); Ctrl-C stops it."""
    from flows.deployments import serve as serve_flow

    with clean_errors():
        serve_flow(config, cron, timezone, name, from_stage)


@app.command()
def deploy(prefect_yaml: Path = typer.Option(Path("prefect.yaml"), "--file", help="The deployments file."),
           pool: str = typer.Option("grove-process", help="Process work pool to create if missing."),
           crash_after: float = typer.Option(
               None, min=30, help="With a placement: seconds without a heartbeat after which a child flow run "
                                  "counts as crashed and its group starts again (default: 3 heartbeats)")) -> None:
    """Check prefect.yaml, create the process work pool if missing, then `prefect deploy --all`."""
    import subprocess

    import tempfile

    from flows.deployments import check_prefect_yaml, placement_pools, with_group_deployments

    with clean_errors():
        deployments = check_prefect_yaml(prefect_yaml)
        group_pools = placement_pools(deployments, prefect_yaml.resolve().parent)
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    env = dict(os.environ)
    for name in [pool, *group_pools]:
        pools = subprocess.run(prefect + ["work-pool", "inspect", name], capture_output=True, text=True, env=env)
        if pools.returncode != 0:
            console.print(f"creating process work pool {name}")
            subprocess.run(prefect + ["work-pool", "create", name, "--type", "process"], check=True, env=env,
                           capture_output=True)
    with tempfile.TemporaryDirectory() as folder:
        # the stage-group deployments of every placement pool join prefect.yaml's, in one deploy
        spec = Path(folder) / "prefect.yaml"
        spec.write_text(with_group_deployments(prefect_yaml, group_pools))
        done = subprocess.run(prefect + ["deploy", "--all", "--prefect-file", str(spec)],
                              cwd=prefect_yaml.resolve().parent, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        console.print(done.stdout[-3000:] + done.stderr[-3000:], highlight=False, markup=False)
        raise typer.Exit(1)
    if group_pools:
        from flows.placement import DEFAULT_CRASH_AFTER, ensure_crash_automation

        ensure_crash_automation(crash_after or DEFAULT_CRASH_AFTER)
    names = ", ".join([d["name"] for d in deployments] + [f"grove-stages/{p}" for p in group_pools])
    console.print(f"deployed {names}; start a worker on each pool: prefect worker start --pool NAME "
                  f"({', '.join([pool, *group_pools])})")
