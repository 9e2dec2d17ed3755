"""Faults around the store, each with a clear message and nothing stored lost or corrupted."""

from __future__ import annotations

import errno
import json
import subprocess
import uuid

import pytest
from typer.testing import CliRunner

from conftest import seed_store, tiny_config
from flows.cli import app
from seaweedfs import ACCESS_KEY, SECRET_KEY, free_port
from grove.store import ArtifactStore, StoreError

runner = CliRunner()


def flat(output: str) -> str:
    return " ".join(output.split())


def test_unreachable_store_fails_before_any_compute(tiny_model, tone_copy, tmp_path, write_config, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    config = write_config(tiny_config(tiny_model, tone_copy, "s3://grove-tests/unreachable", tmp_path / "out"))
    result = runner.invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert f"cannot reach the S3 endpoint {endpoint}" in flat(result.output)
    assert SECRET_KEY not in result.output and ACCESS_KEY not in result.output
    assert "load_data" not in result.output  # no stage started
    planned = runner.invoke(app, ["stages", "--config", str(config)])  # one line too, before any lookup
    assert planned.exit_code == 2 and "checking the root: cannot reach the S3 endpoint" in flat(planned.output)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MB filesystem (tmpfs) to fill; needs the right to mount, as root in CI has."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()}); "
                    "test_store_reports_a_full_disk_by_errno covers the message")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_fails_the_stage_clearly_and_keeps_earlier_entries(tiny_disk, tiny_model, tone_copy, tmp_path,
                                                                      write_config):
    root = tiny_disk / "store"
    config = write_config(tiny_config(tiny_model, tone_copy, root, tmp_path / "out"))
    result = runner.invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 1, result.output
    assert "the disk is full" in flat(result.output)
    store = ArtifactStore(str(root))
    failed = json.loads(runner.invoke(app, ["runs", "--store", str(root), "--json"]).output)[0]
    assert failed["status"] == "failed" and failed["failed_stage"]
    done = [s["stage"] for s in failed["stages"]]
    assert done and failed["failed_stage"] not in done
    for stage in done:  # what was stored before the disk filled is intact and still a hit
        assert store.lookup(stage, next(s["key"] for s in failed["stages"] if s["stage"] == stage)) is not None
    assert not list((root / "entries").glob(f"{failed['failed_stage']}/*/MANIFEST.json"))
    assert not [p for p in (root / "blobs").rglob("*.tmp-*")]  # no half-written files left behind


def test_store_reports_a_full_disk_by_errno(tmp_path, monkeypatch):
    """The same message where mounting is not allowed: the write fails with ENOSPC (injected)."""
    store = ArtifactStore(str(tmp_path / "store"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"x" * 100)

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.fs, "put_file", full)
    with pytest.raises(StoreError, match="the disk is full") as error:
        store.put_dir("train", "k1", src, {})
    assert not error.value.transient  # a full disk is not retried
    assert store.lookup("train", "k1") is None


def test_credentials_from_a_prefect_block_and_never_in_clear(s3_server, prefect_api, monkeypatch, tmp_path):
    """Keys from a prefect-aws AwsCredentials block: the store works with no AWS_* variables,
    and neither the saved result-storage block nor any message holds the secret."""
    from prefect_http import prefect_http
    from prefect_aws import AwsCredentials

    from grove.result_storage import prefect_result_storage

    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    block = f"grove-test-{uuid.uuid4().hex[:6]}"
    AwsCredentials(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                   aws_client_parameters={"endpoint_url": s3_server.endpoint}).save(block, _sync=True)
    store = ArtifactStore("s3://grove-tests/from-block", credentials_block=block)
    store.check_writable()
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("alpha")
    assert store.lookup("train", store.put_dir("train", "k1", src, {}).key) is not None
    assert SECRET_KEY not in repr(store) and SECRET_KEY not in store.location

    results_block = prefect_result_storage(store)
    documents = prefect_http.post(f"{prefect_api}/block_documents/filter", json={}).text
    assert results_block._block_document_name in documents and SECRET_KEY not in documents

    with pytest.raises(StoreError) as error:
        ArtifactStore("s3://no-such-bucket/x", credentials_block=block).check_writable()
    assert SECRET_KEY not in str(error.value) and "does not exist" in str(error.value)


def test_a_credentials_block_that_does_not_exist_is_one_line_naming_the_key(tiny_model, tone_copy, tmp_path,
                                                                             write_config):
    """A mistyped `grove.aws_credentials_block` was a LookupError: `grove stages` printed a
    traceback, `grove run` Prefect's traceback then `stage ? failed` with exit 1."""
    raw = tiny_config(tiny_model, tone_copy, "s3://grove-tests/no-block", tmp_path / "out")
    raw["grove"]["aws_credentials_block"] = "no-such-block"
    config = write_config(raw)
    for command in ("stages", "run", "runs"):
        result = runner.invoke(app, [command, "--config", str(config)])
        said = flat(result.output)
        assert result.exit_code == 2, (command, result.output)
        assert said.startswith("error: grove.aws_credentials_block: no prefect-aws AwsCredentials block named "
                               "'no-such-block'"), (command, said)
        assert "Traceback" not in said and "stage ?" not in said and "load_data" not in said, (command, said)


def test_a_transient_stage_failure_is_retried_and_a_bad_input_is_not(tiny_model, trained_store, tone_copy, tmp_path,
                                                                      write_config, monkeypatch):
    """Injected faults (a dropped connection, then a data error) in load_data's reader: the
    first is retried per grove.retries and the run completes; the second fails at once. The
    store starts with the session's trained entries: load_data runs (its data file is this
    test's), training and evaluation come from the cache."""
    import tasks.load_data

    raw = tiny_config(tiny_model, tone_copy, seed_store(trained_store, tmp_path / "store"), tmp_path / "out")
    del raw["passes"]["merge"], raw["passes"]["builder"]
    raw["grove"]["retries"] = {"load_data": {"retries": 2, "delay_seconds": 0}}
    config = write_config(raw)
    real_read, calls = tasks.load_data.read_rows, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("connection reset by peer")
        return real_read(*args, **kwargs)

    monkeypatch.setattr(tasks.load_data, "read_rows", flaky)
    result = runner.invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert len(calls) == 2
    report = json.loads((tmp_path / "out" / "tiny" / "report.json").read_text())
    statuses = {s["stage"]: s["status"] for s in report["stages"]}
    assert statuses["load_data"] == "ran" and statuses["train"] == "cached", statuses

    def broken(*args, **kwargs):
        calls.append(1)
        raise ValueError("configs/data/tone.jsonl: line 3 is not JSON")

    calls.clear()
    tone_copy.write_text(tone_copy.read_text() + "\n")  # new data: load_data must run again
    monkeypatch.setattr(tasks.load_data, "read_rows", broken)
    result = runner.invoke(app, ["run", "--config", str(config)])
    assert result.exit_code == 1 and "line 3 is not JSON" in flat(result.output)
    assert len(calls) == 1  # never retried


def test_a_failure_after_every_started_stage_finished_names_the_last_one(capsys):
    """A quantization search none of whose candidates scores fails in the flow after its builds
    finished: the error line named 'stage ?'; it names the stage whose results were judged."""
    import typer

    from flows.cli.errors import stage_failed
    from grove.stage import StageFailed

    with pytest.raises(typer.Exit):
        stage_failed({"evaluate": 0, "build_onnx": 1}, {"evaluate", "build_onnx"},
                     StageFailed("no quantization candidate built a model that loads"))
    assert "error: stage build_onnx failed: no quantization candidate" in capsys.readouterr().err
