"""grove gc: drop what nothing kept reaches, and what is old enough not to be a write in progress.

What stays (reachable), found by following references from the roots:
- roots: the entries (stage, key) and manifests (digest) the caller keeps (the kept run records and
  promoted models), and every entry or manifest younger than the grace period (a run in progress);
- an entry keeps its manifest's files and every entry its manifest names under `meta.uses` (what the
  stage opened from the store: upstream artifacts, the shared adapter-ship base), and an older
  build's `meta.summary.base` (entries stored before `uses` was recorded);
- every checkpoint (a stage running or resumable) keeps its files.
What goes: entries, manifests, blobs and Prefect results nothing reaches and older than the grace
period, and materialized copies (views) of manifests nothing reaches, with the verification memo of
the removed blobs.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from typing import Any

from grove.store.artifacts import ArtifactStore
from grove.store.entries import MANIFEST, StoreError

log = logging.getLogger("grove.store")


@dataclass
class GcReport:
    entries: list[str]
    blobs: int
    bytes_freed: int
    other: int  # superseded manifests, Prefect result records, leftovers of interrupted writes
    views: int = 0  # materialized copies removed from this machine


def _age_seconds(info: dict[str, Any]) -> float:
    stamp = info.get("mtime") or info.get("LastModified") or info.get("created")
    if stamp is None:
        return float("inf")
    seconds = stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)
    return time.time() - seconds


def _references(body: dict[str, Any]) -> list[dict[str, str]]:
    """The entries a manifest names as used (meta.uses, or an older adapter build's summary.base)."""
    meta = body.get("meta") or {}
    named = list(meta.get("uses") or [])
    base = (meta.get("summary") or {}).get("base")
    if isinstance(base, dict) and base.get("key"):
        named.append(base)
    return [n for n in named if isinstance(n, dict) and n.get("stage") and (n.get("key") or n.get("digest"))]


def collect_garbage(store: ArtifactStore, keep: set[tuple[str, str]], grace_seconds: float,
                    dry_run: bool = False, keep_digests: set[str] | frozenset[str] = frozenset()) -> GcReport:
    """Remove every entry, manifest and file that neither `keep` / `keep_digests` nor anything
    younger than grace_seconds reaches (module docstring); manifests first, so an entry never
    outlives its files."""
    fs, path = store.fs, store._path
    entries = {p: info for p, info in _find(store, "entries").items() if p.rstrip("/").endswith("/" + MANIFEST)}
    by_key = {tuple(p.rstrip("/").split("/")[-3:-1]): p for p in entries}
    manifests = _find(store, "manifests")
    by_digest = {p.rstrip("/").split("/")[-1].removesuffix(".json"): p for p in manifests}

    live_keys = {k for k in keep if k in by_key}
    live_keys |= {k for k, p in by_key.items() if _age_seconds(entries[p]) < grace_seconds}
    live_digests = set(keep_digests) | {d for d, p in by_digest.items() if _age_seconds(manifests[p]) < grace_seconds}
    live_shas: set[str] = set()
    read_keys: set[tuple[str, str]] = set()
    read_digests: set[str] = set()
    while True:  # breadth first over the references, each manifest read once
        want = [by_key[k] for k in live_keys - read_keys] + \
               [by_digest[d] for d in live_digests - read_digests if d in by_digest]
        read_keys |= live_keys
        read_digests |= live_digests
        if not want:
            break
        for manifest, body in store.read_manifests(want).items():
            if body is None:  # a kept manifest we cannot read: its files cannot be told apart from garbage
                raise StoreError(f"cannot read {manifest}; gc removed nothing (fix or remove that entry first)")
            live_digests.add(body.get("digest", ""))
            live_shas.update(f["sha256"] for f in body["files"].values())
            for used in _references(body):
                if used.get("key") and (used["stage"], used["key"]) in by_key:
                    live_keys.add((used["stage"], used["key"]))
                if used.get("digest"):
                    live_digests.add(used["digest"])
    checkpoints = store._retry("listing checkpoints", lambda: fs.glob(path("checkpoints", "**", MANIFEST)))
    for manifest, body in store.read_manifests(checkpoints).items():
        if body is None:
            raise StoreError(f"cannot read {manifest}; gc removed nothing (fix or remove that checkpoint first)")
        live_shas.update(f["sha256"] for f in body["files"].values())

    removed = sorted("/".join(k) for k in by_key if k not in live_keys)
    remove_paths = [by_key[tuple(name.split("/"))] for name in removed]
    other = 0
    kept_keys = {key for _, key in live_keys}
    for folder, keep_name in (("manifests", lambda n: n.removesuffix(".json") in live_digests),
                              ("prefect-results", lambda n: n in kept_keys)):
        for leftover, info in _find(store, folder).items():
            if not keep_name(leftover.rstrip("/").split("/")[-1]) and _age_seconds(info) >= grace_seconds:
                remove_paths.append(leftover)
                other += 1
    blob_bytes, blobs = 0, 0
    for blob, info in _find(store, "blobs").items():
        name = blob.rstrip("/").split("/")[-1]
        if name.split(".tmp-")[0] in live_shas and ".tmp-" not in name:
            continue
        if _age_seconds(info) < grace_seconds:
            continue
        remove_paths.append(blob)
        blobs += ".tmp-" not in name
        blob_bytes += info.get("size", 0)
    views = _dead_views(store, live_digests)
    if not dry_run:
        for victim in remove_paths:
            if "/blobs/" in victim and _recently_touched(store, victim, grace_seconds):
                continue
            store._retry(f"removing {victim}", lambda: fs.rm_file(victim))
        if store.is_local:  # empty entry folders (S3 has no folders)
            for name in removed:
                shutil.rmtree(path("entries", name), ignore_errors=True)
        for view in views:
            shutil.rmtree(view, ignore_errors=True)
        for sha in store.verified.shas():  # the memo of blobs no kept manifest lists (verify.py)
            if sha not in live_shas:
                store.verified.forget(sha)
    return GcReport(entries=removed, blobs=blobs, bytes_freed=blob_bytes, other=other, views=len(views))


def _find(store: ArtifactStore, folder: str) -> dict[str, dict[str, Any]]:
    try:
        found = store._retry(f"listing {folder}", lambda: store.fs.find(store._path(folder), detail=True))
    except FileNotFoundError:
        return {}
    return {p: info for p, info in found.items() if info.get("type", "file") == "file"}


def _recently_touched(store: ArtifactStore, blob: str, grace_seconds: float) -> bool:
    """The age again, right before deleting. A writer that reuses a stored blob (skips the upload
    because the bytes are there) refreshes its timestamp before writing the manifest that lists
    it (ArtifactStore._put_blob), so a blob listed by nothing when gc looked, but being reused
    now, is young here and stays. Checking the age (not only the listing) keeps the rule one
    storage call per blob; the writer's own check after its manifest (put_dir) restores a blob
    deleted in the few milliseconds between this check and the delete."""
    try:
        info = store._retry(f"checking {blob}", lambda: store.fs.info(blob))
    except FileNotFoundError:
        return True  # gone already
    return _age_seconds(info) < grace_seconds


def _dead_views(store: ArtifactStore, live_digests: set[str]) -> list:
    """This machine's materialized copies of manifests nothing kept reaches (a local root's views
    hard-link blobs, so they would keep removed bytes on disk; an S3 store's are downloads)."""
    folder = store.materialized
    if not folder.is_dir():
        return []
    return [view for view in folder.iterdir()
            if view.is_dir() and not view.name.startswith(".") and view.name not in live_digests]
