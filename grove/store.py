"""The artifact store: content-addressed files and per-entry manifests over fsspec.

Layout under the artifact root (a local folder or s3://bucket/prefix, any fsspec URL):

    blobs/<sha[:2]>/<sha>                each distinct file once, named by its sha256
    manifests/<digest>.json              every manifest ever written, immutable, by digest
    entries/<stage>/<key>/MANIFEST.json  the entry for one stage's cache key (a manifest copy)
    runs/<run id>.json                   what each run used and produced (grove runs / gc)
    checkpoints/<stage>/<key>/<step:08d>/MANIFEST.json
                                         a running stage's checkpoint (training state)

A manifest lists every file of the entry (relative path, size, sha256) and is written
LAST, after all blobs are in place: an entry without a manifest is incomplete and never
counts as a cache hit. Downstream stages open an upstream artifact by its digest, through
the immutable copy, so two runs racing on one key each read a consistent set of files
whichever manifest ends up as the entry. The store knows nothing of stages beyond the
names it is given.

Checkpoints follow the same rules (blobs, manifest written last, verified when read). The
newest two of a (stage, key) are kept while the stage runs and all are dropped once its
entry is stored; dropping one deletes the blobs no other manifest lists, so optimizer
states do not pile up between `grove gc` runs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from grove.credentials import S3Access, s3_access

MANIFEST = "MANIFEST.json"
_CHUNK = 8 * 1024 * 1024
log = logging.getLogger("grove.store")
T = TypeVar("T")


class StoreError(RuntimeError):
    """The store cannot be used (unreachable, denied, full, corrupted entry)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient  # a retry later may succeed (connection dropped, 5xx)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_digest(files: Any, meta: Any) -> str:
    return sha256_bytes(json.dumps({"files": files, "meta": meta}, sort_keys=True).encode())


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

    @property
    def step(self) -> int | None:
        """A checkpoint's training step (None for an entry)."""
        return self.manifest["meta"].get("step")

    @property
    def content(self) -> str:
        """The files alone (names and sha256), not when or how fast they were made: a stage
        that reruns and writes the same bytes leaves every downstream cache key unchanged."""
        return sha256_bytes(json.dumps(self.files, sort_keys=True).encode())


def _transient(exc: BaseException) -> bool:
    """Errors worth another try: dropped connections, timeouts, 5xx; never a missing file,
    a denied request or a full disk."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
        return False
    return isinstance(exc, (OSError, TimeoutError, ConnectionError)) or "botocore" in type(exc).__module__


class ArtifactStore:
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

    # ---- checkpoints -------------------------------------------------------------------
    def put_checkpoint(self, stage: str, key: str, step: int, local_dir: Path, keep: int = 2) -> Entry:
        """Store local_dir as the checkpoint at `step` of (stage, key), manifest last; then
        drop all but the newest `keep` checkpoints of (stage, key) (0 keeps all)."""
        label = f"checkpoint {stage}/{key}@{step}"
        files = self._put_files(local_dir, label)
        meta = {"step": step, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        body = {"stage": stage, "key": key, "files": files, "meta": meta, "digest": manifest_digest(files, meta)}
        self._retry(f"writing the manifest of {label}",
                    lambda: self._write_json(self._checkpoint_path(stage, key, step, MANIFEST), body))
        if keep > 0:
            self._drop_checkpoints(stage, key, self.checkpoint_steps(stage, key)[:-keep])
        return Entry(stage, key, body)

    def checkpoint_steps(self, stage: str, key: str) -> list[int]:
        """Steps of (stage, key) that have a checkpoint manifest, oldest first (not verified)."""
        paths = self._retry(f"listing the checkpoints of {stage}/{key}",
                            lambda: self.fs.glob(self._checkpoint_path(stage, key, "*", MANIFEST)))
        names = [path.rstrip("/").split("/")[-2] for path in paths]
        return sorted(int(name) for name in names if name.isdigit())

    def latest_checkpoint(self, stage: str, key: str) -> Entry | None:
        """The newest complete, verified checkpoint of (stage, key); a damaged one is skipped
        (with a warning) in favour of the one before it."""
        skipped = []
        for step in reversed(self.checkpoint_steps(stage, key)):
            entry = self._load(self._checkpoint_path(stage, key, step, MANIFEST), f"{stage}/{key} checkpoint {step}")
            if entry is not None:
                if skipped:
                    log.warning("checkpoint %s/%s: step %s unusable; falling back to step %d", stage, key,
                                ", ".join(map(str, skipped)), step)
                return entry
            skipped.append(step)
        return None

    def drop_checkpoints(self, stage: str, key: str) -> int:
        """Drop every checkpoint of (stage, key) (once its entry is stored); how many there were."""
        folder = self._path("checkpoints", stage, key)
        if not self._retry(f"listing the checkpoints of {stage}/{key}", lambda: self.fs.exists(folder)):
            return 0
        steps = self.checkpoint_steps(stage, key)
        self._drop_checkpoints(stage, key, steps)
        try:
            self._retry(f"removing the checkpoints of {stage}/{key}", lambda: self.fs.rm(folder, recursive=True))
        except FileNotFoundError:
            pass
        return len(steps)

    def _checkpoint_path(self, stage: str, key: str, step: int | str, *parts: str) -> str:
        return self._path(_checkpoint_rel(stage, key, step, *parts))

    def _drop_checkpoints(self, stage: str, key: str, steps: list[int]) -> None:
        """Manifests first (a half-dropped checkpoint never counts), then the blobs no other
        manifest lists, then the local views."""
        if not steps:
            return
        shas, digests = set(), []
        for step in steps:
            manifest = _checkpoint_rel(stage, key, step, MANIFEST)
            try:
                body = self._read_json(self._path(manifest), f"reading the manifest of {stage}/{key} checkpoint {step}")
                shas |= {info["sha256"] for info in body["files"].values()}
                digests.append(body["digest"])
            except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
                pass  # unreadable: its blobs stay for `grove gc`
            self.remove(manifest)
        live = self._listed_blobs()
        if live is not None:
            for sha in shas - live:
                self.remove(f"blobs/{sha[:2]}/{sha}")
        for digest in digests:
            shutil.rmtree(self.materialized / digest, ignore_errors=True)
        if self.is_local:  # the emptied step folders (S3 has no folders)
            for step in steps:
                shutil.rmtree(self._checkpoint_path(stage, key, step), ignore_errors=True)

    def _listed_blobs(self) -> set[str] | None:
        """Every blob a manifest (entry, by-digest copy or checkpoint) lists; None if one cannot
        be read. The manifests are fetched in one batch (concurrently on S3)."""
        patterns = (self._path("entries", "*", "*", MANIFEST), self._path("manifests", "*.json"),
                    self._checkpoint_path("*", "*", "*", MANIFEST))
        paths = [path for pattern in patterns
                 for path in self._retry("listing manifests", lambda: self.fs.glob(pattern))]
        shas: set[str] = set()
        for body in self.read_manifests(paths).values():
            if body is None:
                return None  # cannot tell what it lists: delete nothing (grove gc will)
            shas |= {info["sha256"] for info in body["files"].values()}
        return shas

    def read_manifests(self, paths: list[str]) -> dict[str, dict | None]:
        """Manifests fetched in one batch (concurrently on S3): path -> body, None for one that
        cannot be parsed; those removed meanwhile are left out."""
        if not paths:
            return {}
        raw = self._retry("reading manifests", lambda: self.fs.cat(paths, on_error="return"))
        bodies: dict[str, dict | None] = {}
        for path, data in raw.items():
            if isinstance(data, FileNotFoundError):
                continue  # dropped meanwhile
            try:
                body = json.loads(data) if not isinstance(data, Exception) else None
                bodies[path] = body if isinstance(body, dict) and isinstance(body.get("files"), dict) else None
            except ValueError:
                bodies[path] = None
        return bodies


def _checkpoint_rel(stage: str, key: str, step: int | str, *parts: str) -> str:
    return "/".join(["checkpoints", stage, key, f"{step:08d}" if isinstance(step, int) else step, *parts])


def folder_bytes(folder: str | Path) -> int:
    """Size on disk of every file under a local folder."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---- garbage collection -------------------------------------------------------------------------
