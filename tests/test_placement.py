"""Placement (grove.placement): stage groups on Prefect work pools, with real parts: the session's
Prefect server, SeaweedFS as the s3:// store, two process work pools (`cpu`, `gpu`) with one worker
each, created and deployed by `grove deploy`. Which worker ran which child flow run is read back
from the Prefect API (the workers' submitted-flow-run events)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT, tiny_config
from processes import stop_group
from flows.cli import app

runner = CliRunner()
GPU_STAGES = ("train", "evaluate", "merge_adapters", "build_onnx")


def placed_config(tiny_model, tone_copy, tmp_path, root: str, cpu: str, gpu: str) -> dict:
    raw = tiny_config(tiny_model, tone_copy, tmp_path / "unused", tmp_path / "out")
    raw["grove"].update(artifact_root=root, device="cpu", checkpoint_steps=0,
                        placement={"default": cpu, "stages": {stage: gpu for stage in GPU_STAGES}})
    return raw


# ---- config -------------------------------------------------------------------------------------
def test_groups_are_adjacent_stages_on_one_pool():
    from flows.placement import groups

    placement = {"load_data": "cpu", "template_corpus": "cpu", "train": "gpu", "evaluate": "cpu",
                 "merge_adapters": "gpu", "build_onnx": "gpu", "benchmark": "edge"}
    assert groups(placement) == [("cpu", ("load_data", "template_corpus")), ("gpu", ("train",)),
                                 ("cpu", ("evaluate",)), ("gpu", ("merge_adapters", "build_onnx")),
                                 ("edge", ("benchmark",))]


@pytest.mark.parametrize("root, stages, message", [
    ("LOCAL", {"train": "gpu"}, "grove.placement: stages on several work pools pass their artifacts through "
                                "the store, which must be s3://"),
    ("s3://grove-tests/x", {"trian": "gpu"}, "grove.placement.stages.trian: unknown stage (did you mean 'train'?)"),
])
def test_a_bad_placement_is_refused_naming_the_key(tiny_model, tone_copy, tmp_path, root, stages, message):
    from flows.config import ConfigError, parse_config

    raw = placed_config(tiny_model, tone_copy, tmp_path, str(tmp_path / "store") if root == "LOCAL" else root,
                        "cpu", "gpu")
    raw["grove"]["placement"]["stages"] = stages
    with pytest.raises(ConfigError) as error:
        parse_config(raw, base_dir=tmp_path)
    assert message in " ".join(str(error.value).split())


# ---- real pools and workers ---------------------------------------------------------------------
def start_worker(pool: str, name: str, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--name", name,
                             "--type", "process"], cwd=ROOT, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def deploy(config: Path, tag: str, cpu: str, api: str, *extra: str) -> None:
    """`grove deploy` of a prefect.yaml whose one deployment runs `config` (placed on cpu and gpu)."""
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    spec["deployments"] = [{**spec["deployments"][0], "name": f"placed-{tag}", "parameters": {"config": str(config)},
                            "work_pool": {"name": cpu}}]
    (ROOT / f".prefect-{tag}.yaml").write_text(yaml.safe_dump(spec))  # deploys resolve entrypoints from its folder
    try:
        deployed = runner.invoke(app, ["deploy", "--file", str(ROOT / f".prefect-{tag}.yaml"), "--pool", cpu, *extra])
    finally:
        (ROOT / f".prefect-{tag}.yaml").unlink()
    assert deployed.exit_code == 0, deployed.output
    pools = {p["name"]: p["type"] for p in httpx.post(f"{api}/work_pools/filter", json={}, timeout=30).json()}
    assert pools[cpu] == pools[f"gpu-{tag}"] == "process"


def worker_env(api: str, **extra: str) -> dict:
    return {**os.environ, "PREFECT_API_URL": api, "PYTHONPATH": str(ROOT), "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "1", **extra}


def grove_run(config: Path, env: dict, log: Path, *extra: str) -> float:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(config), *extra], cwd=ROOT,
                          env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, timeout=900)
    assert done.returncode == 0, log.read_text()[-4000:]
    return time.monotonic() - started


def child_runs(api: str, pools: tuple[str, ...]) -> dict[str, dict]:
    """Flow runs of the stage-group deployments on these pools, by id."""
    runs = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"tags": {"all_": ["grove"]}}}, timeout=30).json()
    deployments = {d["id"]: d["name"] for d in httpx.post(f"{api}/deployments/filter", json={}, timeout=30).json()}
    return {r["id"]: {**r, "deployment": deployments.get(r["deployment_id"])} for r in runs
            if r["deployment_id"] in deployments and r["work_pool_name"] in pools}


def submitted_by(api: str) -> dict[str, str]:
    """flow run id -> the worker that submitted it (its events say so)."""
    events = httpx.post(f"{api}/events/filter", json={"filter": {"event": {"name": ["prefect.worker.submitted-flow-run"]}},
                                                      "limit": 50}, timeout=30).json()["events"]
    found = {}
    for event in events:
        worker = event["resource"]["prefect.resource.id"].rsplit(".", 1)[-1]
        for related in event["related"]:
            if related["prefect.resource.id"].startswith("prefect.flow-run."):
                found[related["prefect.resource.id"].removeprefix("prefect.flow-run.")] = worker
    return found


def report(tmp_path: Path) -> dict[str, str]:
    body = json.loads((tmp_path / "out" / "tiny" / "report.json").read_text())
    return {s["stage"]: s["status"] for s in body["stages"]}


def test_a_placed_run_puts_each_group_on_its_pool_then_reruns_cached_and_from_a_stage(
        s3_env, prefect_api, tiny_model, tone_copy, tmp_path, write_config):
    tag = uuid.uuid4().hex[:6]
    cpu, gpu = f"cpu-{tag}", f"gpu-{tag}"
    root = f"s3://grove-tests/placed-{tag}"
    config = write_config(placed_config(tiny_model, tone_copy, tmp_path, root, cpu, gpu), "placed.json")
    deploy(config, tag, cpu, prefect_api)
    env = worker_env(prefect_api)
    workers = [start_worker(cpu, "cpu-worker", env, tmp_path / "cpu-worker.log"),
               start_worker(gpu, "gpu-worker", env, tmp_path / "gpu-worker.log")]
    try:
        first = grove_run(config, env, tmp_path / "first.log")
        assert set(report(tmp_path).values()) == {"ran"}, report(tmp_path)
        children = child_runs(prefect_api, (cpu, gpu))
        workers_of = submitted_by(prefect_api)
        placed = {run["name"].split(": ", 1)[1]: (run["deployment"], run["work_pool_name"], workers_of.get(run["id"]))
                  for run in children.values()}
        assert placed == {f"load_data+template_corpus on {cpu}": (cpu, cpu, "cpu-worker"),
                          f"{'+'.join(GPU_STAGES)} on {gpu}": (gpu, gpu, "gpu-worker"),
                          f"benchmark on {cpu}": (cpu, cpu, "cpu-worker")}, placed
        assert all(run["parent_task_run_id"] for run in children.values()), "each child run hangs off the parent"
        parents = {httpx.get(f"{prefect_api}/task_runs/{run['parent_task_run_id']}", timeout=30).json()["flow_run_id"]
                   for run in children.values()}
        assert len(parents) == 1

        cached = grove_run(config, env, tmp_path / "cached.log")
        assert set(report(tmp_path).values()) == {"cached"}, report(tmp_path)
        assert child_runs(prefect_api, (cpu, gpu)).keys() == children.keys(), "a cached rerun starts no child run"
        one_pool = placed_config(tiny_model, tone_copy, tmp_path, root, cpu, gpu)
        del one_pool["grove"]["placement"]
        one_pool_seconds = grove_run(write_config(one_pool, "one-pool.json"), env, tmp_path / "one-pool.log")
        assert set(report(tmp_path).values()) == {"cached"}
        print(f"\nplaced first run {first:.1f} s; cached rerun placed {cached:.1f} s vs one pool "
              f"{one_pool_seconds:.1f} s")

        # a command-line override travels to the child runs: the benchmark child's key matches the parent's
        grove_run(config, env, tmp_path / "from-stage.log", "--from-stage", "build_onnx", "grove.benchmark.repeats=2")
        statuses = report(tmp_path)
        assert statuses["build_onnx"] == statuses["benchmark"] == "ran", statuses
        assert {statuses[s] for s in ("load_data", "template_corpus", "train", "evaluate", "merge_adapters")} == \
               {"cached"}, statuses
        new = {run["name"].split(": ", 1)[1] for rid, run in child_runs(prefect_api, (cpu, gpu)).items() if rid not in children}
        assert new == {f"{'+'.join(GPU_STAGES)} on {gpu}", f"benchmark on {cpu}"}, new
    finally:
        for worker in workers:
            stop_group(worker)


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a worker and everything it started (its flow-run process too): a machine lost."""
    import psutil

    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for member in tree:
        member.kill()
    process.wait()


