"""Nightly retraining and what the Prefect UI shows, against the session's real Prefect server
(UI included) with data and artifacts on the S3 server (SeaweedFS):

- the first night trains and promotes; its stages publish table and progress artifacts, its
  task runs carry stage/model/gpu tags, and its flow-run page (headless Chromium) shows the
  seven stages;
- a night with no new data reruns no stage; a new file under the data prefix retrains and
  promotes; a deliberately worse model is not promoted and the run still completes;
- a concurrency limit on the `gpu` tag holds training back until its slot is free;
- bad input (data location with no files, unknown gate metric) fails before any work.

The tiny model learns a one-label task here (every row's tone is "formal"), so its accuracy
moves from 0 to 1 with training: enough for a quality gate to tell models apart.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ROOT, TONE_DATA, learnable_config, one_label_rows, tiny_config
from prefect_http import prefect_http
from flows.cli import app
from grove.stage import STAGES

runner = CliRunner()


def api_post(api: str, path: str, body: dict) -> list[dict]:
    response = prefect_http.post(f"{api}{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def task_runs(api: str, flow_run_id: str) -> list[dict]:
    return api_post(api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})


def stage_of(task_run: dict) -> str:
    return task_run["name"].rsplit("-", 1)[0]


@pytest.fixture(scope="module")
def nights(s3_server, prefect_api, tiny_model, tmp_path_factory):
    """A data prefix and an artifact root on S3, and a function that runs one night."""
    from flows.optimize import optimize
    from grove.credentials import s3_access

    with pytest.MonkeyPatch.context() as env:
        for name, value in s3_server.env().items():
            env.setenv(name, value)
        import fsspec

        fs = fsspec.filesystem("s3", **s3_access().options)
        base = f"grove-tests/nightly-{uuid.uuid4().hex[:8]}"
        folder = tmp_path_factory.mktemp("nightly")
        raw = learnable_config(tiny_model, f"s3://{base}/tone/", f"s3://{base}/store", folder / "out")
        fs.pipe(f"{base}/tone/2026-11-01.jsonl", one_label_rows(0, 80).encode())

        def run(changes=None) -> dict:
            config = json.loads(json.dumps(raw))
            if changes:
                changes(config)
            path = folder / f"night-{uuid.uuid4().hex[:6]}.json"
            path.write_text(json.dumps(config))
            return optimize(str(path))

        first = run()
        yield {"fs": fs, "base": base, "run": run, "first": first, "store": f"s3://{base}/store",
               "folder": folder}


def test_first_night_trains_promotes_and_publishes_stage_artifacts_and_tags(nights, prefect_api):
    first = nights["first"]
    assert [s["status"] for s in first["stages"]] == ["ran"] * 7
    promotion = first["promotion"]
    assert promotion["decision"] == "promoted" and promotion["value"] >= 0.5, promotion

    artifacts = api_post(prefect_api, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [first["run_id"]]}}})
    by_key = {a["key"]: a for a in artifacts}
    expected = {f"grove-tiny-{what}" for what in ("data", "train-progress", "train-loss", "evaluate",
                                                  "onnx-accuracy", "benchmark", "report")}
    assert expected <= set(by_key), sorted(by_key)
    assert by_key["grove-tiny-train-progress"]["type"] == "progress"
    assert float(by_key["grove-tiny-train-progress"]["data"]) == 100.0
    data_table = json.loads(by_key["grove-tiny-data"]["data"])
    assert data_table[0]["label"] == "formal" and data_table[-1]["label"] == "(all)"
    assert data_table[-1]["train"] + data_table[-1]["eval"] == data_table[0]["train"] + data_table[0]["eval"]
    losses = json.loads(by_key["grove-tiny-train-loss"]["data"])
    assert [row["step"] for row in losses] == list(range(1, 31))
    onnx = json.loads(by_key["grove-tiny-onnx-accuracy"]["data"])
    assert onnx[0] == {"label": "(all)", "onnx": promotion["value"]}
    evaluate = json.loads(by_key["grove-tiny-evaluate"]["data"])
    assert set(evaluate[0]) == {"label", "base", "fine_tuned"}
    assert {row["engine"] for row in json.loads(by_key["grove-tiny-benchmark"]["data"])} == {"pytorch", "onnx"}
    report = by_key["grove-tiny-report"]["data"]
    assert nights["store"] + "/entries/build_onnx/" in report and "**promoted**" in report
    # the task runs: stage names, the model's tag, the gpu tag on the model-heavy stages
    runs = {stage_of(t): t for t in task_runs(prefect_api, first["run_id"])}
    assert set(runs) == {*STAGES, "promote"}
    for stage, task_run in runs.items():
        assert {"grove", f"stage:{stage}", "model:tiny"} <= set(task_run["tags"]), task_run["tags"]
        assert ("gpu" in task_run["tags"]) == (stage in ("train", "evaluate", "benchmark"))


def test_the_flow_run_page_shows_the_seven_stages(nights, prefect_api, tmp_path):
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed for this test (make test installs it)"
    page = prefect_api.removesuffix("/api") + f"/runs/flow-run/{nights['first']['run_id']}"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=15000",
             "--window-size=1400,900", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=180).stdout
    subprocess.run([chromium, *flags, f"--screenshot={tmp_path / 'flow-run.png'}", page], capture_output=True,
                   timeout=180)
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))
    assert "grove-optimize" in text and "Completed" in text, text[:2000]
    for stage in STAGES:
        assert re.search(rf"\b{stage}-\w+", text), f"{stage} is not on the flow-run page: {text[:3000]}"
    assert (tmp_path / "flow-run.png").stat().st_size > 10_000


def test_nights_without_new_data_rerun_nothing_new_data_retrains_and_a_worse_model_is_kept_out(
        nights, prefect_api):
    run, first = nights["run"], nights["first"]
    unchanged = run()
    assert [s["status"] for s in unchanged["stages"]] == ["cached"] * 7
    assert unchanged["promotion"]["decision"] == "unchanged"

    nights["fs"].pipe(f"{nights['base']}/tone/2026-11-02.jsonl", one_label_rows(80, 120).encode())
    new_data = run()
    statuses = {s["stage"]: s["status"] for s in new_data["stages"]}
    assert statuses["load_data"] == statuses["train"] == statuses["build_onnx"] == "ran"
    load = next(s for s in new_data["stages"] if s["stage"] == "load_data")["summary"]
    assert load["rows"] == 120
    assert new_data["promotion"]["decision"] == "promoted", new_data["promotion"]

    def worse(config):  # barely trained; the absolute floor and accuracy rules off, so only the drop can stop it
        config["passes"]["lora"]["config"]["training_args"]["max_steps"] = 2
        config["grove"]["promotion"].update(min=0.0, min_gain_over_base=0.0, max_drop_from_fine_tuned=1.0)

    rejected = run(worse)
    assert {s["stage"]: s["status"] for s in rejected["stages"]}["train"] == "ran"
    assert rejected["promotion"]["decision"] == "not_promoted"
    assert "below the current model's" in rejected["promotion"]["reason"], rejected["promotion"]
    state = prefect_http.get(f"{prefect_api}/flow_runs/{rejected['run_id']}", timeout=30).json()["state"]
    assert state["type"] == "COMPLETED"

    result = runner.invoke(app, ["models", "--store", nights["store"], "--json"])
    assert result.exit_code == 0, result.output
    tiny = json.loads(result.output)["tiny"]
    assert tiny["current"]["run_id"] == new_data["run_id"]
    assert [m["run_id"] for m in tiny["history"]] == [new_data["run_id"], first["run_id"]]
    assert tiny["current"]["metrics"]["onnx_accuracy"] == new_data["promotion"]["value"]

    # gc keeps the current model's entries even when no recent run is kept
    from flows.runs import garbage_collect
    from grove.store import ArtifactStore

    store = ArtifactStore(nights["store"])
    garbage_collect(store, keep=0, grace_minutes=0)
    current = tiny["current"]["model"]
    assert store.lookup(current["stage"], current["key"]) is not None
    worse_build = next(s for s in rejected["stages"] if s["stage"] == "build_onnx")
    assert store.lookup("build_onnx", worse_build["key"]) is None


def test_a_gpu_concurrency_limit_holds_training_until_its_slot_is_free(prefect_api, tiny_model, tone_copy, tmp_path,
                                                                       write_config):
    from prefect.concurrency.sync import concurrency

    raw = tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out")
    raw["passes"] = {"lora": raw["passes"]["lora"]}  # the gated stages are what matters here: no ONNX build
    raw["grove"]["promotion"] = {"enabled": False}
    config = write_config(raw)
    prefect_http.post(f"{prefect_api}/concurrency_limits/", json={"tag": "gpu", "concurrency_limit": 1},
                      timeout=30).raise_for_status()
    held, release = threading.Event(), threading.Event()

    def hold_the_slot():  # another run's training, as far as Prefect can tell
        with concurrency("tag:gpu", occupy=1, strict=True):
            held.set()
            release.wait(300)

    # the test's own Prefect settings (the session server): a bare thread reads Prefect's global
    # settings, fixed when prefect was first imported, and then talks to a temporary server
    holder = threading.Thread(target=contextvars.copy_context().run, args=(hold_the_slot,), daemon=True)
    try:
        holder.start()
        assert held.wait(60)
        asked_at = datetime.now(timezone.utc)
        run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--config", str(config)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
        train = None
        deadline = time.monotonic() + 240
        while train is None and time.monotonic() < deadline and run.poll() is None:
            found = api_post(prefect_api, "/task_runs/filter", {"task_runs": {
                "name": {"like_": "train-"}, "expected_start_time": {"after_": asked_at.isoformat()}}})
            train = found[0] if found else None
            time.sleep(1)
        assert train is not None, "train never started"
        time.sleep(5)
        train = prefect_http.get(f"{prefect_api}/task_runs/{train['id']}", timeout=30).json()
        assert train["state"]["type"] == "PENDING" and train["start_time"] is None, train["state"]
        time.sleep(3)
        released_at = datetime.now().astimezone()
        release.set()
        output, _ = run.communicate(timeout=300)
        assert run.returncode == 0, output
        train = prefect_http.get(f"{prefect_api}/task_runs/{train['id']}", timeout=30).json()
        assert train["state"]["type"] == "COMPLETED"
        assert datetime.fromisoformat(train["start_time"]) >= released_at
        first = min((t for t in task_runs(prefect_api, train["flow_run_id"]) if stage_of(t) == "load_data"),
                    key=lambda t: t["start_time"])
        assert datetime.fromisoformat(first["start_time"]) < released_at  # ungated stages did not wait
    finally:
        release.set()
        holder.join(30)
        prefect_http.delete(f"{prefect_api}/concurrency_limits/tag/gpu", timeout=30)


@pytest.mark.parametrize("change, where, message", [
    (lambda c, tmp: c["data_configs"][0]["load_dataset_config"]["params"].update(data_files=str(tmp / "none-*.jsonl")),
     "data_configs.tone.load_dataset_config.params.data_files", "no files match"),
    (lambda c, tmp: (tmp / "empty").mkdir() or
     c["data_configs"][0]["load_dataset_config"]["params"].update(data_files=str(tmp / "empty")),
     "data_configs.tone.load_dataset_config.params.data_files", "holds no data files"),
    (lambda c, tmp: c["grove"].update(promotion={"metric": "onnx_acc"}),
     "grove.promotion.metric", "unknown gate metric 'onnx_acc' (did you mean 'onnx_accuracy'?)"),
    (lambda c, tmp: c["passes"].pop("builder") and c["grove"].update(promotion={"metric": "onnx_accuracy"}),
     "grove.promotion.metric", "onnx_accuracy needs a ModelBuilder pass"),
])
def test_bad_nightly_input_fails_before_any_work(tiny_model, tone_copy, tmp_path, write_config, change, where, message):
    raw = tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out")
    change(raw, tmp_path)
    result = runner.invoke(app, ["run", "--config", str(write_config(raw))])
    flat = " ".join(result.output.split())
    assert result.exit_code == 2 and where in flat and message in flat, result.output
    assert not (tmp_path / "store").exists()


def test_an_empty_s3_prefix_is_refused_at_run_start_and_listed_only_at_run_time_when_deploying(
        s3_env, tiny_model, tmp_path, write_config):
    prefix = f"s3://grove-tests/empty-{uuid.uuid4().hex[:8]}/"
    raw = tiny_config(tiny_model, TONE_DATA, tmp_path / "store", tmp_path / "out")
    raw["data_configs"][0]["load_dataset_config"]["params"]["data_files"] = prefix
    config = write_config(raw)
    result = runner.invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 2 and f"{prefix} holds no data files" in " ".join(result.output.split())
    from flows.config import load_config

    # at deploy time the location is left to the worker's run (its keys may differ)
    assert load_config(config, list_remote_data=False).data.files == [prefix]


def test_an_s3_prefix_is_listed_and_hashed_through_one_client_per_run_start(
        s3_env, tiny_model, tmp_path, write_config, monkeypatch):
    """Every file's bytes are in the data key, read through one fresh client (not one per file)."""
    import grove.data_files
    from flows.config import load_config
    from grove.credentials import s3_access

    prefix = f"s3://grove-tests/three-{uuid.uuid4().hex[:8]}/"
    lines = TONE_DATA.read_text().splitlines(keepends=True)
    raw = tiny_config(tiny_model, TONE_DATA, tmp_path / "store", tmp_path / "out")
    raw["data_configs"][0]["load_dataset_config"]["params"]["data_files"] = prefix
    config = write_config(raw)
    fs = grove.data_files.remote_fs(prefix, s3_access(None).options)[0]
    for index in range(3):
        fs.pipe(f"{prefix}part-{index}.jsonl", "".join(lines[index::3]).encode())
    opened = []
    real = grove.data_files.remote_fs
    monkeypatch.setattr(grove.data_files, "remote_fs", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    first = load_config(config).data
    assert len(first.files) == 3 and len(opened) == 2, opened  # one client lists, one hashes all three
    fs.pipe(f"{prefix}part-1.jsonl", "".join(lines[1::3][:-1]).encode())
    assert load_config(config).data.content_sha256 != first.content_sha256
