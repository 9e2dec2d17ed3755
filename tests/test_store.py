"""The artifact store: manifest last, verified reads, identical files stored once."""

from __future__ import annotations

import json
import os

import pytest

from grove.store import ArtifactStore, StoreError


def test_stored_entry_reads_back_identically(tmp_path, folder):
    store = ArtifactStore(str(tmp_path / "root"))
    entry = store.put_dir("train", "k1", folder, {"summary": {"loss": 1.0}})
    found = store.lookup("train", "k1")
    assert found is not None and found.digest == entry.digest
    view = store.materialize(found)
    assert (view / "a.txt").read_text() == "alpha"
    assert (view / "sub" / "b.bin").read_bytes() == (folder / "sub" / "b.bin").read_bytes()


def test_entry_without_manifest_is_a_miss(tmp_path, folder):
    store = ArtifactStore(str(tmp_path / "root"))
    store.put_dir("train", "k1", folder, {})
    os.remove(tmp_path / "root" / "entries" / "train" / "k1" / "MANIFEST.json")
    assert store.lookup("train", "k1") is None


def test_hand_edited_manifest_is_detected(tmp_path, folder, caplog):
    store = ArtifactStore(str(tmp_path / "root"))
    store.put_dir("train", "k1", folder, {"summary": {"accuracy": 0.5}})
    path = tmp_path / "root" / "entries" / "train" / "k1" / "MANIFEST.json"
    body = json.loads(path.read_text())
    body["meta"]["summary"]["accuracy"] = 0.99
    path.write_text(json.dumps(body))
    assert store.lookup("train", "k1") is None
    assert "train/k1" in caplog.text and "edited" in caplog.text


def test_truncated_file_is_detected(tmp_path, folder, caplog):
    store = ArtifactStore(str(tmp_path / "root"))
    entry = store.put_dir("train", "k1", folder, {})
    blob = tmp_path / "root" / "blobs" / entry.files["sub/b.bin"]["sha256"][:2] / entry.files["sub/b.bin"]["sha256"]
    os.chmod(blob, 0o644)
    blob.write_bytes(blob.read_bytes()[:10])
    assert store.lookup("train", "k1") is None
    assert "sub/b.bin" in caplog.text


def test_identical_files_are_stored_once(tmp_path, folder):
    store = ArtifactStore(str(tmp_path / "root"))
    store.put_dir("build_onnx", "k1", folder, {})
    store.put_dir("build_onnx", "k2", folder, {"summary": {"other": True}})
    blobs = [p for p in (tmp_path / "root" / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 2


def test_blobs_are_read_only_so_views_cannot_corrupt_them(tmp_path, folder):
    """Local views hard-link blobs; the blobs carry no write permission bits."""
    store = ArtifactStore(str(tmp_path / "root"))
    view = store.materialize(store.put_dir("train", "k1", folder, {}))
    assert os.stat(view / "a.txt").st_mode & 0o222 == 0


def test_unwritable_root_fails_before_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="not writable"):
        ArtifactStore(str(blocker / "store")).check_writable()