def test_a_worker_killed_mid_training_crashes_its_run_and_the_group_reruns_on_the_same_pool(
        s3_env, prefect_api, tiny_model, tone_copy, tmp_path, write_config):
    """The gpu worker and its flow-run process are killed once training stored a checkpoint. Prefect's
    heartbeat automation (made by grove deploy) marks the child run Crashed; the parent starts the
    group again on the gpu pool (a new worker there), training resumes from the stored checkpoint,
    and the cpu group's entries are not touched."""
    import s3fs

    tag = uuid.uuid4().hex[:6]
    cpu, gpu = f"cpu-{tag}", f"gpu-{tag}"
    root = f"s3://grove-tests/killed-{tag}"
    raw = placed_config(tiny_model, tone_copy, tmp_path, root, cpu, gpu)
    raw["passes"] = {"lora": raw["passes"]["lora"]}  # train and evaluate on gpu: no ONNX needed here
    raw["passes"]["lora"]["config"]["training_args"].update(max_steps=80, per_device_train_batch_size=2)
    raw["grove"].update(checkpoint_steps=4, promotion={"enabled": False})
    config = write_config(raw, "killed.json")
    deploy(config, tag, cpu, prefect_api, "--crash-after", "70")
    env = worker_env(prefect_api, PREFECT_FLOWS_HEARTBEAT_FREQUENCY="30")
    fs = s3fs.S3FileSystem(key=os.environ["AWS_ACCESS_KEY_ID"], secret=os.environ["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    workers = [start_worker(cpu, "cpu-worker", env, tmp_path / "cpu-worker.log"),
               start_worker(gpu, "gpu-worker", env, tmp_path / "gpu-worker.log")]
    parent = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--config", str(config)], cwd=ROOT, env=env,
                              stdout=open(tmp_path / "parent.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not fs.glob(f"{root.removeprefix('s3://')}/checkpoints/train/*/*/MANIFEST.json"):
            assert time.monotonic() < deadline and parent.poll() is None, (tmp_path / "parent.log").read_text()[-3000:]
            time.sleep(0.5)
            fs.invalidate_cache()
        stored_before = set(fs.glob(f"{root.removeprefix('s3://')}/entries/**/MANIFEST.json"))
        kill_tree(workers[1])
        workers[1] = start_worker(gpu, "gpu-worker-2", env, tmp_path / "gpu-worker-2.log")
        assert parent.wait(timeout=900) == 0, (tmp_path / "parent.log").read_text()[-4000:]
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
        for worker in workers:
            stop_group(worker)
    body = json.loads((tmp_path / "out" / "tiny" / "report.json").read_text())
    train = next(s for s in body["stages"] if s["stage"] == "train")
    assert train["status"] == "ran" and train["summary"]["resumed_from_step"] >= 4 and train["summary"]["steps"] == 80
    fs.invalidate_cache()
    assert stored_before <= set(fs.glob(f"{root.removeprefix('s3://')}/entries/**/MANIFEST.json")), "nothing lost"
    gpu_runs = sorted((run["start_time"], run["state_type"], submitted_by(prefect_api).get(run["id"]))
                      for run in child_runs(prefect_api, (cpu, gpu)).values() if run["deployment"] == gpu)
    assert [(state, worker) for _, state, worker in gpu_runs] == [("CRASHED", "gpu-worker"),
                                                                  ("COMPLETED", "gpu-worker-2")], gpu_runs
    cpu_groups = [run["name"] for run in child_runs(prefect_api, (cpu, gpu)).values() if run["deployment"] == cpu]
    assert sorted(cpu_groups) == [f"tiny: benchmark on {cpu}", f"tiny: load_data+template_corpus on {cpu}"]
