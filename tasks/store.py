"""The artifact store: content-addressed files and per-entry manifests over fsspec.

Layout under the artifact root (a local folder or any fsspec URL):

    blobs/<sha[:2]>/<sha>              each distinct file once, named by its sha256
    entries/<stage>/<key>/MANIFEST.json  what one stage stored for one cache key

A manifest lists every file of the entry (relative path, size, sha256) and is
written LAST, after all blobs are in place: an entry without a manifest is
incomplete and never counts as a cache hit. The store knows nothing of stages
beyond the names it is given.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

MANIFEST = "MANIFEST.json"
_CHUNK = 8 * 1024 * 1024


class StoreError(RuntimeError):
    """The store cannot be used (unreachable, full, corrupted entry)."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Entry:
    """A complete, verified entry: its manifest and where its files are."""

    stage: str
    key: str
    manifest: dict[str, Any]

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest["files"]

    @property
    def size_bytes(self) -> int:
        return sum(f["size"] for f in self.files.values())


class ArtifactStore:
    """Stores directories of stage outputs under content-addressed blobs."""

    def __init__(self, root: str, local_cache: str | Path | None = None):
        self.root = root.rstrip("/")
        self.fs, self._base = fsspec.core.url_to_fs(self.root)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            self._base = os.path.abspath(self._base)
        cache = local_cache or (Path(self._base) / ".materialized" if self.is_local else
                                Path.home() / ".cache" / "grove" / "materialized")
        self.materialized = Path(cache)

    # ---- paths -------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self._base, *parts])

    def _blob_path(self, sha: str) -> str:
        return self._path("blobs", sha[:2], sha)

    @property
    def results_path(self) -> str:
        """Where Prefect persists task results (small ArtifactRefs) for this store."""
        return self._path("prefect-results")

    def entry_uri(self, stage: str, key: str) -> str:
        return f"{self.root}/entries/{stage}/{key}"

    def check_writable(self) -> None:
        """Fail early, before any compute, when the root cannot be written."""
        probe = self._path(".grove-write-check")
        try:
            self.fs.makedirs(self._base, exist_ok=True)
            with self.fs.open(probe, "wb") as handle:
                handle.write(b"ok")
            self.fs.rm(probe)
        except Exception as exc:  # noqa: BLE001 - any backend error means unusable
            raise StoreError(f"artifact root {self.root!r} is not writable: {type(exc).__name__}: {exc}") from exc

    # ---- writing -----------------------------------------------------------------------
    def _put_blob(self, local_file: Path, sha: str, size: int) -> None:
        target = self._blob_path(sha)
        if self.fs.exists(target) and self.fs.size(target) == size:
            return  # identical content is stored once
        self.fs.makedirs(self._path("blobs", sha[:2]), exist_ok=True)
        tmp = f"{target}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            self.fs.put_file(str(local_file), tmp)
            self.fs.mv(tmp, target)
            if self.is_local:
                os.chmod(target, 0o444)  # materialized views hard-link blobs: keep them read-only
        except OSError as exc:
            self._discard(tmp)
            raise StoreError(f"could not store {local_file.name} under {self.root}: {exc}") from exc

    def _discard(self, path: str) -> None:
        try:
            if self.fs.exists(path):
                self.fs.rm(path)
        except Exception:  # noqa: BLE001 - best effort clean-up of a temp file
            pass

    def put_dir(self, stage: str, key: str, local_dir: Path, meta: dict[str, Any]) -> Entry:
        """Store every file under local_dir as the entry (stage, key); manifest last."""
        files: dict[str, dict[str, Any]] = {}
        for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            sha, size = sha256_file(path), path.stat().st_size
            self._put_blob(path, sha, size)
            files[rel] = {"sha256": sha, "size": size}
        body = {"stage": stage, "key": key, "files": files, "meta": meta}
        body["digest"] = sha256_bytes(json.dumps({"files": files, "meta": meta}, sort_keys=True).encode())
        manifest_path = self._path("entries", stage, key, MANIFEST)
        self.fs.makedirs(self._path("entries", stage, key), exist_ok=True)
        tmp = f"{manifest_path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            with self.fs.open(tmp, "w") as handle:
                json.dump(body, handle, indent=1, sort_keys=True)
            self.fs.mv(tmp, manifest_path)
        except OSError as exc:
            self._discard(tmp)
            raise StoreError(f"could not write the manifest of {stage}/{key} under {self.root}: {exc}") from exc
        return Entry(stage, key, body)

    # ---- reading -----------------------------------------------------------------------
    def lookup(self, stage: str, key: str) -> Entry | None:
        """The entry if it is complete and its blobs have the recorded sizes, else None.

        A manifest that does not match its own digest, or a blob of the wrong size, is
        treated as a miss with a warning: the stage simply runs again.
        """
        manifest_path = self._path("entries", stage, key, MANIFEST)
        try:
            with self.fs.open(manifest_path, "r") as handle:
                body = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            _warn(f"entry {stage}/{key}: unreadable manifest ({exc}); treating as missing")
            return None
        expected = sha256_bytes(json.dumps({"files": body.get("files"), "meta": body.get("meta")},
                                           sort_keys=True).encode())
        if body.get("digest") != expected:
            _warn(f"entry {stage}/{key}: manifest does not match its digest (edited?); treating as missing")
            return None
        for rel, info in body["files"].items():
            blob = self._blob_path(info["sha256"])
            try:
                size = self.fs.size(blob)
            except FileNotFoundError:
                size = None
            if size != info["size"]:
                _warn(f"entry {stage}/{key}: file {rel} is missing or has the wrong size; treating as missing")
                return None
        return Entry(stage, key, body)

    def materialize(self, entry: Entry) -> Path:
        """A local folder holding the entry's files (hard links for a local root)."""
        target = self.materialized / entry.digest
        if (target / ".complete").exists():
            return target
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=_ensure(self.materialized)))
        for rel, info in entry.files.items():
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            blob = self._blob_path(info["sha256"])
            if self.is_local:
                try:
                    os.link(blob, dest)
                except OSError:
                    shutil.copyfile(blob, dest)
            else:
                self.fs.get_file(blob, str(dest))
        (staging / ".complete").write_text(entry.digest)
        try:
            staging.rename(target)
        except OSError:  # another process materialized it first
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def read_json(self, entry: Entry, rel: str) -> Any:
        with self.fs.open(self._blob_path(entry.files[rel]["sha256"]), "r") as handle:
            return json.load(handle)

    def entries(self, stage: str | None = None) -> list[Entry]:
        pattern = self._path("entries", stage or "*", "*", MANIFEST)
        found = []
        for path in self.fs.glob(pattern):
            parts = path.rstrip("/").split("/")
            entry = self.lookup(parts[-3], parts[-2])
            if entry:
                found.append(entry)
        return found


def folder_bytes(folder: str | Path) -> int:
    """Size on disk of every file under a local folder."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _warn(message: str) -> None:
    import logging

    logging.getLogger("grove.store").warning(message)
