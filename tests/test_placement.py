"""Placement (grove.placement): stage groups on Prefect work pools, with real parts: the session's
Prefect server, SeaweedFS as the s3:// store, two process work pools (`cpu`, `gpu`) with one worker
each, created and deployed by `grove deploy`. Which worker ran which child flow run is read back
from the Prefect API (the workers' submitted-flow-run events).

The workers see other machines than the parent, each through its own environment: the cpu worker
may use one core (its CPU affinity), the gpu worker has another transformers (a shim distribution
on its PYTHONPATH) and an nvidia-smi that lists two GPUs (a stand-in script: this machine has no
GPU; torch here is a CPU build, so the device still resolves to cpu, but `processes: auto` parsed
there as one per GPU would not match the parent's)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT, tiny_config
from processes import stop_group
from prefect_http import prefect_http
from flows.cli import app

runner = CliRunner()
GPU_STAGES = ("train", "evaluate", "merge_adapters", "build_onnx")


def placed_config(tiny_model, tone_copy, tmp_path, root: str, cpu: str, gpu: str) -> dict:
    raw = tiny_config(tiny_model, tone_copy, tmp_path / "unused", tmp_path / "out")
    raw["grove"].update(artifact_root=root, device="cpu", checkpoint_steps=0,
                        placement={"default": cpu, "stages": {stage: gpu for stage in GPU_STAGES}})
    return raw


# ---- config -------------------------------------------------------------------------------------
def test_a_pool_profile_is_trusted_only_under_the_same_setup_and_for_a_day():
    from flows.placement import PROFILE_MAX_AGE_S, profile_is_current

    profile = {"pool_setup": "abc", "written_at": 1000.0}
    assert profile_is_current(profile, "abc", 1000.0 + 60)
    assert not profile_is_current(profile, "def", 1000.0 + 60), "the pool's image or template changed"
    assert not profile_is_current(profile, "abc", 1000.0 + PROFILE_MAX_AGE_S + 1), "too old"
    assert profile_is_current(profile, None, 1000.0 + 60), "no API to ask: the age alone decides"
    assert not profile_is_current({"gpus": []}, None, 1e9), "a profile from before (no time): never current"


def test_a_pool_setup_is_asked_of_the_api_once_per_run(monkeypatch, tmp_path):
    """The profile check and the dispatch of a pool's groups compare with one value; each asks
    the Prefect API twice otherwise. (pool_setup is replaced by a counter: the API's answer is not
    what this checks, the placed-run test below uses a real one.)"""
    import flows.placement as placement
    from grove.store import ArtifactStore

    asked = []
    monkeypatch.setattr(placement, "pool_setup", lambda pool: asked.append(pool) or f"setup-{pool}")
    machines = placement.PoolMachines(ArtifactStore(str(tmp_path / "store")),
                                      {"train": "gpu", "evaluate": "gpu", "benchmark": "cpu"})
    assert machines("train") is None and machines("evaluate") is None  # no profile stored yet
    assert machines.setup("gpu") == "setup-gpu" and machines.setup("cpu") == "setup-cpu"
    assert sorted(asked) == ["cpu", "gpu"], asked


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
def start_worker(pool: str, name: str, env: dict, log: Path, cpus: set[int] | None = None) -> subprocess.Popen:
    """A process worker; `cpus`: the only cores it and its flow runs may use (as taskset would)."""
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    return subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--name", name,
                             "--type", "process"], cwd=ROOT, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=pin)


def other_machine_env(env: dict, folder: Path) -> dict:
    """The gpu worker's machine: transformers `<installed>+shim` (only its metadata, first on the
    path) and an nvidia-smi listing two GPUs (a stand-in: no GPU here)."""
    import importlib.metadata

    version = f"{importlib.metadata.version('transformers')}+shim"
    info = folder / "shim" / f"transformers-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: transformers\nVersion: {version}\n")
    smi = folder / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 'NVIDIA H200'\necho 'NVIDIA H200'\n")
    smi.chmod(0o755)
    return {**env, "PYTHONPATH": f"{folder / 'shim'}{os.pathsep}{env['PYTHONPATH']}",
            "PATH": f"{smi.parent}{os.pathsep}{env['PATH']}"}


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
    pools = {p["name"]: p["type"] for p in prefect_http.post(f"{api}/work_pools/filter", json={}, timeout=30).json()}
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
    runs = prefect_http.post(f"{api}/flow_runs/filter", json={"flow_runs": {"tags": {"all_": ["grove"]}}}, timeout=30).json()
    deployments = {d["id"]: d["name"] for d in prefect_http.post(f"{api}/deployments/filter", json={}, timeout=30).json()}
    return {r["id"]: {**r, "deployment": deployments.get(r["deployment_id"])} for r in runs
            if r["deployment_id"] in deployments and r["work_pool_name"] in pools}


def submitted_by(api: str) -> dict[str, str]:
    """flow run id -> the worker that submitted it (its events say so)."""
    events = prefect_http.post(f"{api}/events/filter", json={"filter": {"event": {"name": ["prefect.worker.submitted-flow-run"]}},
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


def stage_plan(config: Path, env: dict) -> dict[str, str]:
    """`grove stages` as the parent's machine prints it (plain rows, off a terminal): stage -> its row."""
    from grove.stage import STAGES

    shown = subprocess.run([sys.executable, "-m", "flows.cli", "stages", "--config", str(config)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    return {line.split()[0]: line for line in shown.stdout.splitlines() if line.split() and line.split()[0] in STAGES}


def test_a_placed_run_puts_each_group_on_its_pool_then_reruns_cached_and_from_a_stage(
        s3_env, prefect_api, tiny_model, tone_copy, tmp_path, write_config):
    """Every pool's machine differs from the parent's; each stage's key holds the facts of the
    machine that ran it, the parent computes the same keys from the facts the pools stored, and
    a cached rerun starts no child run."""
    import importlib.metadata

    import s3fs

    from grove.machine_facts import usable_cpus

    tag = uuid.uuid4().hex[:6]
    cpu, gpu = f"cpu-{tag}", f"gpu-{tag}"
    root = f"s3://grove-tests/placed-{tag}"
    raw = placed_config(tiny_model, tone_copy, tmp_path, root, cpu, gpu)
    raw["grove"]["device"] = "auto"  # resolved by each pool's machine
    config = write_config(raw, "placed.json")
    deploy(config, tag, cpu, prefect_api)
    env = worker_env(prefect_api)
    one_core = {min(os.sched_getaffinity(0))} if usable_cpus() > 1 else None
    workers = [start_worker(cpu, "cpu-worker", env, tmp_path / "cpu-worker.log", cpus=one_core),
               start_worker(gpu, "gpu-worker", other_machine_env(env, tmp_path), tmp_path / "gpu-worker.log")]
    fs = s3fs.S3FileSystem(key=os.environ["AWS_ACCESS_KEY_ID"], secret=os.environ["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    shim = f"{importlib.metadata.version('transformers')}+shim"

    def meta(stage: str) -> dict:
        body = json.loads((tmp_path / "out" / "tiny" / "report.json").read_text())
        uri = next(s["uri"] for s in body["stages"] if s["stage"] == stage)
        return json.loads(fs.cat(f"{uri.removeprefix('s3://')}/MANIFEST.json"))["meta"]

    try:
        first = grove_run(config, env, tmp_path / "first.log")
        assert set(report(tmp_path).values()) == {"ran"}, report(tmp_path)
        # each stage's facts are its worker's machine's, not the parent's
        trained = meta("train")["machine"]
        assert trained["libraries"]["transformers"] == shim and trained["processes"] == 1, trained
        assert meta("template_corpus")["machine"]["libraries"]["transformers"] != shim
        if one_core:
            assert meta("benchmark")["machine"]["machine"].endswith(" x1"), meta("benchmark")
        gpu_machine = json.loads(fs.cat(f"{root.removeprefix('s3://')}/machines/{gpu}.json"))
        assert gpu_machine["gpus"] == ["NVIDIA H200"] * 2 and gpu_machine["libraries"]["transformers"] == shim
        children = child_runs(prefect_api, (cpu, gpu))
        workers_of = submitted_by(prefect_api)
        placed = {run["name"].split(": ", 1)[1]: (run["deployment"], run["work_pool_name"], workers_of.get(run["id"]))
                  for run in children.values()}
        assert placed == {f"load_data+template_corpus on {cpu}": (cpu, cpu, "cpu-worker"),
                          f"{'+'.join(GPU_STAGES)} on {gpu}": (gpu, gpu, "gpu-worker"),
                          f"benchmark on {cpu}": (cpu, cpu, "cpu-worker")}, placed
        assert all(run["parent_task_run_id"] for run in children.values()), "each child run hangs off the parent"
        parents = {prefect_http.get(f"{prefect_api}/task_runs/{run['parent_task_run_id']}", timeout=30).json()["flow_run_id"]
                   for run in children.values()}
        assert len(parents) == 1

        cached = grove_run(config, env, tmp_path / "cached.log")
        assert set(report(tmp_path).values()) == {"cached"}, report(tmp_path)
        assert child_runs(prefect_api, (cpu, gpu)).keys() == children.keys(), "a cached rerun starts no child run"
        print(f"\nplaced first run {first:.1f} s; cached rerun {cached:.1f} s")
        assert all(" hit " in row for row in stage_plan(config, env).values())
        # the same stages planned to run on the parent's machine: its transformers is not the gpu pool's
        one_pool = dict(raw, grove={k: v for k, v in raw["grove"].items() if k != "placement"})
        here = stage_plan(write_config(one_pool, "one-pool.json"), env)
        assert " hit " in here["load_data"] and " hit " in here["template_corpus"], here
        assert f"stored for transformers {shim}; this machine has transformers {shim[:-5]}" in here["train"], here

        # a new setup of the gpu pool (its deployment's job variables: how a new image rolls out) makes
        # the stored profile stale: the gpu group is dispatched once and its child finds its entries
        deployment = prefect_http.get(f"{prefect_api}/deployments/name/grove-stages/{gpu}", timeout=30).json()
        prefect_http.patch(f"{prefect_api}/deployments/{deployment['id']}",
                           json={"job_variables": {"env": {"GROVE_IMAGE_TAG": "v2"}}}, timeout=30).raise_for_status()
        grove_run(config, env, tmp_path / "new-setup.log")
        assert set(report(tmp_path).values()) == {"cached"}, report(tmp_path)
        redispatched = {run["name"].split(": ", 1)[1] for rid, run in child_runs(prefect_api, (cpu, gpu)).items()
                        if rid not in children}
        assert redispatched == {f"{'+'.join(GPU_STAGES)} on {gpu}"}, redispatched
        children = child_runs(prefect_api, (cpu, gpu))
        assert json.loads(fs.cat(f"{root.removeprefix('s3://')}/machines/{gpu}.json"))["pool_setup"] != \
            gpu_machine["pool_setup"]

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
