"""Deployments against the real Prefect server of the test session: prefect.yaml through
`grove deploy` (schedules read back through the API), bad deployment input, and a run of
the flow served by `grove serve` on the tiny model with S3 (SeaweedFS) storage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT, tiny_config
from processes import stop_group
from prefect_http import prefect_http
from flows.cli import app

runner = CliRunner()


def flat(output: str) -> str:
    return " ".join(output.split())


def deployments(api: str) -> dict[str, dict]:
    found = prefect_http.post(f"{api}/deployments/filter", json={}, timeout=30).json()
    return {d["name"]: d for d in found}


def test_prefect_yaml_creates_both_deployments_and_the_nightly_cron(prefect_api):
    result = runner.invoke(app, ["deploy", "--file", str(ROOT / "prefect.yaml")])
    assert result.exit_code == 0, result.output
    found = deployments(prefect_api)
    assert {"grove-optimize", "grove-nightly"} <= set(found)
    nightly = found["grove-nightly"]
    schedule = nightly["schedules"][0]["schedule"]
    assert schedule["cron"] == "0 2 * * *" and schedule["timezone"] == "UTC" and nightly["schedules"][0]["active"]
    assert nightly["parameters"]["config"] == "configs/smollm2-tone-nightly.json"
    assert nightly["work_pool_name"] == "grove-process"
    assert not found["grove-optimize"]["schedules"]


@pytest.mark.parametrize("change, message", [
    (lambda d: d["parameters"].update(confg="x.json"), "deployments[0].parameters.confg: unknown parameter (did you mean 'config'?)"),
    (lambda d: d.update(schedules=[{"cron": "0 2 * *"}]), "deployments[0].schedules[0].cron: Invalid cron string"),
    (lambda d: d.update(schedules=[{"cron": "0 2 * * *", "timezone": "Mars/Base"}]), "unknown timezone 'Mars/Base'"),
    (lambda d: d["parameters"].update(from_stage="build"), "deployments[0].parameters.from_stage: unknown stage 'build'"),
])
def test_bad_deployment_input_is_refused_before_deploying(prefect_api, tmp_path, change, message):
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    change(spec["deployments"][0])
    spec["deployments"][0]["parameters"]["config"] = str(ROOT / "configs" / "smollm2-tone.json")
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["deploy", "--file", str(path)])
    assert result.exit_code == 2 and message in flat(result.output), result.output


def test_served_flow_runs_when_triggered_with_s3_storage(s3_env, prefect_api, tiny_model, tone_copy, tmp_path,
                                                         write_config):
    config = write_config(tiny_config(tiny_model, tone_copy, "s3://grove-tests/served", tmp_path / "out"))
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    server = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--config", str(config), "--cron",
                               "30 3 * * *", "--timezone", "Europe/Paris", "--name", "served-test"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "served-test" not in deployments(prefect_api):
            assert time.monotonic() < deadline and server.poll() is None, server.stdout.read()
            time.sleep(1)
        served = deployments(prefect_api)["served-test"]
        assert served["schedules"][0]["schedule"]["cron"] == "30 3 * * *"
        assert served["schedules"][0]["schedule"]["timezone"] == "Europe/Paris"
        run = prefect_http.post(f"{prefect_api}/deployments/{served['id']}/create_flow_run", json={}, timeout=30).json()
        deadline = time.monotonic() + 600
        while True:
            state = prefect_http.get(f"{prefect_api}/flow_runs/{run['id']}", timeout=30).json()["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert time.monotonic() < deadline, f"flow run still {state}"
            time.sleep(2)
        if state != "COMPLETED":
            os.killpg(server.pid, signal.SIGINT)
            pytest.fail(f"served run ended {state}:\n{server.communicate(timeout=30)[0][-4000:]}")
        report = json.loads((tmp_path / "out" / "tiny" / "report.json").read_text())
        assert [s["status"] for s in report["stages"]] == ["ran"] * 7
        assert report["artifact_root"] == "s3://grove-tests/served"
    finally:
        stop_group(server, signal.SIGINT, timeout=30)


@pytest.mark.parametrize("change, message", [
    (lambda c: c["data_configs"][0]["load_dataset_config"]["params"].update(data_files="incoming/*.jsonl"),
     "data_configs.tone_train.load_dataset_config.params.data_files: no files match incoming/*.jsonl"),
    (lambda c: c["grove"].update(promotion={"metric": "accuracy"}),
     "grove.promotion.metric: unknown gate metric 'accuracy'"),
])
def test_a_deployed_config_with_no_data_or_an_unknown_gate_metric_is_refused(prefect_api, tmp_path, change, message):
    raw = json.loads((ROOT / "configs" / "smollm2-tone.json").read_text())
    raw["data_configs"][0]["load_dataset_config"]["params"]["data_files"] = str(ROOT / "configs" / "data" / "tone.jsonl")
    change(raw)
    (tmp_path / "nightly.json").write_text(json.dumps(raw))
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    spec["deployments"] = [spec["deployments"][1]]
    spec["deployments"][0]["parameters"]["config"] = str(tmp_path / "nightly.json")
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["deploy", "--file", str(tmp_path / "prefect.yaml")])
    assert result.exit_code == 2 and message in flat(result.output), result.output
