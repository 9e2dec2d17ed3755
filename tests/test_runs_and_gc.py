"""Run records, garbage collection, and two runs of one config at once on one S3 store."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from conftest import ROOT, tiny_config
from flows.cli import app
from grove.stage import STAGES
from grove.store import ArtifactStore

runner = CliRunner()


def grove(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def referenced_blobs(store: ArtifactStore) -> set[str]:
    return {f["sha256"] for entry in store.entries() for f in entry.files.values()}


def stored_blobs(root) -> set[str]:
    return {p.name for p in (root / "blobs").rglob("*") if p.is_file()}


def test_gc_keeps_what_recent_runs_use_and_frees_the_rest(tiny_model, tone_copy, tmp_path, write_config):
    raw = tiny_config(tiny_model, tone_copy, tmp_path / "store", tmp_path / "out")
    config = write_config(raw)
    grove("run", "--config", str(config))
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
    assert plan.count("│ hit ") == len(STAGES)
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
    assert plan.count("│ hit ") == len(STAGES)
