"""Checkpoints of a running stage: stored like entries (blobs, manifest last, verified when
read) under checkpoints/<stage>/<key>/<step>/; the newest two kept, all dropped once the
stage's entry is stored, with the blobs only they used."""

from __future__ import annotations

import json
import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path

from grove.store.entries import MANIFEST, Entry, manifest_digest

log = logging.getLogger("grove.store")


class Checkpoints:
    """The checkpoint half of ArtifactStore (it provides _path, _retry, _put_files, ...)."""

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
