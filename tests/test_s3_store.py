"""The artifact store on a real S3 server (SeaweedFS): the same guarantees as a local folder,
and clear errors, naming the endpoint but never the keys, when the store cannot be used."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import pytest

from seaweedfs import SECRET_KEY, SeaweedServer
from grove.store import ArtifactStore, StoreError


def fresh_root() -> str:
    return f"s3://grove-tests/store-{uuid.uuid4().hex[:8]}"


def test_round_trip_dedup_and_downloads_verified(s3_env, folder, tmp_path):
    store = ArtifactStore(fresh_root(), local_cache=tmp_path / "views")
    store.check_writable()
    entry = store.put_dir("train", "k1", folder, {"summary": {"loss": 1.0}})
    store.put_dir("train", "k2", folder, {"summary": {"loss": 2.0}})
    assert len(store.fs.find(store._path("blobs"))) == 2  # two entries, two distinct files
    found = store.lookup("train", "k1")
    assert found is not None and found.digest == entry.digest
    view = store.materialize(found)
    assert (view / "sub" / "b.bin").read_bytes() == (folder / "sub" / "b.bin").read_bytes()
    assert store.by_digest(entry.digest).key == "k1"


def test_damaged_entries_are_misses_with_a_warning(s3_env, folder, tmp_path, caplog):
    store = ArtifactStore(fresh_root(), local_cache=tmp_path / "views")
    edited = store.put_dir("evaluate", "edited", folder, {"summary": {"accuracy": 0.5}})
    manifest = store._path("entries", "evaluate", "edited", "MANIFEST.json")
    body = json.loads(store.fs.cat_file(manifest))
    body["meta"]["summary"]["accuracy"] = 0.99
    store.fs.pipe_file(manifest, json.dumps(body).encode())
    assert store.lookup("evaluate", "edited") is None
    assert "evaluate/edited" in caplog.text and "edited?" in caplog.text

    truncated = store.put_dir("train", "truncated", folder, {})
    blob = store._blob_path(truncated.files["sub/b.bin"]["sha256"])
    store.fs.pipe_file(blob, store.fs.cat_file(blob)[:10])
    assert store.lookup("train", "truncated") is None
    assert "sub/b.bin" in caplog.text
    assert edited.digest != truncated.digest


def test_a_tampered_blob_is_never_served_and_the_next_store_replaces_it(s3_env, folder, tmp_path, caplog):
    """Same size, other bytes. The machine that verified the object sees its new ETag at lookup and
    hashes it; a machine that never saw it catches it when it downloads. Either way the damaged
    object is removed, the entry is a miss, and storing the stage again puts the right bytes back."""
    root = fresh_root()
    writer = ArtifactStore(root, local_cache=tmp_path / "writer")
    entry = writer.put_dir("train", "k1", folder, {})
    blob = writer._blob_path(entry.files["a.txt"]["sha256"])
    writer.fs.pipe_file(blob, b"ALPHA")

    other = ArtifactStore(root, local_cache=tmp_path / "other")
    with pytest.raises(StoreError, match="a.txt does not match its checksum"):
        other.materialize(other.lookup("train", "k1"))
    assert not (tmp_path / "other" / entry.digest).exists()
    assert writer.lookup("train", "k1") is None  # the damaged object was removed: a miss

    writer.fs.pipe_file(blob, b"ALPHA")  # damaged again; this time the writer's lookup finds it
    assert writer.lookup("train", "k1") is None
    assert "a.txt does not match its sha256" in caplog.text

    writer.put_dir("train", "k1", folder, {})  # what the stage's rerun stores
    view = ArtifactStore(root, local_cache=tmp_path / "third").materialize(writer.lookup("train", "k1"))
    assert (view / "a.txt").read_text() == "alpha"


def test_a_rerun_of_a_damaged_entry_replaces_it_even_where_it_puts_the_damaged_file_back(s3_env, tmp_path, caplog):
    """The damaged file is deterministic (a model), another is not (a benchmark's numbers). The
    rerun uploads the model's bytes under its sha, which made the old manifest whole again: it
    stood as "another run stored it first" and the run reported the old numbers."""
    store = ArtifactStore(fresh_root(), local_cache=tmp_path / "views")
    runs = []
    for speed in (1.0, 2.0):
        out = tmp_path / f"run-{speed}"
        out.mkdir()
        (out / "model.bin").write_bytes(b"same model bytes")
        (out / "benchmark.json").write_text(json.dumps({"tokens_per_s": speed}))
        runs.append((out, {"summary": {"tokens_per_s": speed}}))
    first = store.put_dir("benchmark", "k", *runs[0])
    blob = store._blob_path(first.files["model.bin"]["sha256"])
    store.fs.pipe_file(blob, b"SAME MODEL BYTES")  # same size, other bytes
    assert store.lookup("benchmark", "k") is None

    stored = store.put_dir("benchmark", "k", *runs[1])  # what the stage's rerun stores
    assert stored.manifest["meta"]["summary"] == {"tokens_per_s": 2.0}
    assert store.lookup("benchmark", "k").digest == stored.digest != first.digest
    assert "another run stored it first" not in caplog.text


def test_a_damaged_copy_under_manifests_is_served_from_its_intact_entry(s3_env, folder, tmp_path, caplog):
    """Downstream stages, the report and export open an artifact by digest (manifests/<digest>.json).
    An edited copy failed the next stage ("missing or damaged; rerun with --from-stage") although
    the entry still held that very manifest."""
    store = ArtifactStore(fresh_root(), local_cache=tmp_path / "views")
    entry = store.put_dir("build_onnx", "k", folder, {"summary": {"accuracy": 0.5}})
    copy = store._by_digest_path(entry.digest)
    body = json.loads(store.fs.cat_file(copy))
    body["meta"]["summary"]["accuracy"] = 0.99
    store.fs.pipe_file(copy, json.dumps(body).encode())
    assert store.by_digest(entry.digest) is None and "edited?" in caplog.text

    found = store.by_digest(entry.digest, "build_onnx", "k")
    assert found is not None and found.manifest["meta"]["summary"] == {"accuracy": 0.5}
    assert store.by_digest(entry.digest).digest == entry.digest  # the copy was written again
    other = store.put_dir("build_onnx", "k2", folder, {"summary": {"accuracy": 0.7}})
    other_digest = entry.digest[:-1] + ("1" if entry.digest.endswith("0") else "0")  # never the digest itself
    assert store.by_digest(other_digest, "build_onnx", "k2") is None  # only that very manifest
    assert other.digest != entry.digest


def test_unreachable_endpoint_names_it_not_the_keys(monkeypatch, s3_server, caplog):
    from seaweedfs import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    started = time.monotonic()
    with pytest.raises(StoreError) as error:
        ArtifactStore("s3://grove-tests/x").check_writable()
    assert f"cannot reach the S3 endpoint {endpoint}" in str(error.value)
    assert SECRET_KEY not in str(error.value) and "AKIAEXAMPLEKEY" not in str(error.value)
    assert time.monotonic() - started < 60  # fails fast, not after botocore's default minutes
    # what `grove runs/show/models/export/gc` check first: one line, not a retry warning per backoff
    with pytest.raises(StoreError, match=f"checking the root: cannot reach the S3 endpoint {endpoint}"):
        ArtifactStore("s3://grove-tests/x").exists()
    assert "retrying" not in caplog.text


def test_no_credentials_is_said_at_once_not_retried(monkeypatch, s3_server, tmp_path, caplog):
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.env()["AWS_ENDPOINT_URL"])
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    result = CliRunner().invoke(app, ["runs", "--store", "s3://grove-tests/x"])
    assert result.exit_code == 2 and "checking the root: no S3 credentials found: set AWS_ACCESS_KEY_ID" \
        in " ".join(result.output.split()), result.output
    assert not [r for r in caplog.records if "retrying" in r.getMessage()], "no credentials is no transient error"


def test_wrong_keys_and_missing_bucket(monkeypatch, s3_env):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-at-all")
    with pytest.raises(StoreError, match="access denied: check the keys") as error:
        ArtifactStore("s3://grove-tests/x").check_writable()
    assert "not-the-secret-at-all" not in str(error.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        ArtifactStore("s3://no-such-bucket/x").check_writable()


def test_server_killed_mid_upload_never_leaves_a_partial_hit(tmp_path, monkeypatch):
    """Kill the S3 server while an entry uploads, start it again: the upload either goes
    through on a retry or fails with a StoreError; a lookup never returns a partial entry."""
    server = SeaweedServer(tmp_path / "weed").start()
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    server.make_bucket("grove-tests")
    src = tmp_path / "big"
    src.mkdir()
    for i in range(8):
        (src / f"part{i}.bin").write_bytes(os.urandom(4 * 2**20))
    store = ArtifactStore("s3://grove-tests/killed", local_cache=tmp_path / "views")
    outcome: dict[str, object] = {}

    def upload() -> None:
        try:
            outcome["entry"] = store.put_dir("merge_adapters", "k1", src, {})
        except StoreError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=upload)
    worker.start()
    deadline = time.monotonic() + 30
    while not store.fs.find(store._path("blobs")) and time.monotonic() < deadline:
        time.sleep(0.05)
        store.fs.invalidate_cache()
    server.stop(sig=9)
    assert "entry" not in outcome  # the kill landed mid-upload
    time.sleep(1)
    server.start()
    worker.join(timeout=120)
    try:
        found = store.lookup("merge_adapters", "k1")
        if "error" in outcome:
            assert found is None  # failed cleanly: nothing that looks complete
        else:
            assert found is not None and found.digest == outcome["entry"].digest
            view = store.materialize(found)
            assert all((view / p.name).read_bytes() == p.read_bytes() for p in src.iterdir())
    finally:
        server.stop()
