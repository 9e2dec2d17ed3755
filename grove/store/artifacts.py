"""ArtifactStore: content-addressed blobs and per-entry manifests over fsspec, with retries."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from grove.credentials import S3Access, s3_access

from grove.store.checkpoints import Checkpoints
from grove.store.entries import (MANIFEST, NO_CREDENTIALS, Entry, StoreError, _transient, manifest_digest,
                                 sha256_file)
from grove.store.verify import VerifiedBlobs, local_fingerprint, s3_fingerprint

log = logging.getLogger("grove.store")
T = TypeVar("T")

# Entries materialized inside a `recording_reads()` block: what a stage's output depends on beyond
# its arguments (the shared adapter-ship base), recorded in its manifest so gc keeps them.
_reads: ContextVar[dict[str, dict[str, str]] | None] = ContextVar("grove_store_reads", default=None)


@contextlib.contextmanager
def recording_reads() -> Iterator[dict[str, dict[str, str]]]:
    """Collects {digest: {stage, key, digest}} of every entry materialized inside the block."""
    reads: dict[str, dict[str, str]] = {}
    token = _reads.set(reads)
    try:
        yield reads
    finally:
        _reads.reset(token)


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

        # an S3 store's copies in a folder of its own: gc of one store never touches another's
        store_id = hashlib.sha256(f"{self.access.endpoint}|{self.root}".encode()).hexdigest()[:16]
        cache = local_cache or (Path(self._base) / ".materialized" if self.is_local else
                                grove_home() / "materialized" / store_id)
        self.materialized = Path(cache)
        self.attempts = attempts
        self._judged_damaged: set[tuple[str, str]] = set()  # (stage, key) whose entry lookup found damaged

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
        elif type(exc).__name__ in NO_CREDENTIALS:
            reason = ("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile), "
                      "or grove.aws_credentials_block")
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

    def exists(self) -> bool:
        """Whether anything was ever stored at the root (`grove runs` on a mistyped root says so).

        One attempt, like check_writable: the first touch of a store that cannot be reached fails
        now, in one line, not after a retry warning per backoff."""
        try:
            return bool(self.fs.exists(self._base))
        except FileNotFoundError:
            return False
        except Exception as exc:  # noqa: BLE001
            raise self._explain(exc, "checking the root") from None

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
    @property
    def verified(self) -> VerifiedBlobs:
        return VerifiedBlobs(self.materialized)

    def _put_blob(self, local_file: Path, sha: str, size: int) -> None:
        target = self._blob_path(sha)
        info = self._blob_info(target)
        if info is not None and info["size"] == size and self._reusable(sha, info):
            # Identical content is stored once. gc removes a blob no manifest lists once it is
            # older than its grace period; this one is about to be listed by our manifest, so its
            # timestamp is refreshed first: gc checks the age again right before it deletes.
            if self._refresh(target, sha):
                return
        if not self.is_local:
            # An S3 PUT appears whole or not at all: no temporary name needed.
            self.fs.put_file(str(local_file), target)
        else:
            self.fs.makedirs(self._path("blobs", sha[:2]), exist_ok=True)
            tmp = f"{target}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
            try:
                self.fs.put_file(str(local_file), tmp)
                os.chmod(tmp, 0o444)  # materialized views hard-link blobs: keep them read-only
                os.replace(tmp, target)
            finally:
                self._discard(tmp)
            if info is not None:  # a damaged blob was there: views still link its old bytes
                self._drop_views_of(info)
        written = self._blob_info(target)
        if written is not None:
            self.verified.remember(sha, self._fingerprint(written))  # we hashed what we sent

    def _reusable(self, sha: str, info: dict[str, Any]) -> bool:
        """Whether an existing blob of the right size holds the right bytes. Local: checked (the
        memo, else a hash). S3: only if this machine verified that very object; another is simply
        uploaded again, which costs what a first upload costs and never reads a download."""
        recorded = self.verified.recorded(sha)
        if recorded == self._fingerprint(info):
            return True
        return self.is_local and self._content_matches(sha, info)

    def _refresh(self, target: str, sha: str) -> bool:
        """Move a reused blob's timestamp to now; False if it vanished meanwhile (then upload it)."""
        try:
            if self.is_local:
                os.utime(target)
            else:  # an S3 object's time moves only with a write: copy it onto itself
                self.fs.setxattr(target, grove_reused="1")
        except FileNotFoundError:
            return False
        except OSError as exc:  # not fatal: put_dir's check after the manifest restores a blob gc took
            log.debug("could not refresh %s: %s", target, exc)
        refreshed = self._blob_info(target)
        if refreshed is None:
            return False
        self.verified.remember(sha, self._fingerprint(refreshed))
        return True

    def _write_json(self, path: str, body: Any, exclusive: bool = False) -> bool:
        """Write a small JSON file whole; exclusive: only if there is none yet (False if there is).
        S3: a conditional PUT (If-None-Match: *, honoured by AWS and SeaweedFS); local: a
        complete temporary file hard-linked into place (link fails if the name exists)."""
        data = json.dumps(body, indent=1, sort_keys=True).encode()
        if not self.is_local:
            if not exclusive:
                self.fs.pipe_file(path, data)
                return True
            try:
                self.fs.pipe_file(path, data, mode="create")
                return True
            except OSError as exc:
                if _precondition_failed(exc):
                    return False
                raise
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
            if not exclusive:
                os.replace(tmp, path)  # atomic: readers see the old file or the new one
                return True
            try:
                os.link(tmp, path)  # atomic and exclusive: readers never see a partial file
                return True
            except FileExistsError:
                return False
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

    def put_dir(self, stage: str, key: str, local_dir: Path, meta: dict[str, Any], replace: bool = False) -> Entry:
        """Store every file under local_dir as the entry (stage, key), manifest last; returns
        the entry that stands for the key afterwards.

        The entry's manifest is created exclusively: of two runs storing one key at once the
        first stands and both continue with that complete entry (so both continue from the same
        files and downstream keys even where the stage is not bit-for-bit deterministic). An
        entry that is damaged (edited manifest, a file missing, of the wrong size or bytes), now or
        when this store's lookup judged it, is replaced, and replace=True (--from-stage) replaces
        any entry on purpose."""
        files = self._put_files(local_dir, stage)
        body = {"stage": stage, "key": key, "files": files, "meta": meta, "digest": manifest_digest(files, meta)}
        doing = f"writing the manifest of {stage}/{key}"
        self._retry(doing, lambda: self._write_json(self._by_digest_path(body["digest"]), body))
        path = self._manifest_path(stage, key)
        if replace or (stage, key) in self._judged_damaged:
            self._retry(doing, lambda: self._write_json(path, body))
            self._judged_damaged.discard((stage, key))
        else:
            winner = self._create_entry(path, body, f"{stage}/{key}")
            if winner is not None:
                log.warning("entry %s/%s: another run stored it first; continuing with that entry", stage, key)
                return winner
        self._restore_missing_blobs(files, local_dir, stage)
        return Entry(stage, key, body)

    def _create_entry(self, path: str, body: dict[str, Any], where: str) -> Entry | None:
        """Create the entry manifest exclusively; None if ours stands, else the complete entry
        another run created first. A damaged manifest in the way is removed (only if it still
        holds the bytes judged damaged, so another run's fresh entry is never removed)."""
        doing = f"writing the manifest of {where}"
        for _ in range(5):
            if self._retry(doing, lambda: self._write_json(path, body, exclusive=True)):
                return None
            try:
                seen = self._retry(f"reading the manifest of {where}", lambda: self.fs.cat_file(path))
            except FileNotFoundError:
                continue  # removed meanwhile: try again
            existing = self._parse_verified(seen, where)
            if existing is not None:
                return None if existing.digest == body["digest"] else existing
            log.warning("entry %s: replacing the damaged entry with this run's", where)
            try:
                if self._retry(f"reading the manifest of {where}", lambda: self.fs.cat_file(path)) == seen:
                    self.remove(path.removeprefix(self._base + "/"))
            except FileNotFoundError:
                pass
        self._retry(doing, lambda: self._write_json(path, body))  # contended that long: last writer wins
        return None

    def _restore_missing_blobs(self, files: dict[str, dict[str, Any]], local_dir: Path, label: str) -> None:
        """After the manifest is written: a blob gc removed between our reuse and our manifest
        (see _put_blob) is uploaded again, so a written entry is always complete."""
        sizes = self._blob_sizes([info["sha256"] for info in files.values()])
        for rel, info in files.items():
            if sizes.get(info["sha256"]) != info["size"]:
                log.warning("%s/%s: its stored file vanished while the entry was written; storing it again",
                            label, rel)
                self._retry(f"storing {label}/{rel}",
                            lambda: self._put_blob(Path(local_dir) / rel, info["sha256"], info["size"]))

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
    def _parse_verified(self, raw: bytes, where: str) -> Entry | None:
        try:
            body = json.loads(raw)
        except ValueError as exc:
            log.warning("entry %s: unreadable manifest (%s); treating as missing", where, exc)
            return None
        return self._verified(body, where)

    def _verified(self, body: Any, where: str) -> Entry | None:
        """The entry if the manifest matches its digest and its blobs hold the recorded bytes
        (sizes always; contents through the memo of verify.py, hashing what changed)."""
        if not isinstance(body, dict) or body.get("digest") != manifest_digest(body.get("files"), body.get("meta")):
            log.warning("entry %s: manifest does not match its digest (edited?); treating as missing", where)
            return None
        infos = self._blob_infos([info["sha256"] for info in body["files"].values()])
        for rel, info in body["files"].items():
            stored = infos.get(info["sha256"])
            if stored is None or stored["size"] != info["size"]:
                log.warning("entry %s: file %s is missing or has the wrong size; treating as missing", where, rel)
                return None
            if not self._content_ok(info["sha256"], stored):
                log.warning("entry %s: file %s does not match its sha256 (damaged in the store); removed the "
                            "damaged copy; treating the entry as missing", where, rel)
                self._quarantine(info["sha256"], stored)
                return None
        return Entry(body["stage"], body["key"], body)

    def _blob_info(self, path: str) -> dict[str, Any] | None:
        """size and fingerprint source of a blob: os.stat locally, HEAD on S3; None if absent."""
        try:
            if self.is_local:
                stat = os.stat(path)
                return {"size": stat.st_size, "stat": stat}
            return self._retry(f"reading {path.rsplit('/', 1)[-1][:12]}", lambda: self.fs.info(path))
        except FileNotFoundError:
            return None

    def _blob_infos(self, shas: list[str]) -> dict[str, dict[str, Any]]:
        found = {}
        for sha in set(shas):
            info = self._blob_info(self._blob_path(sha))
            if info is not None:
                found[sha] = info
        return found

    def _blob_sizes(self, shas: list[str]) -> dict[str, int]:
        return {sha: info["size"] for sha, info in self._blob_infos(shas).items()}

    def _fingerprint(self, info: dict[str, Any]) -> list[Any]:
        return local_fingerprint(info["stat"]) if self.is_local else s3_fingerprint(info)

    def _content_ok(self, sha: str, info: dict[str, Any]) -> bool:
        """Whether the blob holds the bytes its name says, hashing only what the memo cannot vouch
        for. S3: an object this machine never verified is checked when downloaded (materialize)."""
        recorded = self.verified.recorded(sha)
        if recorded == self._fingerprint(info):
            return True
        if not self.is_local and recorded is None:
            return True
        return self._content_matches(sha, info)

    def _content_matches(self, sha: str, info: dict[str, Any]) -> bool:
        """Hash the stored blob; remember its fingerprint if it matches."""
        path = self._blob_path(sha)
        try:
            if self.is_local:
                actual = sha256_file(path)
            else:
                def stream() -> str:
                    digest = hashlib.sha256()
                    with self.fs.open(path, "rb", block_size=8 * 2**20) as handle:
                        while chunk := handle.read(8 * 2**20):
                            digest.update(chunk)
                    return digest.hexdigest()

                actual = self._retry(f"checking blob {sha[:12]}", stream)
        except FileNotFoundError:
            return False
        if actual != sha:
            return False
        self.verified.remember(sha, self._fingerprint(info))
        return True

    def _quarantine(self, sha: str, info: dict[str, Any] | None) -> None:
        """A blob whose bytes do not match its name is garbage: remove it (every entry listing it
        becomes a miss and is stored again) and the local views that hard-link its bytes."""
        self.verified.forget(sha)
        self.remove(f"blobs/{sha[:2]}/{sha}")
        if info is not None:
            self._drop_views_of(info)

    def _drop_views_of(self, info: dict[str, Any]) -> None:
        """Local views hard-link blobs: a damaged blob's bytes live on in every view linking it."""
        if not self.is_local or "stat" not in info or not self.materialized.is_dir():
            return
        inode = (info["stat"].st_dev, info["stat"].st_ino)
        for view in self.materialized.iterdir():
            if view.name.startswith(".") or not view.is_dir():
                continue
            for file in view.rglob("*"):
                try:
                    stat = file.lstat()
                except OSError:
                    continue
                if (stat.st_dev, stat.st_ino) == inode:
                    shutil.rmtree(view, ignore_errors=True)
                    break

    def _load(self, path: str, where: str) -> Entry | None:
        try:
            raw = self._retry(f"reading the manifest of {where}", lambda: self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        return self._parse_verified(raw, where)

    def lookup(self, stage: str, key: str) -> Entry | None:
        """The entry if it is complete and intact, else None (a damaged one with a warning:
        the stage simply runs again and replaces it)."""
        path, where = self._manifest_path(stage, key), f"{stage}/{key}"
        try:
            raw = self._retry(f"reading the manifest of {where}", lambda: self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        entry = self._parse_verified(raw, where)
        if entry is None:
            # Storing the stage again may make the old manifest whole (a deterministic file put back
            # under its sha): it must not then stand as "another run's" over this run's result.
            self._judged_damaged.add((stage, key))
        return entry

    def by_digest(self, digest: str, stage: str | None = None, key: str | None = None) -> Entry | None:
        """The exact artifact a reference names, whatever entry its key points to now. Where its
        copy under manifests/ is missing or damaged and the entry (stage, key) still holds that
        very manifest, the entry's serves and the copy is written again."""
        path = self._by_digest_path(digest)
        entry = self._load(path, f"manifests/{digest[:12]}")
        if entry is None and stage and key:
            entry = self.lookup(stage, key)
            if entry is None or entry.digest != digest:
                return None
            self._retry(f"writing the manifest of {stage}/{key}", lambda: self._write_json(path, entry.manifest))
        return entry

    def materialize(self, entry: Entry) -> Path:
        """A local folder holding the entry's files (hard links for a local root, whose bytes
        lookup/by_digest verified; downloaded and checked against their sha256 for a remote one)."""
        reads = _reads.get()
        if reads is not None and entry.step is None:  # checkpoints are dropped with their stage
            reads[entry.digest] = {"stage": entry.stage, "key": entry.key, "digest": entry.digest}
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
                    self._link_view(info["sha256"], blob, dest)
                    continue
                self._download_verified(entry, rel, info, dest)
            (staging / ".complete").write_text(entry.digest)
            staging.rename(target)
        except OSError:
            if not (target / ".complete").exists():
                raise
        finally:  # another process may have materialized it first: keep theirs
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def _link_view(self, sha: str, blob: str, dest: Path) -> None:
        """Hard-link a blob into a view (a copy across devices). A link moves the blob's ctime,
        part of its fingerprint: the memo follows when it vouched for the blob just before, so
        opening an entry does not cost a hash at the next lookup."""
        before = self._blob_info(blob)
        vouched = before is not None and self.verified.recorded(sha) == self._fingerprint(before)
        try:
            os.link(blob, dest)
        except OSError:
            shutil.copyfile(blob, dest)
            return
        after = self._blob_info(blob) if vouched else None
        unchanged = after is not None and all(getattr(after["stat"], field) == getattr(before["stat"], field)
                                              for field in ("st_size", "st_mtime_ns", "st_ino"))
        if unchanged:  # only the link count and so the ctime moved
            self.verified.remember(sha, self._fingerprint(after))

    def _download_verified(self, entry: Entry, rel: str, info: dict[str, Any], dest: Path) -> None:
        """Download one file and check its sha256; a mismatch twice over is a damaged blob: it is
        removed (so the next run stores it again) and the run stops, never using those bytes."""
        blob = self._blob_path(info["sha256"])
        for _ in range(2):  # a second download tells a damaged object from a garbled transfer
            self._retry(f"downloading {entry.stage}/{rel}", lambda: self.fs.get_file(blob, str(dest)))
            if sha256_file(dest) == info["sha256"]:
                stored = self._blob_info(blob)
                if stored is not None:
                    self.verified.remember(info["sha256"], self._fingerprint(stored))
                return
        self._quarantine(info["sha256"], None)
        raise StoreError(f"artifact store {self.location}: {entry.stage}/{entry.key} file {rel} does not match "
                         f"its checksum (the stored copy is damaged and was removed); run again: the stage "
                         f"that made it runs again and stores it")

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


def _precondition_failed(exc: BaseException) -> bool:
    """An exclusive create that found the object there: s3fs says FileExistsError when the server
    names the condition (AWS), a plain OSError around a 412 PreconditionFailed when it does not
    (SeaweedFS)."""
    if isinstance(exc, FileExistsError):
        return True
    cause = getattr(exc, "__cause__", None)
    response = getattr(cause, "response", None) or {}
    return response.get("Error", {}).get("Code") in ("PreconditionFailed", "412") or \
        response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
