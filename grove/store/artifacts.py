"""ArtifactStore: content-addressed blobs and per-entry manifests over fsspec, with retries."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from grove.credentials import S3Access, s3_access

from grove.store.checkpoints import Checkpoints
from grove.store.entries import MANIFEST, Entry, StoreError, _transient, manifest_digest, sha256_file

log = logging.getLogger("grove.store")
T = TypeVar("T")


class ArtifactStore(Checkpoints):
    """Stores directories of stage outputs under content-addressed blobs."""

    def __init__(self, root: str, credentials_block: str | None = None, local_cache: str | Path | None = None,
                 attempts: int = 4):
        self.root = root.rstrip("/")
        protocol = fsspec.core.split_protocol(self.root)[0] or "file"
        self.access = s3_access(credentials_block) if protocol in ("s3", "s3a") else S3Access()
        options = dict(self.access.options)
        if protocol in ("s3", "s3a"):
            options["skip_instance_cache"] = True  # keys may differ between stores in one process
        self.fs, self._base = fsspec.core.url_to_fs(self.root, **options)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            self._base = os.path.abspath(self._base)
        from grove.machine import grove_home

        cache = local_cache or (Path(self._base) / ".materialized" if self.is_local else
                                grove_home() / "materialized")
        self.materialized = Path(cache)
        self.attempts = attempts

    def __repr__(self) -> str:  # never the keys
        return f"ArtifactStore({self.root!r})"

    # ---- paths -------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self._base, *parts])

    def _blob_path(self, sha: str) -> str:
        return self._path("blobs", sha[:2], sha)

    def _manifest_path(self, stage: str, key: str) -> str:
        return self._path("entries", stage, key, MANIFEST)

    def _by_digest_path(self, digest: str) -> str:
        return self._path("manifests", f"{digest}.json")

    @property
    def location(self) -> str:
        """The root and, for S3, the endpoint: what error messages name (never the keys)."""
        return self.root if self.is_local else f"{self.root} at {self.access.endpoint}"

    def entry_uri(self, stage: str, key: str) -> str:
        return f"{self.root}/entries/{stage}/{key}"

    def blob_uri(self, sha: str) -> str:
        return f"{self.root}/blobs/{sha[:2]}/{sha}"

    # ---- errors and retries --------------------------------------------------------------
    def _explain(self, exc: BaseException, doing: str) -> StoreError:
        if isinstance(exc, StoreError):
            return exc
        message = self.access.scrub(str(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = "the disk is full"
        elif isinstance(exc, PermissionError) or "AccessDenied" in message or "InvalidAccessKeyId" in message \
                or "SignatureDoesNotMatch" in message:
            reason = ("access denied: check the keys (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
                      "grove.aws_credentials_block)" if not self.is_local else "permission denied")
        elif "NoSuchBucket" in message:
            reason = f"bucket {self._base.split('/')[0]!r} does not exist (create it first)"
        elif "connect" in message.lower() or isinstance(exc, (ConnectionError, TimeoutError)):
            reason = f"cannot reach the S3 endpoint {self.access.endpoint}"
        else:
            reason = f"{type(exc).__name__}: {message}"
        return StoreError(f"artifact store {self.location}: {doing}: {reason}", transient=_transient(exc))

    def _retry(self, doing: str, action: Callable[[], T]) -> T:
        """Run one storage call, retrying transient errors with jittered backoff."""
        def warn(state) -> None:
            log.warning("%s: %s; retrying (attempt %d of %d)", doing,
                        self.access.scrub(str(state.outcome.exception())), state.attempt_number + 1, self.attempts)

        try:
            for attempt in Retrying(stop=stop_after_attempt(self.attempts), reraise=True,
                                    wait=wait_exponential_jitter(multiplier=0.5, max=8),
                                    retry=retry_if_exception(_transient), before_sleep=warn):
                with attempt:
                    return action()
        except FileNotFoundError:
            raise  # callers decide what a missing file means (usually: a cache miss)
        except Exception as exc:  # noqa: BLE001 - every backend error becomes one clear StoreError
            raise self._explain(exc, doing) from None
        raise AssertionError("unreachable")

    def check_writable(self) -> None:
        """Fail early, before any compute, when the root cannot be reached or written.

        No retries: an unreachable store should fail now, not after a minute of backoff."""
        probe = self._path(f".grove-write-check-{os.getpid()}")
        try:
            if self.is_local:
                self.fs.makedirs(self._base, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except FileNotFoundError as exc:
            if self.is_local:
                raise self._explain(exc, "not writable") from None
            raise StoreError(f"artifact store {self.location}: not writable: bucket "
                             f"{self._base.split('/')[0]!r} does not exist (create it first)") from None
        except Exception as exc:  # noqa: BLE001
            raise self._explain(exc, "not writable") from None

    # ---- writing -----------------------------------------------------------------------
    def _put_blob(self, local_file: Path, sha: str, size: int) -> None:
        target = self._blob_path(sha)
        try:
            if self.fs.info(target).get("size") == size:
                return  # identical content is stored once (one HEAD request on S3)
        except FileNotFoundError:
            pass
        if not self.is_local:
            # An S3 PUT appears whole or not at all: no temporary name needed.
            self.fs.put_file(str(local_file), target)
            return
        self.fs.makedirs(self._path("blobs", sha[:2]), exist_ok=True)
        tmp = f"{target}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            self.fs.put_file(str(local_file), tmp)
            os.chmod(tmp, 0o444)  # materialized views hard-link blobs: keep them read-only
            os.replace(tmp, target)
        finally:
            self._discard(tmp)

    def _write_json(self, path: str, body: Any) -> None:
        data = json.dumps(body, indent=1, sort_keys=True).encode()
        if not self.is_local:
            self.fs.pipe_file(path, data)
            return
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)  # atomic: readers see the old file or the new one
        finally:
            self._discard(tmp)

    def _read_json(self, path: str, doing: str) -> Any:
        """Read with retries; a file that is not JSON raises ValueError (callers: damaged)."""
        return json.loads(self._retry(doing, lambda: self.fs.cat_file(path)))

    def _discard(self, path: str) -> None:
        try:
            if self.fs.exists(path):
                self.fs.rm_file(path)
        except Exception:  # noqa: BLE001 - best effort clean-up of a temp file
            pass

    def put_dir(self, stage: str, key: str, local_dir: Path, meta: dict[str, Any]) -> Entry:
        """Store every file under local_dir as the entry (stage, key); manifest last."""
        files = self._put_files(local_dir, stage)
        body = {"stage": stage, "key": key, "files": files, "meta": meta, "digest": manifest_digest(files, meta)}
        self._retry(f"writing the manifest of {stage}/{key}",
                    lambda: self._write_json(self._by_digest_path(body["digest"]), body))
        # Two runs of one config at once both compute the stage; the first to finish wins and
        # the other adopts its entry, so both continue from the same files (and the same
        # downstream keys) even where the stage is not bit-for-bit deterministic.
        first = self.lookup(stage, key)
        if first is None:
            self._retry(f"writing the manifest of {stage}/{key}",
                        lambda: self._write_json(self._manifest_path(stage, key), body))
            first = self.lookup(stage, key)  # a run that wrote at the same moment may have won
        if first is not None and first.digest != body["digest"]:
            log.warning("entry %s/%s: another run stored it first; continuing with that entry", stage, key)
            return first
        return Entry(stage, key, body)

    def _put_files(self, local_dir: Path, label: str) -> dict[str, dict[str, Any]]:
        """A blob for every file under local_dir; the manifest's `files` (path -> sha256, size)."""
        files: dict[str, dict[str, Any]] = {}
        for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            sha, size = sha256_file(path), path.stat().st_size
            self._retry(f"storing {label}/{rel}", lambda: self._put_blob(path, sha, size))
            files[rel] = {"sha256": sha, "size": size}
        return files

    def put_json(self, relpath: str, body: Any) -> str:
        """A small JSON document outside the entries (run records); returns its URI."""
        self._retry(f"writing {relpath}", lambda: self._write_json(self._path(relpath), body))
        return f"{self.root}/{relpath}"

    # ---- reading -----------------------------------------------------------------------
    def _verified(self, body: Any, where: str) -> Entry | None:
        """The entry if the manifest matches its digest and its blobs have the recorded sizes."""
        if not isinstance(body, dict) or body.get("digest") != manifest_digest(body.get("files"), body.get("meta")):
            log.warning("entry %s: manifest does not match its digest (edited?); treating as missing", where)
            return None
        sizes = self._blob_sizes([info["sha256"] for info in body["files"].values()])
        for rel, info in body["files"].items():
            if sizes.get(info["sha256"]) != info["size"]:
                log.warning("entry %s: file %s is missing or has the wrong size; treating as missing", where, rel)
                return None
        return Entry(body["stage"], body["key"], body)

    def _blob_sizes(self, shas: list[str]) -> dict[str, int]:
        sizes = {}
        for sha in set(shas):
            try:
                sizes[sha] = self._retry(f"reading blob {sha[:12]}", lambda: self.fs.size(self._blob_path(sha)))
            except FileNotFoundError:
                pass
        return sizes

    def _load(self, path: str, where: str) -> Entry | None:
        try:
            body = self._read_json(path, f"reading the manifest of {where}")
        except FileNotFoundError:
            return None
        except ValueError as exc:
            log.warning("entry %s: unreadable manifest (%s); treating as missing", where, exc)
            return None
        return self._verified(body, where)

    def lookup(self, stage: str, key: str) -> Entry | None:
        """The entry if it is complete and intact, else None (a damaged one with a warning:
        the stage simply runs again)."""
        return self._load(self._manifest_path(stage, key), f"{stage}/{key}")

    def by_digest(self, digest: str) -> Entry | None:
        """The exact artifact a reference names, whatever entry its key points to now."""
        return self._load(self._by_digest_path(digest), f"manifests/{digest[:12]}")

    def materialize(self, entry: Entry) -> Path:
        """A local folder holding the entry's files (hard links for a local root; downloaded
        and checked against their sha256 for a remote one)."""
        target = self.materialized / entry.digest
        if (target / ".complete").exists():
            return target
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=_ensure(self.materialized)))
        try:
            for rel, info in entry.files.items():
                dest = staging / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                blob = self._blob_path(info["sha256"])
                if self.is_local:
                    try:
                        os.link(blob, dest)
                    except OSError:
                        shutil.copyfile(blob, dest)
                    continue
                self._retry(f"downloading {entry.stage}/{rel}", lambda: self.fs.get_file(blob, str(dest)))
                if sha256_file(dest) != info["sha256"]:
                    raise StoreError(f"artifact store {self.location}: {entry.stage}/{entry.key} file {rel} "
                                     f"does not match its checksum; rerun with --from-stage {entry.stage}")
            (staging / ".complete").write_text(entry.digest)
            staging.rename(target)
        except OSError:
            if not (target / ".complete").exists():
                raise
        finally:  # another process may have materialized it first: keep theirs
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def read_json(self, entry: Entry, rel: str) -> Any:
        return self._read_json(self._blob_path(entry.files[rel]["sha256"]), f"reading {entry.stage}/{rel}")

    def entries(self, stage: str | None = None) -> list[Entry]:
        found = []
        for path in self._retry("listing entries",
                                lambda: self.fs.glob(self._path("entries", stage or "*", "*", MANIFEST))):
            parts = path.rstrip("/").split("/")
            entry = self.lookup(parts[-3], parts[-2])
            if entry:
                found.append(entry)
        return found

    def remove(self, relpath: str) -> None:
        try:
            self._retry(f"removing {relpath}", lambda: self.fs.rm_file(self._path(relpath)))
        except FileNotFoundError:
            pass

    def get_json(self, relpath: str) -> Any | None:
        """A small JSON document outside the entries, or None if there is none."""
        try:
            return self._read_json(self._path(relpath), f"reading {relpath}")
        except FileNotFoundError:
            return None

    def list_json(self, folder: str, pattern: str = "*.json") -> list[Any]:
        """Every JSON document directly under a folder of the root (e.g. runs/)."""
        paths = self._retry(f"listing {folder}", lambda: self.fs.glob(self._path(folder, pattern)))
        documents = []
        for path in sorted(paths):
            try:
                documents.append(self._read_json(path, f"reading {path}"))
            except (FileNotFoundError, StoreError, ValueError) as exc:
                log.warning("skipping %s: %s", path, exc)
        return documents


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
