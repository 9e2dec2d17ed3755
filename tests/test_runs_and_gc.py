"""Run records, garbage collection, and two runs of one config at once on one S3 store."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest
from typer.testing import CliRunner

from conftest import ROOT, TONE_DATA, seed_store, tiny_config
from flows.cli import app
from flows.runs import RunLog, garbage_collect
from grove.machine import grove_home
from grove.stage import STAGES, ArtifactRef, StageRecord
from grove.store import ArtifactStore
from grove.store.gc import collect_garbage

runner = CliRunner()


def grove(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def referenced_blobs(store: ArtifactStore) -> set[str]:
    return {f["sha256"] for entry in store.entries() for f in entry.files.values()}


def stored_blobs(root) -> set[str]:
    return {p.name for p in (root / "blobs").rglob("*") if p.is_file()}


def test_gc_keeps_what_recent_runs_use_and_frees_the_rest(tiny_model, trained_store, tmp_path, write_config):
    # the first run takes every stage from the session's trained entries (same data file, same keys)
    raw = tiny_config(tiny_model, TONE_DATA, seed_store(trained_store, tmp_path / "store"), tmp_path / "out")
    config = write_config(raw)
    grove("run", "--config", str(config))
    report = json.loads((tmp_path / "out" / "tiny" / "report.json").read_text())
    assert {s["status"] for s in report["stages"]} == {"cached"}
    raw["passes"]["builder"]["config"]["precision"] = "fp32"
    write_config(raw)
    grove("run", "--config", str(config))
    store = ArtifactStore(str(tmp_path / "store"))
    assert len(store.entries("build_onnx")) == 2
    before = stored_blobs(tmp_path / "store")

    dry = grove("gc", "--keep", "1", "--config", str(config), "--grace-minutes", "0", "--dry-run")
    assert "would remove 2 entries" in dry and stored_blobs(tmp_path / "store") == before

    grove("gc", "--keep", "1", "--config", str(config), "--grace-minutes", "0")
    # the int4 build and its benchmark went; everything the fp32 run used stays and still hits
    assert len(store.entries("build_onnx")) == 1 and len(store.entries("benchmark")) == 1
    assert store.entries("build_onnx")[0].manifest["meta"]["summary"]["precision"] == "fp32"
    after = stored_blobs(tmp_path / "store")
    assert after < before and after == referenced_blobs(store)
    plan = grove("stages", "--config", str(config))
    assert len(re.findall(r"^\w+ +hit\b", plan, re.M)) == len(STAGES)
    assert len(json.loads(grove("runs", "--config", str(config), "--json"))) == 1


def test_two_runs_of_one_config_at_once_on_one_s3_store(s3_env, prefect_api, tiny_model, tone_copy, tmp_path,
                                                         write_config):
    root = "s3://grove-tests/concurrent"
    processes = []
    for name in ("a", "b"):
        raw = tiny_config(tiny_model, tone_copy, root, tmp_path / f"out-{name}")
        config = write_config(raw, f"{name}.json")
        env = {**os.environ, "PREFECT_API_URL": prefect_api}
        processes.append(subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--config", str(config)],
                                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
    outputs = [p.communicate(timeout=900)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n".join(outputs)

    store = ArtifactStore(root)
    for stage in STAGES:  # one complete, verified entry per stage, whoever wrote last
        assert len(store.entries(stage)) == 1, stage
    for name in ("a", "b"):
        report = json.loads((tmp_path / f"out-{name}" / "tiny" / "report.json").read_text())
        assert len(report["stages"]) == len(STAGES)
        assert (tmp_path / f"out-{name}" / "tiny" / "model" / "genai_config.json").is_file()
    plan = grove("stages", "--config", str(tmp_path / "a.json"))
    assert len(re.findall(r"^\w+ +hit\b", plan, re.M)) == len(STAGES)


# ---- gc never removes what is in use --------------------------------------------------------------------
def make_old(*paths) -> None:
    """Two hours old: past any grace period the tests use."""
    stamp = time.time() - 7200
    for path in paths:
        os.utime(path, (stamp, stamp))


def test_gc_spares_an_old_blob_a_concurrent_writer_is_reusing(tmp_path, folder):
    """The writer finds the blob stored (an old entry's, that entry unused now), skips the upload, and
    gc runs before the writer's manifest lists the blob: the writer refreshed the blob's time, so gc
    leaves it, and the new entry is complete."""
    store = ArtifactStore(str(tmp_path / "root"))
    old = store.put_dir("train", "old", folder, {})
    make_old(*[store._blob_path(f["sha256"]) for f in old.files.values()],
             store._manifest_path("train", "old"), store._by_digest_path(old.digest))
    writer = ArtifactStore(str(tmp_path / "root"))
    store_files = writer._put_files

    def then_gc(local_dir, label):  # gc runs between the writer's blob reuse and its manifest
        files = store_files(local_dir, label)
        collect_garbage(store, keep=set(), grace_seconds=3600)
        return files

    writer._put_files = then_gc
    writer.put_dir("train", "new", folder, {})
    assert store.lookup("train", "old") is None  # old and unused: gone
    new = store.lookup("train", "new")
    assert new is not None
    assert (store.materialize(new) / "sub" / "b.bin").read_bytes() == (folder / "sub" / "b.bin").read_bytes()


def test_gc_gives_entries_the_grace_blobs_get(tmp_path, folder):
    store = ArtifactStore(str(tmp_path / "root"))
    store.put_dir("train", "young", folder, {})  # a run in progress stored it and has not recorded it yet
    report = collect_garbage(store, keep=set(), grace_seconds=3600)
    assert report.entries == [] and store.lookup("train", "young") is not None


def test_gc_removes_local_copies_of_an_s3_store_no_kept_entry_needs(s3_env, folder, tmp_path):
    store = ArtifactStore(f"s3://grove-tests/gc-views-{uuid.uuid4().hex[:8]}")  # copies under GROVE_HOME
    kept = store.put_dir("train", "kept", folder, {"n": 1})
    dropped = store.put_dir("train", "dropped", folder, {"n": 2})
    kept_view, dropped_view = store.materialize(kept), store.materialize(dropped)
    assert str(kept_view).startswith(str(grove_home() / "materialized"))
    report = collect_garbage(store, keep={("train", "kept")}, grace_seconds=0)
    assert report.entries == ["train/dropped"]
    assert kept_view.is_dir() and not dropped_view.exists()
    assert report.views == 1


def test_gc_keeps_the_manifest_a_run_record_names_after_a_forced_rerun(tmp_path, folder):
    """A --from-stage rerun points the key at a new manifest; the older run's record still names the
    old one by digest, and while that record is kept its files stay readable."""
    store = ArtifactStore(str(tmp_path / "root"))
    first = store.put_dir("benchmark", "k", folder, {"run": 1})
    log = RunLog(store, "tiny", "run.json", None, run_id="a" * 32)
    log.add(StageRecord("benchmark", "ran", ref=ArtifactRef(stage="benchmark", key="k", digest=first.digest,
                                                              uri=store.entry_uri("benchmark", "k"))))
    log.finish("completed")
    (folder / "a.txt").write_text("the forced rerun's result")
    store.remove("entries/benchmark/k/MANIFEST.json")  # as a forced rerun leaves the key: on a newer manifest
    store.put_dir("benchmark", "k", folder, {"run": 2})
    garbage_collect(store, keep=5, grace_minutes=0)
    assert store.by_digest(first.digest) is not None
    assert (store.materialize(store.by_digest(first.digest)) / "a.txt").read_text() == "alpha"


def test_gc_keeps_the_record_of_the_run_that_made_a_current_model(tmp_path, folder):
    """`grove models` names the run each current model came from; gc --keep 1 dropped that record
    once newer runs (another name's, a failed one) came, and `grove show RUN` said no such run."""
    from flows.runs import find_run

    store = ArtifactStore(str(tmp_path / "root"))
    made = store.put_dir("build_onnx", "k", folder, {})
    promoted = RunLog(store, "tiny", "run.json", None, run_id="a" * 32)
    promoted.add(StageRecord("build_onnx", "ran", ref=ArtifactRef(stage="build_onnx", key="k", digest=made.digest,
                                                                  uri=store.entry_uri("build_onnx", "k"))))
    promoted.finish("completed")
    entry = {"stage": "build_onnx", "key": "k", "digest": made.digest, "uri": store.entry_uri("build_onnx", "k")}
    store.put_json("models/tiny/current.json", {"name": "tiny", "run_id": promoted.run_id, "model": entry,
                                                "entries": [entry]})
    gone = {**entry, "key": "gone", "digest": "0" * 64}
    for run_id, named in (("d" * 32, entry), ("e" * 32, gone)):  # past models with no run record left
        store.put_json(f"models/tiny/history/{run_id[0]}.json", {"name": "tiny", "run_id": run_id, "model": named,
                                                                 "entries": [named], "promoted_at": "2026-01-01"})
    for newer in "bc":
        RunLog(store, "other", "other.json", None, run_id=newer * 32).finish("failed")

    _, dropped = garbage_collect(store, keep=1, grace_minutes=0)
    assert dropped == 1  # the older of the two newer runs
    assert find_run(store, "aaaaaaaa")["status"] == "completed" and store.by_digest(made.digest) is not None
    # `grove models` offers `grove export` of a past model's RUN id: from its promotion record
    from flows.export import resolve
    from grove.errors import UserError

    assert [e.digest for e in resolve(store, "dddddddd")[1]] == [made.digest]
    with pytest.raises(UserError, match=r"its build_onnx entry gone is no longer in .* \(removed by grove gc\?\)"):
        resolve(store, "eeeeeeee")


def test_a_from_stage_rerun_of_the_current_model_updates_its_record(tiny_model, trained_store, tmp_path,
                                                                    write_config):
    """--from-stage benchmark measures the current model again: same model, so the gate leaves it
    current, but `grove models` and `grove export NAME` kept the old benchmark (by digest)."""
    root = seed_store(trained_store, tmp_path / "store")
    raw = tiny_config(tiny_model, TONE_DATA, root, tmp_path / "out")
    raw["grove"]["promotion"] = {"min_gain_over_base": 0}  # a tiny model scores 0 like its base
    config = str(write_config(raw))
    grove("run", "-c", config)  # all cached; promoted
    said = grove("run", "-c", config, "--from-stage", "benchmark")
    newest = json.loads(grove("runs", "-c", config, "--json"))[0]
    current = json.loads(grove("models", "-c", config, "--json"))["tiny"]["current"]
    benchmark = next(s for s in newest["stages"] if s["stage"] == "benchmark")
    measured = ArtifactStore(str(root)).by_digest(benchmark["digest"]).manifest["meta"]["summary"]
    assert "current model unchanged" in said and "its record now holds this run's measurements" in " ".join(said.split())
    assert current["run_id"] == newest["run_id"] and benchmark["digest"] in {e["digest"] for e in current["entries"]}
    assert current["metrics"]["onnx_decode_tokens_per_s"] == measured["onnx"]["decode_tokens_per_s"]
