"""grove gc: drop entries no kept run uses, then the blobs no remaining manifest lists."""

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