@dataclass
class GcReport:
    entries: list[str]
    blobs: int
    bytes_freed: int
    other: int  # superseded manifests, Prefect result records, leftovers of interrupted writes


def _age_seconds(info: dict[str, Any]) -> float:
    stamp = info.get("mtime") or info.get("LastModified") or info.get("created")
    if stamp is None:
        return float("inf")
    seconds = stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)
    return time.time() - seconds


def collect_garbage(store: ArtifactStore, keep: set[tuple[str, str]], grace_seconds: float,
                    dry_run: bool = False) -> GcReport:
    """Remove every entry not in `keep`, then every file no remaining manifest refers to.

    Files younger than grace_seconds are left alone: a run in progress may have uploaded
    blobs whose manifest it has not written yet.
    """
    fs, path = store.fs, store._path
    removed, remove_paths = [], []
    live_shas: set[str] = set()
    live_digests: set[str] = set()
    manifests = store._retry("listing manifests", lambda: fs.glob(path("entries", "*", "*", MANIFEST))
                             + fs.glob(path("checkpoints", "**", MANIFEST)))
    for manifest, body in store.read_manifests(manifests).items():
        parts = manifest.rstrip("/").split("/")
        if parts[-4] == "entries" and (parts[-3], parts[-2]) not in keep:
            removed.append(f"{parts[-3]}/{parts[-2]}")
            remove_paths.append(manifest)
            continue
        if body is None:  # a kept manifest we cannot read: its files cannot be told apart from garbage
            raise StoreError(f"cannot read {manifest}; gc removed nothing (fix or remove that entry first)")
        live_digests.add(body.get("digest", ""))
        live_shas.update(f["sha256"] for f in body["files"].values())
    blob_bytes, blobs, other = 0, 0, 0
    for blob, info in fs.find(path("blobs"), detail=True).items():
        name = blob.rstrip("/").split("/")[-1]
        if name.split(".tmp-")[0] in live_shas and ".tmp-" not in name:
            continue
        if _age_seconds(info) < grace_seconds:
            continue
        remove_paths.append(blob)
        blobs += ".tmp-" not in name
        blob_bytes += info.get("size", 0)
    kept_keys = {key for _, key in keep}
    for folder, keep_name in (("manifests", lambda n: n.removesuffix(".json") in live_digests),
                              ("prefect-results", lambda n: n in kept_keys)):
        for leftover, info in fs.find(path(folder), detail=True).items():
            if not keep_name(leftover.rstrip("/").split("/")[-1]) and _age_seconds(info) >= grace_seconds:
                remove_paths.append(leftover)
                other += 1
    if not dry_run:
        for victim in remove_paths:  # manifests first (listed first): an entry never outlives its files
            store._retry(f"removing {victim}", lambda: fs.rm_file(victim))
        if store.is_local:  # empty entry folders, and views whose hard links keep blobs on disk
            for name in removed:
                shutil.rmtree(path("entries", name), ignore_errors=True)
            for view in store.materialized.glob("*"):
                if not view.name.startswith(".") and view.name not in live_digests:
                    shutil.rmtree(view, ignore_errors=True)
    return GcReport(entries=removed, blobs=blobs, bytes_freed=blob_bytes, other=other)
